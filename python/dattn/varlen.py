"""Packed variable-length batches (FlashAttention's varlen layout): q ``[T, H, D]``, k, v
``[T, Hkv, D]`` hold B sequences back to back, sequence b being rows
``cu_seqlens[b] .. cu_seqlens[b + 1]``. Each sequence is attended alone, as a batch of one of its
own length. Dilated attention on CPU and CUDA tensors; block-sparse attention on CPU tensors so far
(CUDA tensors raise an error)."""

from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from dattn import _C, _ops

__all__ = ["dilated_attention_varlen", "block_sparse_attention_varlen"]


def _check_packed(q, k, v, cu_seqlens, max_seqlen):
    for name, t in (("q", q), ("k", k), ("v", v), ("cu_seqlens", cu_seqlens)):
        _ops._check_tensor(name, t)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} has shape {list(t.shape)}; expected a 3-D [T, {'H' if name == 'q' else 'Hkv'}, D] "
                             "tensor (a packed batch)")
    _ops.check_dtypes_and_devices(q, k, v)
    _ops.check_kv_heads(q, k)
    for name, t in (("k", k), ("v", v)):
        if list(t.shape) != [q.size(0), k.size(1), q.size(2)]:
            raise ValueError(f"{name} has shape {list(t.shape)}; expected {[q.size(0), k.size(1), q.size(2)]} "
                             "(q's T and D, k's Hkv heads)")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        raise ValueError(f"cu_seqlens has dtype {cu_seqlens.dtype} and shape {list(cu_seqlens.shape)}; expected an "
                         "int32 [B + 1] tensor")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device}; expected {q.device} (the device of q)")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen = {max_seqlen!r}; expected an int >= the longest sequence")


def _outputs(q):
    T, H, D = q.shape
    return q.new_empty((T, H, D)), q.new_empty((H, T), dtype=torch.float32)


def _gradients(grad_out, out, q, k, v):
    dout = _ops._gradient(grad_out, out)
    return dout, tuple(t.new_empty(t.shape) for t in (q, k, v))


class _DilatedVarlenFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, validate, segment_lengths, dilation_rates, is_causal, scale,
                mode, dropout_p, seed):
        out, lse = _outputs(q)
        config = (segment_lengths, dilation_rates, mode, bool(is_causal), scale, float(dropout_p), int(seed),
                  "automatic", _ops._stream(q))
        packed = (_ops._view(cu_seqlens), max_seqlen, validate)
        _C.forward_varlen(*(_ops._view(t) for t in (q, k, v, out, lse)), *packed, *config)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.packed_config = (max_seqlen, validate, config)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        max_seqlen, validate, config = ctx.packed_config
        dout, grads = _gradients(grad_out, out, q, k, v)
        workspace, workspace_args = _ops._delta_workspace(q)  # [H, T] on CUDA, referenced through the call
        _C.backward_varlen(*(_ops._view(t) for t in (q, k, v, out, lse, dout, *grads)), _ops._view(cu_seqlens),
                           max_seqlen, validate, *config, **workspace_args,
                           deterministic=torch.are_deterministic_algorithms_enabled())
        return grads + (None,) * 10


def dilated_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                             segment_lengths: Sequence[int], dilation_rates: Sequence[int], is_causal: bool = False,
                             scale: Optional[float] = None, mode: str = "grouped", dropout_p: float = 0.0,
                             return_lse: bool = False, validate: bool = True):
    """Dilated attention of each sequence of a packed batch: q ``[T, H, D]``, k, v ``[T, Hkv, D]``
    (H % Hkv == 0), ``cu_seqlens`` int32 ``[B + 1]`` on q's device (0, non-decreasing, last = T),
    ``max_seqlen`` >= the longest sequence. Segments, offsets and causality restart at each
    sequence's first token; dropout uses the sequence index as the batch index. A zero-length
    sequence is allowed. Returns ``out`` ``[T, H, D]``, or ``(out, lse)`` with ``lse`` ``[H, T]``.
    ``validate=False`` skips the check of cu_seqlens' values (undefined behaviour on bad ones).
    On Hopper GPUs (bf16/fp16, head dim 64 or 128) the kernels load by TMA when T is a multiple of
    every dilation rate, else row by row (the same result, slower)."""
    _check_packed(q, k, v, cu_seqlens, max_seqlen)
    segment_lengths, dilation_rates = _ops.check_config(segment_lengths, dilation_rates)
    mode, scale, dropout_p = _ops.check_mode(mode), _ops.check_scale(scale), _ops.check_dropout(dropout_p)
    seed = _ops.draw_dropout_seed() if dropout_p > 0.0 else 0
    out, lse = _DilatedVarlenFunction.apply(q, k, v, cu_seqlens, max_seqlen, bool(validate), segment_lengths,
                                            dilation_rates, is_causal, scale, mode, dropout_p, seed)
    return (out, lse) if return_lse else out


class _BlockSparseVarlenFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, validate, pattern, block_size, is_causal, scale, dropout_p,
                seed):
        out, lse = _outputs(q)
        config = (block_size, bool(is_causal), scale, float(dropout_p), int(seed))
        _C.block_sparse_forward_varlen(pattern, *(_ops._view(t) for t in (q, k, v, out, lse)),
                                       _ops._view(cu_seqlens), max_seqlen, validate, *config)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.packed_config = (pattern, max_seqlen, validate, config)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        pattern, max_seqlen, validate, config = ctx.packed_config
        dout, grads = _gradients(grad_out, out, q, k, v)
        _C.block_sparse_backward_varlen(pattern, *(_ops._view(t) for t in (q, k, v, out, lse, dout, *grads)),
                                        _ops._view(cu_seqlens), max_seqlen, validate, *config)
        return grads + (None,) * 9


def block_sparse_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, pattern,
                                  block_size: int, is_causal: bool = False, scale: Optional[float] = None,
                                  dropout_p: float = 0.0, return_lse: bool = False, validate: bool = True):
    """Block-sparse attention of each sequence of a packed batch (layout as in
    ``dilated_attention_varlen``) with the mask that ``pattern`` (a ``SparsePatternConfig`` of type
    local_window, dilated_sparse or global_local, whose ``block_size`` equals ``block_size``) names
    for the sequence's length; block positions restart at each sequence's first token."""
    from dattn.sparse import SparsePatternConfig

    _check_packed(q, k, v, cu_seqlens, max_seqlen)
    if not isinstance(pattern, SparsePatternConfig):
        raise TypeError(f"pattern is {type(pattern).__name__}; expected a dattn.SparsePatternConfig (a named pattern; "
                        "an explicit block mask has no meaning across sequences of different lengths)")
    if pattern.pattern_type == "dilated":
        raise ValueError("pattern.pattern_type = 'dilated' needs segment lengths and dilation rates; expected "
                         "local_window, dilated_sparse or global_local (or dilated_attention_varlen)")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size != pattern.block_size:
        raise ValueError(f"block_size = {block_size!r} but pattern.block_size = {pattern.block_size}; expected equal")
    scale, dropout_p = _ops.check_scale(scale), _ops.check_dropout(dropout_p)
    spec = (pattern.pattern_type, pattern.window_size, pattern.global_tokens, list(pattern.dilation_rates))
    seed = _ops.draw_dropout_seed() if dropout_p > 0.0 else 0
    out, lse = _BlockSparseVarlenFunction.apply(q, k, v, cu_seqlens, max_seqlen, bool(validate), spec, block_size,
                                                is_causal, scale, dropout_p, seed)
    return (out, lse) if return_lse else out
