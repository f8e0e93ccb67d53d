"""The compiled block mask type and where its arrays live; shared by the single-process
block-sparse code (sparse.py) and the ring (ring.py) so neither imports the other's internals."""

import torch

from dattn import _C

BlockSparseMask = _C.BlockSparseMask


def mask_on(mask: "BlockSparseMask", device: torch.device) -> "BlockSparseMask":
    """``mask`` with its CSR arrays on ``device`` (a CUDA upload unless they are there already)."""
    if device.type == "cpu" or mask.device == str(device):
        return mask
    return mask.to_cuda(device.index if device.index is not None else torch.cuda.current_device())
