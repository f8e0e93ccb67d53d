"""Functional forms (docs/semantics.md "Functional forms and return values")."""

from typing import Optional, Sequence

from torch import Tensor

from dattn import _ops

__all__ = ["dilated_attention", "dilated_attention_qkvpacked"]


def dilated_attention(q: Tensor, k: Tensor, v: Tensor, segment_lengths: Sequence[int], dilation_rates: Sequence[int],
                      is_causal: bool = False, scale: Optional[float] = None, mode: str = "grouped",
                      key_padding_mask: Optional[Tensor] = None, dropout_p: float = 0.0, use_tf32: bool = False,
                      return_lse: bool = False):
    """Dilated attention of q, k, v ``[B, N, H, D]`` (any strides with stride 1 along D).

    ``mode="grouped"`` computes what the PyTorch LongNet libraries' ``DilatedAttention`` computes
    (heads split into one group per branch, outputs divided by the number of branches);
    ``mode="longnet"`` is the paper's (every head in every branch, branches merged by their softmax
    denominators). ``key_padding_mask`` is ``[B, N]`` bool, True = padding. ``dropout_p`` drops
    attention probabilities whenever it is > 0 (pass 0 in evaluation); the seed is drawn from
    torch's default CPU generator, so ``torch.manual_seed`` reproduces a call.

    Returns ``out`` ``[B, N, H, D]``, or ``(out, lse)`` with ``return_lse=True``, ``lse`` being
    ``[B, H, N]`` float32 (natural log, ``-inf`` for rows that attend to nothing, no gradient).
    float64 inputs run the reference implementation (for gradcheck).
    """
    _ops.check_attention_inputs(q, k, v)
    segment_lengths, dilation_rates = _ops.check_config(segment_lengths, dilation_rates)
    mode = _ops.check_mode(mode)
    scale = _ops.check_scale(scale)
    dropout_p = _ops.check_dropout(dropout_p)
    _ops.check_key_padding_mask(key_padding_mask, q.size(0), q.size(1), q.device)
    seed = _ops.draw_dropout_seed() if dropout_p > 0.0 else 0
    out, lse = _ops.attention_forward(q, k, v, key_padding_mask, segment_lengths, dilation_rates, is_causal, scale,
                                      mode, dropout_p, seed, use_tf32)
    return (out, lse) if return_lse else out


def dilated_attention_qkvpacked(qkv: Tensor, segment_lengths: Sequence[int], dilation_rates: Sequence[int],
                                is_causal: bool = False, scale: Optional[float] = None, mode: str = "grouped",
                                key_padding_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                                use_tf32: bool = False, return_lse: bool = False):
    """``dilated_attention`` of a packed ``qkv`` ``[B, N, 3, H, D]`` (q, k, v in that order along
    dim 2): the kernels read q, k and v as strided views and the backward writes one packed
    gradient, so a fused QKV projection needs no split, copy or gather either way."""
    _ops._check_tensor("qkv", qkv)
    if qkv.dim() != 5 or qkv.size(2) != 3:
        raise ValueError(f"qkv has shape {list(qkv.shape)}; expected a 5-D [B, N, 3, H, D] tensor")
    _ops.check_attention_inputs(qkv.select(2, 0), qkv.select(2, 1), qkv.select(2, 2))
    segment_lengths, dilation_rates = _ops.check_config(segment_lengths, dilation_rates)
    mode = _ops.check_mode(mode)
    scale = _ops.check_scale(scale)
    dropout_p = _ops.check_dropout(dropout_p)
    _ops.check_key_padding_mask(key_padding_mask, qkv.size(0), qkv.size(1), qkv.device)
    seed = _ops.draw_dropout_seed() if dropout_p > 0.0 else 0
    out, lse = _ops.attention_qkvpacked_forward(qkv, key_padding_mask, segment_lengths, dilation_rates, is_causal,
                                                scale, mode, dropout_p, seed, use_tf32)
    return (out, lse) if return_lse else out
