"""The bridge between torch tensors and the C++ core (dattn._C), and the autograd glue.

Tensors cross as raw descriptions (data pointer, dtype, device, sizes, strides), so nothing is
copied: q, k and v may be strided views of one fused QKV buffer. CUDA work runs on torch's
current stream of the tensors' device.

Two autograd paths run the same C++ calls:
- ``torch.autograd.Function`` subclasses, for eager calls on every torch (1.13 on), with the least
  per-call overhead;
- on torch >= 2.4 also custom operators (``torch.ops.dattn.*``, via ``torch.library.custom_op``)
  with fake implementations and registered autograd, taken while torch.compile/export traces the
  call or for tensor subclasses (fake, functional), so a compiled graph keeps dattn as one node.
An eager call with no gradient to record (no_grad, or no input requiring grad) takes neither and
calls the C++ core directly (see _needs_function).
"""

import math
import operator
from typing import List, NoReturn, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.autograd.function import once_differentiable

from dattn import _C

__all__ = ["HAS_CUSTOM_OPS", "attention_forward", "attention_qkvpacked_forward", "draw_dropout_seed",
           "check_config"]

# Not only hasattr: 2.4 is the first release whose custom_op has register_autograd.
HAS_CUSTOM_OPS = hasattr(torch, "library") and hasattr(torch.library, "custom_op") and \
    hasattr(torch.library, "register_autograd")

_DTYPE_CODES = {
    torch.float32: _C.DTYPE_FLOAT32,
    torch.bfloat16: _C.DTYPE_BFLOAT16,
    torch.float16: _C.DTYPE_FLOAT16,
    torch.float64: _C.DTYPE_FLOAT64,
    torch.bool: _C.DTYPE_BOOL,
    torch.int64: _C.DTYPE_INT64,
    torch.int32: _C.DTYPE_INT32,
}
ATTENTION_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
MODES = ("grouped", "longnet")


# --------------------------------------------------------------------------------------------
# Validation shared by the functional forms and the modules (errors name the argument and the
# expected value; the C++ core checks everything again).

def check_config(segment_lengths, dilation_rates) -> Tuple[List[int], List[int]]:
    """Returns the two lists as lists of ints; raises TypeError/ValueError on a bad config."""
    # The common case in one pass (lists or tuples of ints, of one length, every pair valid); anything
    # else takes the checks below, which name what is wrong.
    if type(segment_lengths) in (list, tuple) and type(dilation_rates) in (list, tuple) and \
            0 < len(segment_lengths) == len(dilation_rates) and \
            all(type(w) is int and type(r) is int and 1 <= r <= w for w, r in zip(segment_lengths, dilation_rates)):
        return list(segment_lengths), list(dilation_rates)
    w = _int_list("segment_lengths", segment_lengths)
    r = _int_list("dilation_rates", dilation_rates)
    if len(w) == 0:
        raise ValueError("segment_lengths is empty; expected at least one segment length")
    if len(w) != len(r):
        raise ValueError(f"segment_lengths has {len(w)} entries but dilation_rates has {len(r)}; "
                         "expected equal lengths")
    for i, (wi, ri) in enumerate(zip(w, r)):
        if not 1 <= ri <= wi:  # also catches wi < 1; the message is built only for a bad pair
            _raise_bad_pair(i, wi, ri)
    return w, r


def _int_list(name: str, values) -> List[int]:
    if type(values) in (list, tuple) and all(type(x) is int for x in values):  # the common case, fast
        return list(values)
    if isinstance(values, Tensor):
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} is {type(values).__name__}; expected a sequence of ints")
    out = []
    for x in values:
        try:
            if isinstance(x, bool):
                raise TypeError
            out.append(operator.index(x))
        except TypeError:
            raise TypeError(f"{name} holds {x!r} ({type(x).__name__}); expected ints") from None
    return out


def _raise_bad_pair(i: int, segment_length: int, dilation_rate: int) -> NoReturn:
    pair = f"(segment_lengths[{i}] = {segment_length}, dilation_rates[{i}] = {dilation_rate})"
    if segment_length < 1:
        raise ValueError(f"segment length must be >= 1 in {pair}")
    raise ValueError(f"dilation rate must be in [1, segment length] in {pair}")


def check_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError(f"mode = {mode!r}; expected 'grouped' or 'longnet'")
    return mode


def check_dropout(p, name="dropout_p") -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{name} is {type(p).__name__}; expected a float in [0, 1)")
    p = float(p)
    if not (0.0 <= p < 1.0):
        raise ValueError(f"{name} = {p}; expected 0 <= {name} < 1")
    return p


def check_scale(scale) -> Optional[float]:
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale is {type(scale).__name__}; expected a float or None (1/sqrt(D))")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale = {scale}; expected a finite number")
    return scale


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} is {type(t).__name__}; expected a torch.Tensor")


def check_attention_inputs(q, k, v) -> None:
    """q: [B, N, H, D]; k, v: [B, N, Hkv, D] with H % Hkv == 0 (grouped-query heads; Hkv = H
    without); one float dtype, one device, stride 1 along D."""
    if _common_valid_inputs(q, k, v):
        return
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t)
    if q.dim() != 4:
        raise ValueError(f"q has shape {list(q.shape)}; expected a 4-D [B, N, H, D] tensor")
    check_dtypes_and_devices(q, k, v)
    check_kv_heads(q, k)
    for name, t in (("k", k), ("v", v)):
        expected = list(q.shape[:2]) + [k.size(2)] + [q.size(3)]
        if list(t.shape) != expected:
            raise ValueError(f"{name} has shape {list(t.shape)}; expected {expected} (q's B, N, D and k's Hkv heads)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(3) != 1 and t.size(3) != 1:
            raise ValueError(f"{name} has stride {t.stride(3)} along D; expected 1 (the head dim must be "
                             "contiguous; call .contiguous() first)")
    if q.numel() == 0:
        raise ValueError(f"q has shape {list(q.shape)}; expected every extent >= 1")
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"q is on {q.device}; expected a cpu or cuda tensor")


def _common_valid_inputs(q, k, v) -> bool:
    """True when plain tensors q, k, v pass every check of check_attention_inputs, found with few
    attribute reads (at small shapes the full checks cost about as much as the kernel). False for
    anything else: the full checks then find what is wrong and name it."""
    if type(q) is not Tensor or type(k) is not Tensor or type(v) is not Tensor:
        return False
    q_shape, kv_shape = q.shape, k.shape
    if len(q_shape) != 4 or len(kv_shape) != 4 or v.shape != kv_shape:
        return False
    B, N, H, D = q_shape
    kv_heads = kv_shape[2]
    return (kv_shape[0] == B and kv_shape[1] == N and kv_shape[3] == D and kv_heads >= 1 and H % kv_heads == 0
            and q.dtype in ATTENTION_DTYPES and k.dtype == q.dtype and v.dtype == q.dtype
            and q.device == k.device == v.device and (q.is_cpu or q.is_cuda)
            and (D == 1 or (q.stride(3) == 1 and k.stride(3) == 1 and v.stride(3) == 1)) and q.numel() > 0)


def check_dtypes_and_devices(q: Tensor, k: Tensor, v: Tensor) -> None:
    """q of an attention dtype; k and v of q's dtype and on q's device."""
    if q.dtype not in ATTENTION_DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; expected torch.float32, torch.bfloat16 or torch.float16 "
                        "(torch.float64 runs the reference implementation)")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}; expected {q.dtype} (the dtype of q)")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}; expected {q.device} (the device of q)")


def check_kv_heads(q, k) -> int:
    """The key/value heads Hkv of k: a divisor of q's H (query head h reads head h // (H / Hkv))."""
    if k.dim() != q.dim():
        raise ValueError(f"k has shape {list(k.shape)}; expected {q.dim()} dimensions like q {list(q.shape)}")
    H, kv_heads = q.size(-2), k.size(-2)
    if kv_heads < 1 or H % kv_heads != 0:
        raise ValueError(f"k has {kv_heads} heads and q has H = {H}; expected a number of key/value heads Hkv "
                         "that divides H (grouped-query heads)")
    return kv_heads


def check_key_padding_mask(mask, batch: int, seqlen: int, device) -> None:
    if mask is None:
        return
    _check_tensor("key_padding_mask", mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask has dtype {mask.dtype}; expected torch.bool (True = padding)")
    if mask.dim() != 2 or mask.size(0) != batch or mask.size(1) != seqlen:
        raise ValueError(f"key_padding_mask has shape {list(mask.shape)}; expected [{batch}, {seqlen}] ([B, N])")
    if mask.device != device:
        raise ValueError(f"key_padding_mask is on {mask.device}; expected {device} (the device of q)")


def _run_eagerly(fn):
    # torch.compile must not trace the draw into its graph (a compiler may swap in its own random
    # number generator): a graph break runs it eagerly on torch's default CPU generator.
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn


@_run_eagerly
def draw_dropout_seed() -> int:
    """docs/semantics.md: one draw per call on torch's default CPU generator, so torch.manual_seed repeats it."""
    return int(torch.randint(0, 2 ** 62, (1,)).item())


# --------------------------------------------------------------------------------------------
# Calls into C++ on real tensors.

def _view(t: Tensor):
    # is_cuda and get_device() instead of t.device, which builds a torch.device object per call.
    # Any device but CUDA crosses as the CPU (the core refuses what it cannot read). torch.Size is
    # a tuple, which the binding takes as it is.
    if t.is_cuda:
        return (t.data_ptr(), _DTYPE_CODES[t.dtype], _C.DEVICE_CUDA, t.get_device(), t.shape, t.stride())
    return (t.data_ptr(), _DTYPE_CODES[t.dtype], _C.DEVICE_CPU, 0, t.shape, t.stride())


_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _stream(t: Tensor) -> int:
    # CUDA: torch's current stream on the tensor's device (the C++ core makes that device current
    # for the launch). CPU: no stream. The raw handle where torch offers it: a Stream object costs
    # microseconds that show at small shapes.
    if not t.is_cuda:
        return 0
    if _RAW_STREAM is not None:
        return _RAW_STREAM(t.get_device())  # a CUDA tensor always has its device index
    return torch.cuda.current_stream(t.device).cuda_stream


def _config_args(key_padding_mask, segment_lengths, dilation_rates, is_causal, scale, mode, dropout_p, seed,
                 use_tf32, stream, position_index=None):
    # The binding's arguments after the tensors, in its order (forward and backward alike). The
    # values arrive converted (lists of ints, bools, a float, an int: attention_forward and hilbert
    # convert them).
    return (segment_lengths, dilation_rates, mode, is_causal, scale,
            None if key_padding_mask is None else _view(key_padding_mask), dropout_p, seed, 0, use_tf32, "automatic",
            stream, None if position_index is None else _view(position_index))


def _forward_impl(q, k, v, key_padding_mask, segment_lengths, dilation_rates, is_causal, scale, mode,
                   dropout_p, seed, use_tf32, position_index=None, position_index_checked=False) -> Tuple[Tensor, Tensor]:
    B, N, H, D = shape = q.shape
    # new_empty: q's dtype and device without building them as Python objects (half the host time of
    # torch.empty with dtype= and device= arguments).
    out = q.new_empty(shape)
    lse = q.new_empty((B, H, N), dtype=torch.float32)
    q_view = _view(q)
    # out and lse: new contiguous tensors on q's device, described without reading them back.
    out_view = (out.data_ptr(), q_view[1], q_view[2], q_view[3], shape, (N * H * D, H * D, D, 1))
    lse_view = (lse.data_ptr(), _C.DTYPE_FLOAT32, q_view[2], q_view[3], (B, H, N), (H * N, N, 1))
    # position_index_checked: a CUDA index map dattn made itself (a Hilbert order), which the core
    # then does not re-check (the check copies it to the host and synchronises). ring_step: None.
    _C.forward(q_view, _view(k), _view(v), out_view, lse_view,
               *_config_args(key_padding_mask, segment_lengths, dilation_rates, is_causal, scale, mode, dropout_p,
                             seed, use_tf32, _stream(q), position_index),
               None, position_index_checked and position_index is not None)
    return out, lse


def _gradient(dout: Optional[Tensor], out: Tensor) -> Tensor:
    # Autograd may hand an expanded (zero-stride) or otherwise strided gradient, e.g. for out.sum();
    # docs/semantics.md: the wrapper makes it contiguous instead of refusing it.
    if dout is None:
        return torch.zeros_like(out, memory_format=torch.contiguous_format)
    dout = dout.contiguous()
    if dout.is_cuda and dout.data_ptr() % 16 != 0:
        dout = dout.clone()  # the GPU kernels load 16 bytes at a time
    return dout


def _delta_workspace(q: Tensor):
    """The backward's delta workspace for CUDA tensors: a float32 per query row and head (q's B·N·H,
    or T·H of a packed batch) from PyTorch's caching allocator, cheap and valid for the kernels queued
    on this stream. Returns the tensor, which the caller holds through the call, and the call's
    workspace arguments; on the CPU, none."""
    if not q.is_cuda:
        return None, dict(workspace=0, workspace_bytes=0)
    workspace = q.new_empty(q.numel() // q.size(-1), dtype=torch.float32)
    return workspace, dict(workspace=workspace.data_ptr(), workspace_bytes=4 * workspace.numel())


def _backward_views(dout, q, k, v, out, lse, dq, dk, dv, key_padding_mask, segment_lengths, dilation_rates,
                    is_causal, scale, mode, dropout_p, seed, use_tf32, position_index=None,
                    position_index_checked=False) -> None:
    workspace, workspace_args = _delta_workspace(q)  # workspace: referenced until the call returns
    _C.backward(_view(q), _view(k), _view(v), _view(out), _view(lse), _view(dout), _view(dq), _view(dk), _view(dv),
                *_config_args(key_padding_mask, segment_lengths, dilation_rates, is_causal, scale, mode, dropout_p,
                              seed, use_tf32, _stream(q), position_index),
                **workspace_args, position_index_checked=position_index_checked and position_index is not None,
                deterministic=torch.are_deterministic_algorithms_enabled())


def _backward_impl(dout, q, k, v, out, lse, key_padding_mask, segment_lengths, dilation_rates, is_causal, scale,
                   mode, dropout_p, seed, use_tf32, position_index=None, position_index_checked=False):
    dout = _gradient(dout, out)
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    _backward_views(dout, q, k, v, out, lse, dq, dk, dv, key_padding_mask, segment_lengths, dilation_rates,
                    is_causal, scale, mode, dropout_p, seed, use_tf32, position_index, position_index_checked)
    return dq, dk, dv


def _forward_qkv_impl(qkv, key_padding_mask, segment_lengths, dilation_rates, is_causal, scale, mode, dropout_p,
                      seed, use_tf32):
    # q, k, v are strided views of the packed [B, N, 3, H, D] buffer: no copy.
    return _forward_impl(qkv.select(2, 0), qkv.select(2, 1), qkv.select(2, 2), key_padding_mask, segment_lengths,
                          dilation_rates, is_causal, scale, mode, dropout_p, seed, use_tf32)


def _backward_qkv_impl(dout, qkv, out, lse, key_padding_mask, segment_lengths, dilation_rates, is_causal, scale,
                       mode, dropout_p, seed, use_tf32):
    dout = _gradient(dout, out)
    # One [B, N, 3, H, D] gradient buffer, written through three views: the gradient of the
    # projection output needs no gather.
    dqkv = qkv.new_empty(qkv.shape)
    _backward_views(dout, qkv.select(2, 0), qkv.select(2, 1), qkv.select(2, 2), out, lse, dqkv.select(2, 0),
                    dqkv.select(2, 1), dqkv.select(2, 2), key_padding_mask, segment_lengths, dilation_rates,
                    is_causal, scale, mode, dropout_p, seed, use_tf32)
    return dqkv


# --------------------------------------------------------------------------------------------
# Autograd. Eager calls that record a gradient go through torch.autograd.Function (least
# per-call overhead); on torch >= 2.4 the same computation is also registered as custom operators,
# which are used whenever torch.compile / export traces the call or the tensors are not plain
# tensors (fake, functional or other subclasses), so a compiled graph keeps dattn as one node.

class _DilatedAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, segment_lengths, dilation_rates, is_causal, scale, mode,
                dropout_p, seed, use_tf32):
        out, lse = _forward_impl(q, k, v, key_padding_mask, segment_lengths, dilation_rates, is_causal, scale,
                                 mode, dropout_p, seed, use_tf32)
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
        ctx.config = (segment_lengths, dilation_rates, is_causal, scale, mode, dropout_p, seed, use_tf32)
        ctx.mark_non_differentiable(lse)
        # No zeros for the gradient of lse (never used) or of an unused out: backward takes None.
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
        dq, dk, dv = _backward_impl(grad_out, q, k, v, out, lse, key_padding_mask, *ctx.config)
        return (dq, dk, dv) + (None,) * 9


class _DilatedAttentionQKVPackedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, key_padding_mask, segment_lengths, dilation_rates, is_causal, scale, mode, dropout_p,
                seed, use_tf32):
        out, lse = _forward_qkv_impl(qkv, key_padding_mask, segment_lengths, dilation_rates, is_causal, scale,
                                     mode, dropout_p, seed, use_tf32)
        ctx.save_for_backward(qkv, out, lse, key_padding_mask)
        ctx.config = (segment_lengths, dilation_rates, is_causal, scale, mode, dropout_p, seed, use_tf32)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_lse):
        qkv, out, lse, key_padding_mask = ctx.saved_tensors
        dqkv = _backward_qkv_impl(grad_out, qkv, out, lse, key_padding_mask, *ctx.config)
        return (dqkv,) + (None,) * 9


if HAS_CUSTOM_OPS:
    @torch.library.custom_op("dattn::dilated_attention_forward", mutates_args=())
    def _op_forward(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], segment_lengths: List[int],
                    dilation_rates: List[int], is_causal: bool, scale: Optional[float], mode: str, dropout_p: float,
                    seed: int, use_tf32: bool) -> Tuple[Tensor, Tensor]:
        return _forward_impl(q, k, v, key_padding_mask, segment_lengths, dilation_rates, is_causal, scale, mode,
                             dropout_p, seed, use_tf32)

    @_op_forward.register_fake
    def _(q, k, v, key_padding_mask, segment_lengths, dilation_rates, is_causal, scale, mode, dropout_p, seed,
          use_tf32):
        B, N, H, D = q.shape
        return q.new_empty((B, N, H, D)), q.new_empty((B, H, N), dtype=torch.float32)

    @torch.library.custom_op("dattn::dilated_attention_backward", mutates_args=())
    def _op_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                     key_padding_mask: Optional[Tensor], segment_lengths: List[int], dilation_rates: List[int],
                     is_causal: bool, scale: Optional[float], mode: str, dropout_p: float, seed: int,
                     use_tf32: bool) -> Tuple[Tensor, Tensor, Tensor]:
        return _backward_impl(dout, q, k, v, out, lse, key_padding_mask, segment_lengths, dilation_rates, is_causal,
                              scale, mode, dropout_p, seed, use_tf32)

    @_op_backward.register_fake
    def _(dout, q, k, v, out, lse, key_padding_mask, segment_lengths, dilation_rates, is_causal, scale, mode,
          dropout_p, seed, use_tf32):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def _setup_forward(ctx, inputs, output):
        q, k, v, key_padding_mask = inputs[:4]
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
        ctx.config = tuple(inputs[4:])

    def _autograd_forward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
        dout = _gradient(grad_out, out)
        dq, dk, dv = torch.ops.dattn.dilated_attention_backward(dout, q, k, v, out, lse, key_padding_mask,
                                                                *ctx.config)
        return (dq, dk, dv) + (None,) * 9

    _op_forward.register_autograd(_autograd_forward, setup_context=_setup_forward)

    @torch.library.custom_op("dattn::dilated_attention_qkvpacked_forward", mutates_args=())
    def _op_qkv_forward(qkv: Tensor, key_padding_mask: Optional[Tensor], segment_lengths: List[int],
                        dilation_rates: List[int], is_causal: bool, scale: Optional[float], mode: str,
                        dropout_p: float, seed: int, use_tf32: bool) -> Tuple[Tensor, Tensor]:
        return _forward_qkv_impl(qkv, key_padding_mask, segment_lengths, dilation_rates, is_causal, scale, mode,
                                 dropout_p, seed, use_tf32)

    @_op_qkv_forward.register_fake
    def _(qkv, key_padding_mask, segment_lengths, dilation_rates, is_causal, scale, mode, dropout_p, seed, use_tf32):
        B, N, _, H, D = qkv.shape
        return qkv.new_empty((B, N, H, D)), qkv.new_empty((B, H, N), dtype=torch.float32)

    @torch.library.custom_op("dattn::dilated_attention_qkvpacked_backward", mutates_args=())
    def _op_qkv_backward(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, key_padding_mask: Optional[Tensor],
                         segment_lengths: List[int], dilation_rates: List[int], is_causal: bool,
                         scale: Optional[float], mode: str, dropout_p: float, seed: int, use_tf32: bool) -> Tensor:
        return _backward_qkv_impl(dout, qkv, out, lse, key_padding_mask, segment_lengths, dilation_rates, is_causal,
                                  scale, mode, dropout_p, seed, use_tf32)

    @_op_qkv_backward.register_fake
    def _(dout, qkv, out, lse, key_padding_mask, segment_lengths, dilation_rates, is_causal, scale, mode, dropout_p,
          seed, use_tf32):
        return qkv.new_empty(qkv.shape)

    def _setup_qkv_forward(ctx, inputs, output):
        qkv, key_padding_mask = inputs[:2]
        out, lse = output
        ctx.save_for_backward(qkv, out, lse, key_padding_mask)
        ctx.config = tuple(inputs[2:])

    def _autograd_qkv_forward(ctx, grad_out, grad_lse):
        qkv, out, lse, key_padding_mask = ctx.saved_tensors
        dout = _gradient(grad_out, out)
        dqkv = torch.ops.dattn.dilated_attention_qkvpacked_backward(dout, qkv, out, lse, key_padding_mask,
                                                                    *ctx.config)
        return (dqkv,) + (None,) * 9

    _op_qkv_forward.register_autograd(_autograd_qkv_forward, setup_context=_setup_qkv_forward)


# Looked up once: every eager call asks.
_IS_COMPILING = getattr(getattr(torch, "compiler", None), "is_compiling", None)


def _compiling() -> bool:
    return bool(_IS_COMPILING()) if _IS_COMPILING is not None else False


def _use_custom_ops(t: Tensor) -> bool:
    return HAS_CUSTOM_OPS and (type(t) is not Tensor or _compiling())


# A torch that cannot say whether a functorch transform (vmap, grad, jvp) or a forward-mode dual
# level is active counts as one that has them active: the Function path, as before.
_FUNCTORCH_TRANSFORMS_ACTIVE = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)


def _needs_function(inputs_require_grad: bool) -> bool:
    """Whether an eager call must go through the autograd.Function: a gradient to record, or a
    forward-mode dual level, functorch transform or torch.compile trace (each refuses or handles the
    Function its own way). Otherwise apply() adds only its cost (torch 2: microseconds per call)."""
    return (inputs_require_grad and torch.is_grad_enabled()) or getattr(forward_ad, "_current_level", 0) >= 0 \
        or _FUNCTORCH_TRANSFORMS_ACTIVE() or _compiling()


def attention_forward(q, k, v, key_padding_mask, segment_lengths, dilation_rates, is_causal, scale, mode, dropout_p,
                      seed, use_tf32) -> Tuple[Tensor, Tensor]:
    """Validated arguments in, (out, lse) out; lse carries no gradient."""
    args = (q, k, v, key_padding_mask, list(segment_lengths), list(dilation_rates), bool(is_causal), scale, mode,
            float(dropout_p), int(seed), bool(use_tf32))
    if _use_custom_ops(q):
        out, lse = torch.ops.dattn.dilated_attention_forward(*args)
        return out, lse.detach()
    if _needs_function(q.requires_grad or k.requires_grad or v.requires_grad):
        return _DilatedAttentionFunction.apply(*args)
    return _forward_impl(*args)


def attention_qkvpacked_forward(qkv, key_padding_mask, segment_lengths, dilation_rates, is_causal, scale, mode,
                                dropout_p, seed, use_tf32) -> Tuple[Tensor, Tensor]:
    args = (qkv, key_padding_mask, list(segment_lengths), list(dilation_rates), bool(is_causal), scale, mode,
            float(dropout_p), int(seed), bool(use_tf32))
    if _use_custom_ops(qkv):
        out, lse = torch.ops.dattn.dilated_attention_qkvpacked_forward(*args)
        return out, lse.detach()
    if _needs_function(qkv.requires_grad):
        return _DilatedAttentionQKVPackedFunction.apply(*args)
    return _forward_qkv_impl(*args)
