"""dattn: LongNet-style dilated attention with fused CPU and CUDA kernels.

Drop-in modules for the PyTorch LongNet library (same names and arguments), plus the
functional form::

    import dattn
    mha = dattn.MultiheadDilatedAttention(768, 12, dilation_rates=[1, 2, 4],
                                          segment_lengths=[512, 1024, 2048])
    out = dattn.dilated_attention(q, k, v, [512, 1024, 2048], [1, 2, 4], is_causal=True)

What is computed is defined in SPEC.md; float64 inputs run the reference implementation.
"""

try:
    import torch  # noqa: F401
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
from dattn.varlen import block_sparse_attention_varlen, dilated_attention_varlen

__version__ = _C.__version__
has_cuda = _C.has_cuda


def cpu_isa() -> str:
    """The SIMD path the CPU kernels run: 'avx512', 'avx2' or 'scalar' (DATTN_CPU_ISA forces one)."""
    return _C.cpu_isa()


def forward_flops(segment_lengths, dilation_rates, batch, seqlen, heads, head_dim, mode="grouped",
                  is_causal=False) -> float:
    """Forward FLOPs of one call as PERF.md counts them (forward+backward: 3.5x)."""
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
           "dilated_attention_varlen", "block_sparse_attention_varlen", "dilated_attention_with_kvcache", "KVCache"]
