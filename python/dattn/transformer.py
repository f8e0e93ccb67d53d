"""Transformer layers and models with the PyTorch LongNet library's names and arguments:
MAGNETO sub-LayerNorm pre-norm blocks (arXiv 2210.06423) around dattn's ``MultiheadDilatedAttention``,
the LongNet encoder-decoder and the language model on top of it (docs/semantics.md, "Transformer
layers and models")."""

import copy
import math
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dattn.modules import MultiheadDilatedAttention

__all__ = ["DilatedTransformerEncoderLayer", "DilatedTransformerDecoderLayer", "LongNet", "LongNetLM", "XPos"]

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


def _activation(activation) -> Callable[[Tensor], Tensor]:
    if isinstance(activation, str):
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation = {activation!r}; expected 'relu', 'gelu' or a callable")
        return _ACTIVATIONS[activation]
    if not callable(activation):
        raise TypeError(f"activation is {type(activation).__name__}; expected 'relu', 'gelu' or a callable")
    return activation


def _attend(attention: nn.Module, query: Tensor, memory: Tensor, is_causal: bool) -> Tensor:
    """The output of any of dattn's multi-head modules (the fused ones return (output, None))."""
    result = attention(query, memory, memory, is_causal=is_causal)
    return result[0] if isinstance(result, tuple) else result


def _magneto_linear_(linear: nn.Linear, gain: float) -> None:
    nn.init.xavier_normal_(linear.weight, gain=gain)
    nn.init.zeros_(linear.bias)


class DilatedTransformerEncoderLayer(nn.Module):
    """``x + dropout(self_attn(norm1(x)))``, then ``x + dropout(linear2(norm3(dropout(act(linear1(norm2(x)))))))``.

    ``self_attn`` is ``MultiheadDilatedAttention`` with its sub-LayerNorm and attention dropout
    ``dropout``; ``linear1``, ``linear2`` are Xavier-normal with gain ``gamma_init``, biases 0.
    ``forward(src, is_causal=False)`` on ``[B, N, d_model]``."""

    def __init__(self, d_model: int, nhead: int, segment_lengths: Sequence[int], dilation_rates: Sequence[int],
                 dim_feedforward: int = 2048, dropout: float = 0.1, activation=F.relu, layer_norm_eps: float = 1e-5,
                 gamma_init: float = 1.0, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.activation = _activation(activation)
        self.gamma_init = float(gamma_init)
        self.dropout = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)
        self.self_attn = MultiheadDilatedAttention(d_model, nhead, dilation_rates, segment_lengths, dropout=dropout,
                                                   layer_norm=True, layer_norm_eps=layer_norm_eps,
                                                   gamma_init=gamma_init, **factory)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)
        self.linear1 = nn.Linear(d_model, dim_feedforward, **factory)
        self.norm3 = nn.LayerNorm(dim_feedforward, eps=layer_norm_eps, **factory)
        self.linear2 = nn.Linear(dim_feedforward, d_model, **factory)
        _magneto_linear_(self.linear1, self.gamma_init)
        _magneto_linear_(self.linear2, self.gamma_init)

    def _feedforward(self, x: Tensor, norm_in: nn.LayerNorm, norm_mid: nn.LayerNorm) -> Tensor:
        x = self.dropout(self.activation(self.linear1(norm_in(x))))
        return self.dropout(self.linear2(norm_mid(x)))

    def forward(self, src: Tensor, is_causal: bool = False) -> Tensor:
        h = self.norm1(src)
        x = src + self.dropout(_attend(self.self_attn, h, h, is_causal))
        return x + self._feedforward(x, self.norm2, self.norm3)


class DilatedTransformerDecoderLayer(nn.Module):
    """Self-attention block (``self_attn`` without its own LayerNorm), cross-attention block
    (``multihead_attn`` over ``memory``, with sub-LayerNorm) and the feed-forward block, each
    pre-normed (``norm1``, ``norm2``, ``norm3``; ``norm4`` inside the feed-forward) with a residual.
    ``forward(tgt, memory, tgt_is_causal=False, memory_is_causal=False)``: ``memory_is_causal``
    lets position i of tgt see memory positions <= i only."""

    def __init__(self, d_model: int, nhead: int, segment_lengths: Sequence[int], dilation_rates: Sequence[int],
                 dim_feedforward: int = 2048, dropout: float = 0.1, activation=F.relu, layer_norm_eps: float = 1e-5,
                 gamma_init: float = 1.0, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        attention = {"dropout": dropout, "layer_norm_eps": layer_norm_eps, "gamma_init": gamma_init, **factory}
        self.activation = _activation(activation)
        self.gamma_init = float(gamma_init)
        self.dropout = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)
        self.self_attn = MultiheadDilatedAttention(d_model, nhead, dilation_rates, segment_lengths, layer_norm=False,
                                                   **attention)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)
        self.multihead_attn = MultiheadDilatedAttention(d_model, nhead, dilation_rates, segment_lengths,
                                                        layer_norm=True, **attention)
        self.norm3 = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)
        self.linear1 = nn.Linear(d_model, dim_feedforward, **factory)
        self.norm4 = nn.LayerNorm(dim_feedforward, eps=layer_norm_eps, **factory)
        self.linear2 = nn.Linear(dim_feedforward, d_model, **factory)
        _magneto_linear_(self.linear1, self.gamma_init)
        _magneto_linear_(self.linear2, self.gamma_init)

    _feedforward = DilatedTransformerEncoderLayer._feedforward

    def forward(self, tgt: Tensor, memory: Tensor, tgt_is_causal: bool = False,
                memory_is_causal: bool = False) -> Tensor:
        h = self.norm1(tgt)
        x = tgt + self.dropout(_attend(self.self_attn, h, h, tgt_is_causal))
        h = self.norm2(x)
        x = x + self.dropout(_attend(self.multihead_attn, h, memory, memory_is_causal))
        return x + self._feedforward(x, self.norm3, self.norm4)


class _LayerStack(nn.Module):
    """``layers`` (copies of one layer, as ``nn.TransformerEncoder`` makes them) and ``norm = None``:
    the parameter names of that library's ``encoder`` and ``decoder``."""

    def __init__(self, layer: nn.Module, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = None


def _count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} = {value!r}; expected an int >= 1")
    return value


class LongNet(nn.Module):
    """The LongNet encoder-decoder (paper's base sizes by default). ``forward(x, is_causal=True)``
    on ``[B, N, d_model]``: the encoder layers run on x, then the decoder layers run on x with the
    encoder's output as memory; ``is_causal`` applies to every attention, so with it a position's
    output never depends on later positions. MAGNETO gains: encoder
    ``sqrt(log(3·Ldec)·log(2·Lenc)/3)``, decoder ``sqrt(log(3·Ldec))``."""

    def __init__(self, d_model: int = 768, nhead: int = 12, num_encoder_layers: int = 12,
                 num_decoder_layers: int = 12, dim_feedforward: int = 3072,
                 segment_lengths: Sequence[int] = [2048, 4096, 8192, 16384, 32768],  # noqa: B006 (library default)
                 dilation_rates: Sequence[int] = [1, 2, 4, 6, 12], dropout: float = 0.0,  # noqa: B006
                 activation=F.relu, layer_norm_eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        encoders, decoders = _count("num_encoder_layers", num_encoder_layers), _count("num_decoder_layers",
                                                                                        num_decoder_layers)
        encoder_gamma = math.sqrt(math.log(3 * decoders) * math.log(2 * encoders) / 3)
        decoder_gamma = math.sqrt(math.log(3 * decoders))
        common = {"d_model": d_model, "nhead": nhead, "segment_lengths": segment_lengths,
                  "dilation_rates": dilation_rates, "dim_feedforward": dim_feedforward, "dropout": dropout,
                  "activation": activation, "layer_norm_eps": layer_norm_eps, "device": device, "dtype": dtype}
        self.encoder = _LayerStack(DilatedTransformerEncoderLayer(gamma_init=encoder_gamma, **common), encoders)
        self.decoder = _LayerStack(DilatedTransformerDecoderLayer(gamma_init=decoder_gamma, **common), decoders)

    def forward(self, x: Tensor, is_causal: bool = True) -> Tensor:
        memory = x
        for layer in self.encoder.layers:
            memory = layer(memory, is_causal=is_causal)
        target = x
        for layer in self.decoder.layers:
            target = layer(target, memory, tgt_is_causal=is_causal, memory_is_causal=is_causal)
        return target


class XPos(nn.Module):
    """The xPos position embedding (arXiv 2212.10554) as that library's language model uses it on
    the whole embedding: for x ``[B, N, dim]`` (dim even), pair ``j`` of channels (2j, 2j+1) of the
    token at index t is rotated by the angle ``t / 10000^(j/(dim/2))`` and multiplied by
    ``scale_j ^ (p / scale_base)``, where ``scale_j = (2j + 0.4·dim) / (1.4·dim)`` (buffer
    ``scale``) and ``p = t − ceil(N/2)`` centres the positions. The rotation is
    ``(a, b) → (a·cos − b·sin, b·cos + a·sin)``."""

    def __init__(self, dim: int, scale_base: float = 512):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2 or dim % 2:
            raise ValueError(f"dim = {dim!r}; expected an even int >= 2")
        self.dim, self.scale_base = dim, scale_base
        self.register_buffer("scale", (torch.arange(0, dim, 2) + 0.4 * dim) / (1.4 * dim))

    def forward(self, x: Tensor) -> Tensor:
        N, half = x.size(1), self.dim // 2
        t = torch.arange(N, dtype=torch.float64, device=x.device)
        positions = t - (N + 1) // 2
        magnitude = self.scale.double()[None, :] ** (positions[:, None] / self.scale_base)       # [N, half]
        frequency = 1.0 / 10000.0 ** (torch.arange(half, dtype=torch.float64, device=x.device) / half)
        angle = t[:, None] * frequency[None, :]
        cos = (torch.cos(angle) * magnitude).to(x.dtype)
        sin = (torch.sin(angle) * magnitude).to(x.dtype)
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)


class LongNetLM(nn.Module):
    """Language model: ``token_embedding``, plus its xPos transform (``pos_embedding``; the sum
    ``e + xpos(e)`` as that library computes it), ``long_net`` (``LongNet``), LayerNorm ``norm`` and
    the output Linear ``out``. ``forward(tokens, is_causal=True)``: int64 ``[B, N]`` → logits
    ``[B, N, num_tokens]``; with ``is_causal`` the logits of a position never depend on later tokens."""

    def __init__(self, num_tokens: int, d_model: int = 768, nhead: int = 12, num_encoder_layers: int = 12,
                 num_decoder_layers: int = 12, dim_feedforward: int = 3072,
                 segment_lengths: Sequence[int] = [2048, 4096, 8192, 16384, 32768],  # noqa: B006 (library default)
                 dilation_rates: Sequence[int] = [1, 2, 4, 6, 12], dropout: float = 0.0,  # noqa: B006
                 activation=F.relu, layer_norm_eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        _count("num_tokens", num_tokens)
        factory = {"device": device, "dtype": dtype}
        self.token_embedding = nn.Embedding(num_tokens, d_model, **factory)
        self.pos_embedding = XPos(d_model).to(**factory)
        self.long_net = LongNet(d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward,
                                segment_lengths, dilation_rates, dropout, activation, layer_norm_eps, **factory)
        self.norm = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)
        self.out = nn.Linear(d_model, num_tokens, **factory)

    def forward(self, tokens: Tensor, is_causal: bool = True) -> Tensor:
        if not isinstance(tokens, Tensor) or tokens.dtype not in (torch.int64, torch.int32) or tokens.dim() != 2:
            described = f"a {tokens.dim()}-D {tokens.dtype} tensor" if isinstance(tokens, Tensor) \
                else type(tokens).__name__
            raise TypeError(f"tokens is {described}; expected an int64 tensor [B, N]")
        x = self.token_embedding(tokens)
        x = x + self.pos_embedding(x)
        return self.out(self.norm(self.long_net(x, is_causal=is_causal)))
