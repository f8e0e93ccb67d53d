"""Modules with the PyTorch LongNet library's names and arguments (docs/semantics.md "Multi-head modules",
"Functional forms and return values"), so swapping the import swaps the implementation."""

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dattn import _ops
from dattn.decode import KVCache, dilated_attention_with_kvcache
from dattn.functional import dilated_attention
from dattn.ring import check_group, ring_dilated_attention

__all__ = ["DilatedAttention", "ImprovedDilatedAttention", "MultiheadDilatedAttention",
           "ImprovedMultiheadDilatedAttention"]

NORM_STYLES = ("sub_ln", "longnet_pytorch")

def _check_group(group, layout) -> None:
    check_group(group, layout)


class DilatedAttention(nn.Module):
    """Dilated attention over q, k, v ``[B, N, H, D]`` (no parameters).

    ``forward(q, k, v, is_causal=False, key_padding_mask=None)`` returns ``out`` ``[B, N, H, D]``.
    Attention dropout ``attention_dropout`` applies in training mode only.
    """

    def __init__(self, segment_lengths: Sequence[int], dilation_rates: Sequence[int],
                 softmax_scale: Optional[float] = None, attention_dropout: float = 0.0, mode: str = "grouped",
                 use_tf32: bool = False, group=None, layout: str = "contiguous"):
        super().__init__()
        _check_group(group, layout)
        self.segment_lengths, self.dilation_rates = _ops.check_config(segment_lengths, dilation_rates)
        self.softmax_scale = _ops.check_scale(softmax_scale)
        self.attention_dropout = _ops.check_dropout(attention_dropout, "attention_dropout")
        self.mode = _ops.check_mode(mode)
        self.use_tf32 = bool(use_tf32)
        self.group = group
        self.layout = layout

    def forward(self, q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False,
                key_padding_mask: Optional[Tensor] = None) -> Tensor:
        if self.group is not None:
            return ring_dilated_attention(q, k, v, self.segment_lengths, self.dilation_rates, self.group, self.layout,
                                          is_causal, self.softmax_scale, self.mode, key_padding_mask,
                                          self.attention_dropout if self.training else 0.0)
        return dilated_attention(q, k, v, self.segment_lengths, self.dilation_rates, is_causal=is_causal,
                                 scale=self.softmax_scale, mode=self.mode, key_padding_mask=key_padding_mask,
                                 dropout_p=self.attention_dropout if self.training else 0.0,
                                 use_tf32=self.use_tf32)

    def extra_repr(self) -> str:
        return (f"segment_lengths={self.segment_lengths}, dilation_rates={self.dilation_rates}, "
                f"softmax_scale={self.softmax_scale}, attention_dropout={self.attention_dropout}, "
                f"mode={self.mode!r}, use_tf32={self.use_tf32}")


class ImprovedDilatedAttention(DilatedAttention):
    """The library's name for its fast variant; here the same (correct) fused function as
    ``DilatedAttention``, with the library's signature."""

    def __init__(self, segment_lengths: Sequence[int], dilation_rates: Sequence[int], dropout: float = 0.0,
                 use_tf32: bool = False, group=None, layout: str = "contiguous"):
        super().__init__(segment_lengths, dilation_rates, softmax_scale=None,
                         attention_dropout=_ops.check_dropout(dropout, "dropout"), mode="grouped", use_tf32=use_tf32,
                         group=group, layout=layout)

    @property
    def dropout(self) -> float:
        return self.attention_dropout


class MultiheadDilatedAttention(nn.Module):
    """Multi-head dilated attention, MAGNETO style (the library's ``MultiheadDilatedAttention``).

    Inputs ``[B, N, E]``: ``q = query Wqᵀ + bq`` (likewise k, v), split into ``num_heads`` heads,
    dilated attention (dropout ``dropout`` on the probabilities, training only), heads merged,
    sub-LayerNorm over E (``layer_norm``), then ``out_proj``. Parameters ``q_proj``, ``k_proj``,
    ``v_proj``, ``out_proj`` (Linear) and ``norm`` (LayerNorm, None without ``layer_norm``).

    ``norm_style="longnet_pytorch"`` (with ``layer_norm``) instead normalises the projected q with
    ``q_ln`` and k with ``k_ln`` before attention and applies ``q_ln`` again to the attention output
    before ``out_proj`` (that library's unfused module, whose checkpoints then load strictly).
    """

    def __init__(self, embed_dim: int, num_heads: int, dilation_rates: Sequence[int], segment_lengths: Sequence[int],
                 dropout: float = 0.0, bias: bool = True, layer_norm: bool = True, layer_norm_eps: float = 1e-5,
                 gamma_init: float = 1.0, device=None, dtype=None, mode: str = "grouped", group=None,
                 layout: str = "contiguous", *, norm_style: str = "sub_ln", num_kv_heads: Optional[int] = None):
        super().__init__()
        self._init_common(embed_dim, num_heads, dilation_rates, segment_lengths, dropout, bias, layer_norm,
                          layer_norm_eps, gamma_init, mode, False, group, layout, norm_style, num_kv_heads)
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, self.kv_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, self.kv_dim, bias=bias, **factory)
        self._init_tail(factory)
        self._reset_parameters()

    # -- shared by the fused variant ---------------------------------------------------------
    def _init_common(self, embed_dim, num_heads, dilation_rates, segment_lengths, dropout, bias, layer_norm,
                     layer_norm_eps, gamma_init, mode, use_tf32, group, layout, norm_style, num_kv_heads):
        _check_group(group, layout)
        if norm_style not in NORM_STYLES:
            raise ValueError(f"norm_style = {norm_style!r}; expected 'sub_ln' or 'longnet_pytorch'")
        self.norm_style = norm_style
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} is {type(value).__name__}; expected an int")
            if value < 1:
                raise ValueError(f"{name} = {value}; expected >= 1")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim = {embed_dim} is not divisible by num_heads = {num_heads}; expected a "
                             "multiple of num_heads")
        if num_kv_heads is None:
            num_kv_heads = num_heads
        if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int):
            raise TypeError(f"num_kv_heads is {type(num_kv_heads).__name__}; expected an int or None (num_heads)")
        if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
            raise ValueError(f"num_kv_heads = {num_kv_heads} does not divide num_heads = {num_heads}; expected a "
                             "divisor of num_heads (grouped-query heads)")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.kv_dim = num_kv_heads * self.head_dim  # rows of Wk and of Wv
        self.segment_lengths, self.dilation_rates = _ops.check_config(segment_lengths, dilation_rates)
        self.dropout = _ops.check_dropout(dropout, "dropout")
        self.bias = bool(bias)
        self.layer_norm = bool(layer_norm)
        self.layer_norm_eps = float(layer_norm_eps)
        self.gamma_init = float(gamma_init)
        self.mode = _ops.check_mode(mode)
        self.use_tf32 = bool(use_tf32)
        self.group = group
        self.layout = layout

    def _init_tail(self, factory):
        def layer_norm(width=self.embed_dim):
            return nn.LayerNorm(width, eps=self.layer_norm_eps, **factory)
        if self.norm_style == "longnet_pytorch":
            self.norm = None
            self.q_ln = layer_norm() if self.layer_norm else None
            self.k_ln = layer_norm(self.kv_dim) if self.layer_norm else None  # over the key projection
        else:
            self.norm = layer_norm() if self.layer_norm else None
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim, bias=self.bias, **factory)

    def _reset_parameters(self) -> None:
        # MAGNETO: Xavier-normal, gain 1 for Wq and Wk, gamma_init for Wv and Wout; biases 0.
        for proj, gain in ((self.q_proj, 1.0), (self.k_proj, 1.0), (self.v_proj, self.gamma_init)):
            nn.init.xavier_normal_(proj.weight, gain=gain)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        self._reset_out_proj()

    def _reset_out_proj(self) -> None:
        nn.init.xavier_normal_(self.out_proj.weight, gain=self.gamma_init)
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)
        for norm in (self.norm, getattr(self, "q_ln", None), getattr(self, "k_ln", None)):
            if norm is not None:
                norm.reset_parameters()

    @property
    def _normalises_qk(self) -> bool:
        return self.norm_style == "longnet_pytorch" and self.layer_norm

    def _check_inputs(self, query, key, value, attn_mask, key_padding_mask):
        if attn_mask is not None:
            raise ValueError("attn_mask is not supported by dilated attention; expected attn_mask=None "
                             "(use is_causal=True or key_padding_mask)")
        weight = self.out_proj.weight
        for name, x in (("query", query), ("key", key), ("value", value)):
            if not isinstance(x, Tensor):
                raise TypeError(f"{name} is {type(x).__name__}; expected a torch.Tensor")
            if x.dim() != 3 or x.size(-1) != self.embed_dim:
                raise ValueError(f"{name} has shape {list(x.shape)}; expected [B, N, {self.embed_dim}] "
                                 f"([B, N, embed_dim])")
            if x.shape[:2] != query.shape[:2]:
                raise ValueError(f"{name} has shape {list(x.shape)}; expected [{query.size(0)}, {query.size(1)}, "
                                 f"{self.embed_dim}] (the batch and length of query)")
            if x.device != weight.device:
                raise ValueError(f"{name} is on {x.device}; expected {weight.device} (the device of the module's "
                                 "parameters)")
            if x.dtype != weight.dtype and not _autocast_enabled(x):
                raise TypeError(f"{name} has dtype {x.dtype}; expected {weight.dtype} (the dtype of the module's "
                                "parameters)")

    def _split_heads(self, qkv: Tensor):
        """q [B, N, H, D], k and v [B, N, Hkv, D] as strided views of one [B, N, E + 2·Hkv·D] projection."""
        E, KD, D = self.embed_dim, self.kv_dim, self.head_dim
        q = qkv[..., :E].unflatten(-1, (self.num_heads, D))
        k = qkv[..., E:E + KD].unflatten(-1, (self.num_kv_heads, D))
        v = qkv[..., E + KD:].unflatten(-1, (self.num_kv_heads, D))
        return q, k, v

    def _finish(self, x: Tensor, need_weights: bool):
        B, N = x.shape[:2]
        x = x.reshape(B, N, self.embed_dim)
        if self.norm is not None:
            x = self.norm(x)
        elif self._normalises_qk:
            x = self.q_ln(x)
        x = self.out_proj(x)
        return (x, None) if need_weights else x

    def _attend(self, q, k, v, is_causal, key_padding_mask):
        """Single-process attention, or the ring over self.group (then inputs are this rank's rows).
        The configuration was checked at construction and q, k, v come from the projections, so the
        single-process call goes straight to the op (at small shapes the checks cost more than the
        kernel)."""
        dropout_p = self.dropout if self.training else 0.0
        if self.group is not None:
            return ring_dilated_attention(q, k, v, self.segment_lengths, self.dilation_rates, self.group, self.layout,
                                          is_causal, None, self.mode, key_padding_mask, dropout_p)
        _ops.check_key_padding_mask(key_padding_mask, q.size(0), q.size(1), q.device)
        seed = _ops.draw_dropout_seed() if dropout_p > 0.0 else 0
        return _ops.attention_forward(q, k, v, key_padding_mask, self.segment_lengths, self.dilation_rates, is_causal,
                                      None, self.mode, dropout_p, seed, self.use_tf32)[0]

    def _attend_packed(self, qkv, is_causal, key_padding_mask):
        """_attend of a packed [B, N, 3, H, D] projection: strided q, k, v views, one packed gradient."""
        if self.group is not None:
            return self._attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], is_causal, key_padding_mask)
        dropout_p = self.dropout if self.training else 0.0
        _ops.check_key_padding_mask(key_padding_mask, qkv.size(0), qkv.size(1), qkv.device)
        seed = _ops.draw_dropout_seed() if dropout_p > 0.0 else 0
        return _ops.attention_qkvpacked_forward(qkv, key_padding_mask, self.segment_lengths, self.dilation_rates,
                                                is_causal, None, self.mode, dropout_p, seed, self.use_tf32)[0]

    # -- incremental decoding ------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty key/value cache of ``max_len`` tokens per sequence for ``decode``."""
        weight = self.out_proj.weight
        return KVCache(batch, max_len, self.num_kv_heads, self.head_dim, dtype=weight.dtype, device=weight.device)

    def _project_step(self, x: Tensor):
        """q [B, Tn, H, D] and k, v [B, Tn, Hkv, D] of the new tokens (self-attention)."""
        B, Tn, _ = x.shape
        q, k = self.q_proj(x), self.k_proj(x)
        if self._normalises_qk:
            q, k = self.q_ln(q), self.k_ln(k)
        q = q.view(B, Tn, self.num_heads, self.head_dim)
        k = k.view(B, Tn, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, Tn, self.num_kv_heads, self.head_dim)
        return q, k, v

    def decode(self, x: Tensor, cache: KVCache) -> Tensor:
        """Self-attention of the new tokens x ``[B, Tn, E]`` (causal) over the tokens the cache holds
        and themselves: their keys and values go into ``cache``, whose ``seqlens`` grow by Tn. Equals
        rows ``L - Tn .. L - 1`` of ``forward(whole sequence, is_causal=True)``. Inference only
        (call it under ``torch.no_grad()``); single-process; attention dropout is not applied."""
        if self.group is not None:
            raise ValueError("decode with a process group; expected a single-process module (group=None)")
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache is {type(cache).__name__}; expected a dattn.KVCache (module.new_cache)")
        self._check_inputs(x, x, x, None, None)
        q, k, v = self._project_step(x)
        out = dilated_attention_with_kvcache(q, cache.k, cache.v, cache.seqlens, self.segment_lengths,
                                             self.dilation_rates, k_new=k, v_new=v, mode=self.mode)
        cache.seqlens += x.size(1)
        return self._finish(out, False)

    # ----------------------------------------------------------------------------------------
    def forward(self, query: Tensor, key: Optional[Tensor] = None, value: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = False,
                attn_mask: Optional[Tensor] = None, is_causal: bool = False):
        """Returns the output ``[B, N, E]``, or ``(output, None)`` with ``need_weights=True``."""
        key = query if key is None else key
        value = query if value is None else value
        self._check_inputs(query, key, value, attn_mask, key_padding_mask)
        B, N, _ = query.shape
        heads, kv_heads = (B, N, self.num_heads, self.head_dim), (B, N, self.num_kv_heads, self.head_dim)
        if self._normalises_qk:
            q = self.q_ln(self.q_proj(query)).view(heads)
            k = self.k_ln(self.k_proj(key)).view(kv_heads)
            v = self.v_proj(value).view(kv_heads)
            return self._finish(self._attend(q, k, v, is_causal, key_padding_mask), need_weights)
        if key is query and value is query:  # self-attention: one product with the three weights stacked
            projections = (self.q_proj, self.k_proj, self.v_proj)
            weight = torch.cat([p.weight for p in projections])
            bias = torch.cat([p.bias for p in projections]) if self.bias else None
            qkv = F.linear(query, weight, bias)
            if self.num_kv_heads == self.num_heads:
                qkv = qkv.view(B, N, 3, self.num_heads, self.head_dim)
                return self._finish(self._attend_packed(qkv, is_causal, key_padding_mask), need_weights)
            q, k, v = self._split_heads(qkv)
            return self._finish(self._attend(q, k, v, is_causal, key_padding_mask), need_weights)
        q = self.q_proj(query).view(heads)
        k = self.k_proj(key).view(kv_heads)
        v = self.v_proj(value).view(kv_heads)
        x = self._attend(q, k, v, is_causal, key_padding_mask)
        return self._finish(x, need_weights)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dilation_rates={self.dilation_rates}, "
                f"segment_lengths={self.segment_lengths}, dropout={self.dropout}, mode={self.mode!r}, "
                f"norm_style={self.norm_style!r}" +
                (f", num_kv_heads={self.num_kv_heads}" if self.num_kv_heads != self.num_heads else ""))


class ImprovedMultiheadDilatedAttention(MultiheadDilatedAttention):
    """``MultiheadDilatedAttention`` with one fused ``qkv_proj`` ``[3E, E]`` (rows Wq, Wk, Wv; with
    ``num_kv_heads`` ``[E + 2·Hkv·D, E]``: rows Wq (E), Wk (Hkv·D), Wv (Hkv·D)).

    For self-attention (query, key and value the same tensor) one product makes the packed
    ``[B, N, 3, H, D]`` buffer and the kernels read q, k, v as strided views of it, no copy, and
    write its gradient in one piece. Same result as the unfused module with the same weights.
    """

    def __init__(self, embed_dim: int, num_heads: int, dilation_rates: Sequence[int], segment_lengths: Sequence[int],
                 dropout: float = 0.0, bias: bool = True, layer_norm: bool = True, layer_norm_eps: float = 1e-5,
                 gamma_init: float = 1.0, device=None, dtype=None, mode: str = "grouped", use_tf32: bool = False,
                 group=None, layout: str = "contiguous", *, norm_style: str = "sub_ln",
                 num_kv_heads: Optional[int] = None):
        nn.Module.__init__(self)
        self._init_common(embed_dim, num_heads, dilation_rates, segment_lengths, dropout, bias, layer_norm,
                          layer_norm_eps, gamma_init, mode, use_tf32, group, layout, norm_style, num_kv_heads)
        factory = {"device": device, "dtype": dtype}
        self.qkv_proj = nn.Linear(embed_dim, embed_dim + 2 * self.kv_dim, bias=bias, **factory)
        self._init_tail(factory)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        E, KD = self.embed_dim, self.kv_dim
        with torch.no_grad():
            w = self.qkv_proj.weight
            # Each slice initialised as its own matrix (same fan-in and fan-out as unfused).
            nn.init.xavier_normal_(w[:E], gain=1.0)
            nn.init.xavier_normal_(w[E:E + KD], gain=1.0)
            nn.init.xavier_normal_(w[E + KD:], gain=self.gamma_init)
            if self.qkv_proj.bias is not None:
                nn.init.zeros_(self.qkv_proj.bias)
        self._reset_out_proj()

    def _project_step(self, x: Tensor):
        if self._normalises_qk:
            B, Tn, _ = x.shape
            E, KD, D = self.embed_dim, self.kv_dim, self.head_dim
            q = self.q_ln(self._project(x, slice(0, E))).view(B, Tn, self.num_heads, D)
            k = self.k_ln(self._project(x, slice(E, E + KD))).view(B, Tn, self.num_kv_heads, D)
            return q, k, self._project(x, slice(E + KD, E + 2 * KD)).view(B, Tn, self.num_kv_heads, D)
        return self._split_heads(self.qkv_proj(x))

    def _project(self, x: Tensor, rows: slice) -> Tensor:
        bias = self.qkv_proj.bias
        return F.linear(x, self.qkv_proj.weight[rows], None if bias is None else bias[rows])

    def forward(self, query: Tensor, key: Optional[Tensor] = None, value: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = False,
                attn_mask: Optional[Tensor] = None, is_causal: bool = False):
        """Returns ``(output, None)`` whatever ``need_weights`` is (as that library's fused module does)."""
        key = query if key is None else key
        value = query if value is None else value
        self._check_inputs(query, key, value, attn_mask, key_padding_mask)
        B, N, _ = query.shape
        H, D, E, KD, Hkv = self.num_heads, self.head_dim, self.embed_dim, self.kv_dim, self.num_kv_heads
        if self._normalises_qk:
            q = self.q_ln(self._project(query, slice(0, E))).view(B, N, H, D)
            k = self.k_ln(self._project(key, slice(E, E + KD))).view(B, N, Hkv, D)
            v = self._project(value, slice(E + KD, E + 2 * KD)).view(B, N, Hkv, D)
            x = self._attend(q, k, v, is_causal, key_padding_mask)
        elif key is query and value is query and Hkv == H:
            x = self._attend_packed(self.qkv_proj(query).view(B, N, 3, H, D), is_causal, key_padding_mask)
        elif key is query and value is query:
            x = self._attend(*self._split_heads(self.qkv_proj(query)), is_causal, key_padding_mask)
        elif key is value:
            q = self._project(query, slice(0, E)).view(B, N, H, D)
            kv = self._project(key, slice(E, E + 2 * KD)).view(B, N, 2, Hkv, D)
            x = self._attend(q, kv.select(2, 0), kv.select(2, 1), is_causal, key_padding_mask)
        else:
            q = self._project(query, slice(0, E)).view(B, N, H, D)
            k = self._project(key, slice(E, E + KD)).view(B, N, Hkv, D)
            v = self._project(value, slice(E + KD, E + 2 * KD)).view(B, N, Hkv, D)
            x = self._attend(q, k, v, is_causal, key_padding_mask)
        return self._finish(x, True)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", use_tf32={self.use_tf32}"


def _autocast_enabled(x: Tensor) -> bool:
    try:
        return bool(torch.is_autocast_enabled(x.device.type))  # torch >= 2.4
    except TypeError:
        pass
    if x.device.type == "cuda":
        return torch.is_autocast_enabled()
    return bool(torch.is_autocast_cpu_enabled())
