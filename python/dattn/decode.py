"""Decoding with a key/value cache: the attention of new tokens over a sequence's cached keys,
causal by definition, dilated attention in either mode. Per new token a branch reads only the
keys it selects in the token's segment, never the whole cache. CPU and CUDA tensors (on CUDA,
cache_seqlens stays on the device; ``validate=True`` copies it to the host once to check it).
Inference only: there is no backward."""

from typing import Optional, Sequence

import torch
from torch import Tensor

from dattn import _C, _ops

__all__ = ["dilated_attention_with_kvcache", "KVCache"]


def _check_decode(q, k_cache, v_cache, cache_seqlens, k_new, v_new):
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("cache_seqlens", cache_seqlens)):
        _ops._check_tensor(name, t)
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 4:
            raise ValueError(f"{name} has shape {list(t.shape)}; expected a 4-D tensor "
                             f"({'[B, Tn, H, D]' if name == 'q' else '[B, Nmax, Hkv, D]'})")
    if q.dtype not in _ops.ATTENTION_DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; expected torch.float32, torch.bfloat16 or torch.float16")
    _ops.check_kv_heads(q, k_cache)
    if (k_new is None) != (v_new is None):
        raise ValueError(f"{'k_new' if k_new is not None else 'v_new'} is given without "
                         f"{'v_new' if k_new is not None else 'k_new'}; expected both or neither")
    named = [("k_cache", k_cache), ("v_cache", v_cache)] + ([("k_new", k_new), ("v_new", v_new)] if k_new is not None
                                                           else [])
    for name, t in named:
        _ops._check_tensor(name, t)
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}; expected {q.dtype} (the dtype of q)")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}; expected {q.device} (the device of q)")
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name} requires grad; decoding has no backward (expected torch.no_grad() or "
                             "torch.inference_mode())")
    if q.requires_grad and torch.is_grad_enabled():
        raise ValueError("q requires grad; decoding has no backward (expected torch.no_grad() or "
                         "torch.inference_mode())")
    if cache_seqlens.dtype != torch.int32 or cache_seqlens.dim() != 1:
        raise ValueError(f"cache_seqlens has dtype {cache_seqlens.dtype} and shape {list(cache_seqlens.shape)}; "
                         "expected an int32 [B] tensor")


def dilated_attention_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                                   segment_lengths: Sequence[int], dilation_rates: Sequence[int],
                                   k_new: Optional[Tensor] = None, v_new: Optional[Tensor] = None,
                                   scale: Optional[float] = None, mode: str = "grouped", return_lse: bool = False,
                                   validate: bool = True):
    """Causal dilated attention of the new tokens q ``[B, Tn, H, D]`` over each sequence's cache
    (``k_cache``, ``v_cache`` ``[B, Nmax, Hkv, D]``, ``cache_seqlens`` int32 ``[B]``, never modified).
    With ``k_new``, ``v_new`` ``[B, Tn, Hkv, D]`` they are first written into the cache at rows
    ``cache_seqlens[b] ..`` and ``L = cache_seqlens[b] + Tn``; without them ``L = cache_seqlens[b]``.
    Returns rows ``L - Tn .. L - 1`` of causal attention over the first L positions (``out``
    ``[B, Tn, H, D]``, and ``lse`` ``[B, H, Tn]`` with ``return_lse=True``). ``validate=False``
    skips the check of cache_seqlens' values (undefined behaviour on bad ones)."""
    _check_decode(q, k_cache, v_cache, cache_seqlens, k_new, v_new)
    segment_lengths, dilation_rates = _ops.check_config(segment_lengths, dilation_rates)
    mode, scale = _ops.check_mode(mode), _ops.check_scale(scale)
    B, Tn, H, D = q.shape
    out = q.new_empty((B, Tn, H, D))
    lse = q.new_empty((B, H, Tn), dtype=torch.float32)
    new = (None, None) if k_new is None else (_ops._view(k_new), _ops._view(v_new))
    views = (_ops._view(q), _ops._view(k_cache), _ops._view(v_cache), _ops._view(cache_seqlens))
    # CUDA: the split-KV kernels' scratch from PyTorch's caching allocator (without it each call
    # would allocate it in stream order, again after every synchronisation).
    nbytes = _C.decode_workspace_bytes(*views, segment_lengths, dilation_rates, mode, scale) if q.is_cuda else 0
    workspace = q.new_empty(nbytes, dtype=torch.uint8) if nbytes else None
    _C.forward_with_kvcache(*views, *new, _ops._view(out), _ops._view(lse), bool(validate), segment_lengths,
                            dilation_rates, mode, scale, "automatic", _ops._stream(q),
                            workspace=0 if workspace is None else workspace.data_ptr(), workspace_bytes=nbytes)
    return (out, lse) if return_lse else out


class KVCache:
    """A multi-head module's key/value cache for token-by-token decoding: ``k``, ``v``
    ``[B, max_len, Hkv, D]`` and ``seqlens`` (int32 ``[B]``, the tokens each sequence holds),
    filled and read by the module's ``decode``. Make one per layer with ``module.new_cache``."""

    def __init__(self, batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype=None, device=None):
        self.k = torch.zeros(batch, max_len, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)

    @property
    def max_len(self) -> int:
        return self.k.size(1)
