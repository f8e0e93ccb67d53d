"""Block-sparse attention (docs/semantics.md "Block-sparse attention"): one softmax per row over every
allowed key (not a softmax per block pair), with work growing with the allowed block pairs."""

import math
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from dattn import _C, _ops
from dattn._block_mask import BlockSparseMask, mask_on
from dattn.ring import check_group, ring_block_sparse_attention

__all__ = ["block_sparse_attention", "block_sparse_mask", "BlockSparseMask", "SparsePatternConfig",
           "BlockSparseRingDilatedAttention", "local_window_mask", "dilated_sparse_mask", "global_local_mask",
           "dilated_mask"]

PATTERNS = ("local_window", "dilated_sparse", "global_local", "dilated")


def _pattern(values, num_blocks: int) -> Tensor:
    return torch.tensor(values, dtype=torch.bool).view(num_blocks, num_blocks)


def local_window_mask(num_blocks: int, window: int, block_size: int) -> Tensor:
    """Query block i sees key blocks max(0, i−half) … min(nb−1, i+half), half = window // block_size // 2."""
    return _pattern(_C.local_window_pattern(num_blocks, window, block_size), num_blocks)


def dilated_sparse_mask(num_blocks: int, rates: Sequence[int] = (1, 2, 4)) -> Tensor:
    """Block i sees block i and blocks i ± rate for each rate."""
    return _pattern(_C.dilated_sparse_pattern(num_blocks, [int(r) for r in rates]), num_blocks)


def global_local_mask(num_blocks: int, window: int, global_blocks: int, block_size: int) -> Tensor:
    """The first global_blocks blocks see and are seen by all blocks; the others use local_window."""
    return _pattern(_C.global_local_pattern(num_blocks, window, global_blocks, block_size), num_blocks)


def dilated_mask(seqlen: int, segment_lengths: Sequence[int], dilation_rates: Sequence[int], block_size: int) -> Tensor:
    """The union over branches of dilated block selections; every w[i] a multiple of block_size."""
    segment_lengths, dilation_rates = _ops.check_config(segment_lengths, dilation_rates)
    return _pattern(_C.dilated_pattern(seqlen, segment_lengths, dilation_rates, block_size),
                    math.ceil(seqlen / block_size))


def block_sparse_mask(block_mask: Tensor, device: Optional[Union[str, torch.device]] = None) -> "BlockSparseMask":
    """A ``dattn.BlockSparseMask`` from a bool block mask ``[nqb, nkb]`` or ``[H, nqb, nkb]``: the CSR
    form and its transpose, built once, with its arrays on ``device`` (default: the mask's device),
    for any number of ``block_sparse_attention`` calls."""
    if not isinstance(block_mask, Tensor) or block_mask.dtype != torch.bool or block_mask.dim() not in (2, 3):
        described = f"a {block_mask.dim()}-D {block_mask.dtype} tensor" if isinstance(block_mask, Tensor) \
            else type(block_mask).__name__
        raise TypeError(f"block_mask is {described}; expected a bool tensor [nqb, nkb] or [H, nqb, nkb]")
    dense = block_mask.to("cpu").contiguous()
    return mask_on(BlockSparseMask.from_dense(_ops._view(dense)),
                   block_mask.device if device is None else torch.device(device))


def _as_mask(block_mask, device: torch.device) -> "BlockSparseMask":
    if isinstance(block_mask, BlockSparseMask):
        return mask_on(block_mask, device)
    if not isinstance(block_mask, Tensor):
        raise TypeError(f"block_mask is {type(block_mask).__name__}; expected a bool tensor [nqb, nkb] or "
                        "[H, nqb, nkb], or a dattn.BlockSparseMask")
    return block_sparse_mask(block_mask, device)


class _BlockSparseFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, mask, block_size, is_causal, scale, dropout_p, seed):
        B, N, H, D = q.shape
        out = q.new_empty((B, N, H, D))
        lse = q.new_empty((B, H, N), dtype=torch.float32)
        # The views describe tensors that save_for_backward keeps alive: the backward reuses them
        # (at small shapes the host's work per call is what the wall clock shows).
        views = tuple(_ops._view(t) for t in (q, k, v, out, lse))
        mask_view = None if key_padding_mask is None else _ops._view(key_padding_mask)
        config = (block_size, bool(is_causal), scale, mask_view, float(dropout_p), int(seed))
        _C.block_sparse_forward(mask, *views, *config, _ops._stream(q))
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
        ctx.mask, ctx.views, ctx.config = mask, views, config
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
        dout = _ops._gradient(grad_out, out)
        dq, dk, dv = (t.new_empty(t.shape) for t in (q, k, v))
        # The delta workspace, as the dilated backward's (the sm90 kernels read delta from it; the
        # sm80 ones then skip recomputing it in every block).
        workspace, workspace_args = _ops._delta_workspace(q)  # referenced until the call returns
        _C.block_sparse_backward(ctx.mask, *ctx.views, *(_ops._view(t) for t in (dout, dq, dk, dv)), *ctx.config,
                                 _ops._stream(q), **workspace_args)
        return (dq, dk, dv) + (None,) * 7


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, block_mask: Union[Tensor, "BlockSparseMask"],
                           block_size: int, is_causal: bool = False, scale: Optional[float] = None,
                           key_padding_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                           return_lse: bool = False):
    """Attention of q, k, v ``[B, N, H, D]`` over the (query block, key block) pairs ``block_mask``
    allows (bool ``[nqb, nkb]`` or ``[H, nqb, nkb]``, or a prebuilt ``dattn.BlockSparseMask``, which
    keeps its CSR and transpose across calls). A row with nothing allowed gives 0 and lse −inf."""
    _ops.check_attention_inputs(q, k, v)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size = {block_size!r}; expected an int >= 1")
    scale = _ops.check_scale(scale)
    dropout_p = _ops.check_dropout(dropout_p)
    _ops.check_key_padding_mask(key_padding_mask, q.size(0), q.size(1), q.device)
    mask = _as_mask(block_mask, q.device)
    seed = _ops.draw_dropout_seed() if dropout_p > 0.0 else 0
    out, lse = _BlockSparseFunction.apply(q, k, v, key_padding_mask, mask, block_size, is_causal, scale, dropout_p,
                                          seed)
    return (out, lse) if return_lse else out


class SparsePatternConfig:
    """The PyTorch library's pattern description. ``global_tokens`` counts global *blocks* (the
    library's meaning); ``sparsity_ratio`` changes no pattern; ``dilation_rates`` are the
    ``dilated_sparse`` rates; ``pattern_type="dilated"`` uses the module's segments and rates."""

    def __init__(self, pattern_type: str = "local_window", block_size: int = 64, sparsity_ratio: float = 0.1,
                 window_size: int = 256, global_tokens: int = 1, dilation_rates: Optional[Sequence[int]] = None):
        if pattern_type not in PATTERNS:
            hint = " (dattn has no adaptive pattern: pass a fixed one or a bool block mask)" \
                if pattern_type in ("adaptive", "learned") else ""
            raise ValueError(f"pattern_type = {pattern_type!r}; expected one of {', '.join(PATTERNS)}{hint}")
        for field, value in (("window_size", window_size), ("global_tokens", global_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{field} = {value!r}; expected an int >= 0")
        if isinstance(sparsity_ratio, bool) or not isinstance(sparsity_ratio, (int, float)) \
                or not 0.0 <= sparsity_ratio <= 1.0:
            raise ValueError(f"sparsity_ratio = {sparsity_ratio!r}; expected a number in [0, 1] (it changes no "
                             "pattern)")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size = {block_size!r}; expected an int >= 1")
        self.pattern_type, self.block_size, self.sparsity_ratio = pattern_type, block_size, sparsity_ratio
        self.window_size, self.global_tokens = int(window_size), int(global_tokens)
        self.dilation_rates = [1, 2, 4] if dilation_rates is None else [int(r) for r in dilation_rates]

    def dense_mask(self, seqlen: int, segment_lengths: Sequence[int] = (), dilation_rates: Sequence[int] = ()) -> Tensor:
        nb = math.ceil(seqlen / self.block_size)
        if self.pattern_type == "local_window":
            return local_window_mask(nb, self.window_size, self.block_size)
        if self.pattern_type == "dilated_sparse":
            return dilated_sparse_mask(nb, self.dilation_rates)
        if self.pattern_type == "global_local":
            return global_local_mask(nb, self.window_size, self.global_tokens, self.block_size)
        return dilated_mask(seqlen, segment_lengths, dilation_rates, self.block_size)


_CONFIG_FIELDS = ("pattern_type", "block_size", "sparsity_ratio", "window_size", "global_tokens", "dilation_rates")


def as_sparse_config(sparse_config, name: str = "sparse_config") -> SparsePatternConfig:
    """None (the default ``SparsePatternConfig()``), a ``SparsePatternConfig``, or a dict of its
    arguments, checked now (an unknown key or a bad value is an error naming it)."""
    if sparse_config is None:
        return SparsePatternConfig()
    if isinstance(sparse_config, SparsePatternConfig):
        return sparse_config
    if isinstance(sparse_config, dict):
        unknown = sorted(set(sparse_config) - set(_CONFIG_FIELDS))
        if unknown:
            raise ValueError(f"{name} has key {unknown[0]!r}; expected keys among {', '.join(_CONFIG_FIELDS)}")
        return SparsePatternConfig(**sparse_config)
    raise TypeError(f"{name} is {type(sparse_config).__name__}; expected None, a dattn.SparsePatternConfig or a dict "
                    "of its arguments")


class BlockSparseRingDilatedAttention(nn.Module):
    """Block-sparse attention with the mask ``sparse_config`` names (the PyTorch library's class
    and arguments). Single-process unless given ``group`` (a torch.distributed process group: gloo
    for CPU tensors, NCCL for CUDA ones): then each rank passes its rows in ``layout`` and the mask
    of the whole sequence runs on the ring (a key chunk travels only to ranks whose query blocks it
    serves)."""

    def __init__(self, segment_lengths: Sequence[int], dilation_rates: Sequence[int],
                 sparse_config: Union[SparsePatternConfig, dict, None] = None, group=None, layout: str = "contiguous"):
        super().__init__()
        check_group(group, layout)
        self.group, self.layout = group, layout
        self.segment_lengths, self.dilation_rates = _ops.check_config(segment_lengths, dilation_rates)
        self.sparse_config = as_sparse_config(sparse_config)
        self._masks = {}

    def mask(self, seqlen: int, device: torch.device = torch.device("cpu")) -> "BlockSparseMask":
        """The block mask for this sequence length on ``device``, built (and uploaded) once and kept."""
        if (seqlen, device) not in self._masks:
            if seqlen not in self._masks:
                self._masks[seqlen] = block_sparse_mask(
                    self.sparse_config.dense_mask(seqlen, self.segment_lengths, self.dilation_rates))
            self._masks[(seqlen, device)] = mask_on(self._masks[seqlen], device)
        return self._masks[(seqlen, device)]

    def forward(self, q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False,
                return_attention_weights: bool = False, key_padding_mask: Optional[Tensor] = None):
        block = self.sparse_config.block_size
        if self.group is not None:
            if return_attention_weights:
                raise ValueError("return_attention_weights=True with a group: the weights need the whole sequence on "
                                 "one rank; expected False")
            mask = self.mask(q.size(1) * dist.get_world_size(self.group), q.device)
            return ring_block_sparse_attention(q, k, v, mask, block, self.group, self.layout, is_causal,
                                               key_padding_mask=key_padding_mask)
        mask = self.mask(q.size(1), q.device)
        out, lse = block_sparse_attention(q, k, v, mask, block, is_causal=is_causal,
                                          key_padding_mask=key_padding_mask, return_lse=True)
        if not return_attention_weights:
            return out
        return out, _attention_weights(q, k, lse, mask, block, is_causal, key_padding_mask)


def _attention_weights(q, k, lse, mask, block, is_causal, key_padding_mask):
    """docs/semantics.md: {"indices": [2, nnz], "values": [B, H, nnz, block, block] float32, "shape", "block_size"}.
    The probabilities of the softmax (before dropout), 0 for masked pairs and past the sequence."""
    B, N, H, D = q.shape
    nb = mask.query_blocks
    rows = torch.repeat_interleave(torch.arange(nb), torch.tensor(mask.row_offsets[1:nb + 1]) -
                                   torch.tensor(mask.row_offsets[:nb]))
    cols = torch.tensor(mask.columns[:len(rows)], dtype=torch.int64)
    if mask.heads != 1:
        raise ValueError("attention weights are defined for a mask shared by all heads")
    padded = nb * block
    qp = torch.zeros(B, padded, H, D, dtype=torch.float32)
    kp = torch.zeros(B, padded, H, D, dtype=torch.float32)
    qp[:, :N] = q.detach().float()
    kp[:, :N] = k.detach().float().repeat_interleave(H // k.size(2), dim=2)  # query head h reads head h // (H / Hkv)
    lp = torch.full((B, H, padded), float("inf"))
    lp[:, :, :N] = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse)
    qb = qp.view(B, nb, block, H, D)[:, rows]  # [B, nnz, block, H, D]
    kb = kp.view(B, nb, block, H, D)[:, cols]
    scale = 1.0 / math.sqrt(D)
    scores = torch.einsum("bnihd,bnjhd->bhnij", qb, kb) * scale
    values = torch.exp(scores - lp.view(B, H, nb, block)[:, :, rows].unsqueeze(-1))
    qpos = rows[:, None] * block + torch.arange(block)[None, :]
    kpos = cols[:, None] * block + torch.arange(block)[None, :]
    valid = (kpos[:, None, :] < N) & (qpos[:, :, None] < N)
    if is_causal:
        valid &= kpos[:, None, :] <= qpos[:, :, None]
    values = values * valid
    if key_padding_mask is not None:
        keep = torch.ones(B, padded, dtype=torch.bool)
        keep[:, :N] = ~key_padding_mask.cpu()
        values = values * keep.view(B, nb, block)[:, cols][:, None, :, None, :]
    return {"indices": torch.stack([rows, cols]), "values": values.float(), "shape": (nb, nb), "block_size": block}
