"""Hilbert-ordered dilated attention (docs/semantics.md "Hilbert-ordered attention").

Tokens on a 2-D grid are attended in generalized Hilbert curve order, so a segment covers a
compact 2-D region; results come back in the original order. The order is an index map inside
the kernels (no permuted copy of q, k, v or out); ``causal`` still refers to original positions.
"""

from functools import lru_cache
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from dattn import _C, _ops

__all__ = ["hilbert_order", "hilbert_dilated_attention", "HilbertDilatedAttention", "HilbertAttention",
           "HilbertAttentionTritonFixed"]


@lru_cache(maxsize=64)
def _order(seqlen: int, grid_shape: Optional[Tuple[int, int]]) -> Tensor:
    if grid_shape is None:
        values = _C.hilbert_sequence_order(seqlen)
    else:
        values = _C.hilbert_grid_order(*grid_shape)
    return torch.tensor(values, dtype=torch.int64)


@lru_cache(maxsize=64)
def _order_on(seqlen: int, grid_shape: Optional[Tuple[int, int]], device: torch.device) -> Tensor:
    """hilbert_order on `device`, made once (no host-to-device copy per call)."""
    return hilbert_order(seqlen, grid_shape).to(device)


def hilbert_order(seqlen: int, grid_shape: Optional[Sequence[int]] = None) -> Tensor:
    """Original token indices in curve order, int64 ``[seqlen]``. With ``grid_shape=(H, W)`` the
    tokens are the grid's cells row by row (``H·W`` must equal ``seqlen``); without it they are laid
    on a grid of width ``ceil(sqrt(N))`` and empty cells are skipped."""
    if grid_shape is not None:
        if len(grid_shape) != 2:
            raise ValueError(f"grid_shape = {tuple(grid_shape)}; expected (Hgrid, Wgrid)")
        height, width = (int(x) for x in grid_shape)
        if height < 1 or width < 1 or height * width != seqlen:
            raise ValueError(f"grid_shape = ({height}, {width}); expected Hgrid * Wgrid = N = {seqlen}")
        return _order(int(seqlen), (height, width))
    if seqlen < 1:
        raise ValueError(f"seqlen = {seqlen}; expected >= 1")
    return _order(int(seqlen), None)


class _HilbertFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, order, segment_lengths, dilation_rates, is_causal, scale, mode,
                dropout_p, seed, order_checked):
        out, lse = _ops._forward_impl(q, k, v, key_padding_mask, segment_lengths, dilation_rates, is_causal, scale,
                                      mode, dropout_p, seed, False, order, order_checked)
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, order)
        ctx.config = (segment_lengths, dilation_rates, is_causal, scale, mode, dropout_p, seed, False)
        ctx.order_checked = order_checked
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, key_padding_mask, order = ctx.saved_tensors
        dq, dk, dv = _ops._backward_impl(grad_out, q, k, v, out, lse, key_padding_mask, *ctx.config,
                                         position_index=order, position_index_checked=ctx.order_checked)
        return (dq, dk, dv) + (None,) * 10


def hilbert_dilated_attention(q: Tensor, k: Tensor, v: Tensor, segment_lengths: Sequence[int],
                              dilation_rates: Sequence[int], grid_shape: Optional[Sequence[int]] = None,
                              is_causal: bool = False, scale: Optional[float] = None, mode: str = "grouped",
                              key_padding_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                              order: Optional[Tensor] = None, return_lse: bool = False):
    """Dilated attention of q, k, v ``[B, N, H, D]`` over the Hilbert order of their tokens
    (or over ``order``, any permutation of ``range(N)``), returned in the original order."""
    _ops.check_attention_inputs(q, k, v)
    segment_lengths, dilation_rates = _ops.check_config(segment_lengths, dilation_rates)
    mode = _ops.check_mode(mode)
    scale = _ops.check_scale(scale)
    dropout_p = _ops.check_dropout(dropout_p)
    _ops.check_key_padding_mask(key_padding_mask, q.size(0), q.size(1), q.device)
    order_checked = order is None  # dattn's own Hilbert order is a permutation: no per-call check
    if order is None:  # made once per (N, grid, device): contiguous, on q's device
        order = _order_on(q.size(1), None if grid_shape is None else tuple(int(x) for x in grid_shape), q.device)
    elif not isinstance(order, Tensor) or order.dtype != torch.int64 or order.shape != (q.size(1),):
        raise ValueError(f"order must be an int64 tensor of shape [{q.size(1)}] (a permutation of range(N))")
    else:
        order = order.to(q.device).contiguous()  # on CUDA the index map lives on q's device
    seed = _ops.draw_dropout_seed() if dropout_p > 0.0 else 0
    is_causal = bool(is_causal)
    if _ops._needs_function(q.requires_grad or k.requires_grad or v.requires_grad):
        out, lse = _HilbertFunction.apply(q, k, v, key_padding_mask, order, segment_lengths, dilation_rates, is_causal,
                                          scale, mode, dropout_p, seed, order_checked)
    else:  # no gradient to record: no autograd.Function (its apply costs microseconds a call)
        out, lse = _ops._forward_impl(q, k, v, key_padding_mask, segment_lengths, dilation_rates, is_causal, scale,
                                      mode, dropout_p, seed, False, order, order_checked)
    return (out, lse) if return_lse else out


class HilbertDilatedAttention(nn.Module):
    """Dilated attention over q, k, v ``[B, N, H, D]`` in Hilbert curve order of a
    ``grid_shape=(Hgrid, Wgrid)`` grid (``Hgrid·Wgrid = N``), or of the plain-sequence layout."""

    def __init__(self, segment_lengths: Sequence[int], dilation_rates: Sequence[int],
                 grid_shape: Optional[Sequence[int]] = None, mode: str = "grouped"):
        super().__init__()
        self.segment_lengths, self.dilation_rates = _ops.check_config(segment_lengths, dilation_rates)
        if grid_shape is not None and len(grid_shape) != 2:
            raise ValueError(f"grid_shape = {tuple(grid_shape)}; expected (Hgrid, Wgrid)")
        self.grid_shape = None if grid_shape is None else (int(grid_shape[0]), int(grid_shape[1]))
        self.mode = _ops.check_mode(mode)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False,
                key_padding_mask: Optional[Tensor] = None) -> Tensor:
        return hilbert_dilated_attention(q, k, v, self.segment_lengths, self.dilation_rates, self.grid_shape,
                                         is_causal=is_causal, mode=self.mode, key_padding_mask=key_padding_mask)


class HilbertAttention(nn.Module):
    """The PyTorch library's hidden-state interface: ``qkv_proj`` (``[3·hidden, hidden]``, no bias),
    Hilbert-ordered dilated attention in longnet mode with one branch (``segment_size``,
    ``dilation_rate``: head h covers the positions ``≡ h mod r`` of each segment), ``out_proj`` (no
    bias) and dropout on the output."""

    def __init__(self, hidden_dim: int, num_heads: int, segment_size: int = 128, dilation_rate: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        if hidden_dim < 1 or num_heads < 1 or hidden_dim % num_heads != 0:
            raise ValueError(f"hidden_dim = {hidden_dim}, num_heads = {num_heads}; expected hidden_dim divisible "
                             "by num_heads")
        _ops.check_config([segment_size], [dilation_rate])
        self.hidden_dim, self.num_heads = hidden_dim, num_heads
        self.segment_size, self.dilation_rate = int(segment_size), int(dilation_rate)
        self.qkv_proj = nn.Linear(hidden_dim, 3 * hidden_dim, bias=False)
        self.out_proj = nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.dropout = nn.Dropout(_ops.check_dropout(dropout, "dropout"))

    def forward(self, x: Tensor, use_hilbert: bool = True, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.size(2) != self.hidden_dim:
            raise ValueError(f"x has shape {list(getattr(x, 'shape', []))}; expected [B, N, {self.hidden_dim}]")
        B, N, E = x.shape
        qkv = self.qkv_proj(x).view(B, N, 3, self.num_heads, E // self.num_heads)
        q, k, v = qkv.select(2, 0), qkv.select(2, 1), qkv.select(2, 2)
        order = hilbert_order(N) if use_hilbert else torch.arange(N, dtype=torch.int64)
        out = hilbert_dilated_attention(q, k, v, [self.segment_size], [self.dilation_rate], mode="longnet",
                                        key_padding_mask=key_padding_mask, order=order)
        return self.dropout(self.out_proj(out.reshape(B, N, E)))


HilbertAttentionTritonFixed = HilbertAttention
