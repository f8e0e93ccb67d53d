"""dattn: LongNet-style dilated attention with fused CPU and CUDA kernels.

Drop-in modules for the PyTorch LongNet library (same names and arguments), plus the
functional form::

    import dattn
    mha = dattn.MultiheadDilatedAttention(768, 12, dilation_rates=[1, 2, 4],
                                          segment_lengths=[512, 1024, 2048])
    out = dattn.dilated_attention(q, k, v, [512, 1024, 2048], [1, 2, 4], is_causal=True)

What is computed is defined in docs/semantics.md of the repository; float64 inputs run the
reference implementation. ``dattn.backends()`` says what this install was built with.
"""

try:
    import torch
except ImportError as error:  # pragma: no cover
    raise ImportError("dattn needs PyTorch (pip install torch, or Debian's python3-torch)") from error

from dattn import _C
from dattn._ops import HAS_CUSTOM_OPS
from dattn.decode import KVCache, dilated_attention_with_kvcache
from dattn.functional import dilated_attention, dilated_attention_qkvpacked
from dattn.hilbert import (HilbertAttention, HilbertAttentionTritonFixed, HilbertDilatedAttention,
                           hilbert_dilated_attention, hilbert_order)
from dattn.modules import (DilatedAttention, ImprovedDilatedAttention, ImprovedMultiheadDilatedAttention,
                           MultiheadDilatedAttention)
from dattn.ring import RingDilatedAttention, shard_sequence, unshard_sequence
from dattn.sparse import (BlockSparseMask, BlockSparseRingDilatedAttention, SparsePatternConfig,
                          block_sparse_attention, block_sparse_mask, dilated_mask, dilated_sparse_mask,
                          global_local_mask, local_window_mask)
from dattn.block_sparse_multihead import BlockSparseRingMultiheadDilatedAttention
from dattn.transformer import (DilatedTransformerDecoderLayer, DilatedTransformerEncoderLayer, LongNet, LongNetLM,
                               XPos)
from dattn.factories import (OUT_OF_SCOPE, create_block_sparse_attention, create_dilated_attention,
                             create_multihead_block_sparse, create_multihead_dilated_attention,
                             get_block_sparse_preset)
from dattn.convert import from_longnet
from dattn.varlen import block_sparse_attention_varlen, dilated_attention_varlen

__version__ = _C.__version__
has_cuda = _C.has_cuda


def cpu_isa() -> str:
    """The SIMD path the CPU kernels run: 'amx_bf16', 'avx512_bf16', 'avx512', 'avx2' or 'scalar'
    (DATTN_CPU_ISA forces one; the bf16 levels run only bfloat16 data on their own kernels)."""
    return _C.cpu_isa()


def backends() -> dict:
    """What this install has: ``cpu_isas`` (the compiled SIMD paths this CPU can run), ``cpu_isa``
    (the one in use), ``cuda`` (bool), ``cuda_architectures`` (list of str, e.g. ['80', '90a']),
    ``cuda_device_visible`` (bool), ``cuda_kernels`` (the CUDA kernel generations built: 'sm80', and
    'sm90' for the Hopper kernels of a DATTN_SM90 build), ``mpi`` and ``nccl`` (bool: the C++
    ring communicators)."""
    archs = [a for a in _C.cuda_architectures.split(",") if a]
    return {"cpu_isas": list(_C.cpu_isas_supported()), "cpu_isa": _C.cpu_isa(), "cuda": bool(_C.has_cuda),
            "cuda_architectures": archs, "cuda_device_visible": bool(_C.has_cuda and torch.cuda.is_available()),
            "cuda_kernels": list(_C.cuda_kernel_generations()),
            "mpi": bool(_C.has_mpi), "nccl": bool(_C.has_nccl)}


def forward_flops(segment_lengths, dilation_rates, batch, seqlen, heads, head_dim, mode="grouped",
                  is_causal=False) -> float:
    """Forward FLOPs of one call as docs/benchmarks.md counts them (forward+backward: 3.5x)."""
    return _C.forward_flops(list(segment_lengths), list(dilation_rates), mode, bool(is_causal), int(batch),
                            int(seqlen), int(heads), int(head_dim))


__all__ = ["DilatedAttention", "ImprovedDilatedAttention", "MultiheadDilatedAttention",
           "ImprovedMultiheadDilatedAttention", "dilated_attention", "dilated_attention_qkvpacked",
           "forward_flops", "cpu_isa", "has_cuda", "HAS_CUSTOM_OPS", "__version__",
           "block_sparse_attention", "block_sparse_mask", "BlockSparseMask", "SparsePatternConfig",
           "BlockSparseRingDilatedAttention",
           "local_window_mask", "dilated_sparse_mask", "global_local_mask", "dilated_mask",
           "hilbert_order", "hilbert_dilated_attention", "HilbertDilatedAttention", "HilbertAttention",
           "HilbertAttentionTritonFixed", "RingDilatedAttention", "shard_sequence", "unshard_sequence",
           "BlockSparseRingMultiheadDilatedAttention", "DilatedTransformerEncoderLayer",
           "DilatedTransformerDecoderLayer", "LongNet", "LongNetLM", "XPos", "create_dilated_attention",
           "create_multihead_dilated_attention", "create_block_sparse_attention", "create_multihead_block_sparse",
           "get_block_sparse_preset", "from_longnet", "backends",
           "dilated_attention_varlen", "block_sparse_attention_varlen", "dilated_attention_with_kvcache", "KVCache",
           *OUT_OF_SCOPE]

globals().update(OUT_OF_SCOPE)  # that library's names dattn does not provide: calling one names the alternative
del OUT_OF_SCOPE
