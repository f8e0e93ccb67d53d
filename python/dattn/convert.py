"""``from_longnet``: a live model of the PyTorch LongNet library (or any model containing its
modules) turned into dattn's modules with the weights copied. Modules are recognised by class
name and parameter names, never by importing that library."""

import copy
import warnings
from typing import Optional

import torch
from torch import nn

from dattn.block_sparse_multihead import BlockSparseRingMultiheadDilatedAttention
from dattn.modules import DilatedAttention, ImprovedMultiheadDilatedAttention, MultiheadDilatedAttention
from dattn.sparse import BlockSparseRingDilatedAttention, SparsePatternConfig
from dattn.transformer import DilatedTransformerDecoderLayer, DilatedTransformerEncoderLayer, LongNet, LongNetLM

__all__ = ["from_longnet"]

_WARNED = set()
_DIFFERENCES = {
    "improved": "that library's Improved attention cores compute a different function from its DilatedAttention "
                "(SPEC of dattn: docs/semantics.md); the converted module computes dilated attention as "
                "DilatedAttention defines it",
    "block_sparse": "that library's block-sparse attention takes a softmax inside each block pair and sums over key "
                    "blocks; the converted module computes one softmax per row over all allowed keys",
}


def _warn_once(kind: str) -> None:
    if kind not in _WARNED:
        _WARNED.add(kind)
        warnings.warn(f"dattn.from_longnet: {_DIFFERENCES[kind]}", stacklevel=3)


def _find(module: nn.Module, *names, default=None):
    """The first attribute among names on module or on one of its direct children."""
    for owner in [module, *module.children()]:
        for name in names:
            value = getattr(owner, name, None)
            if value is not None and not isinstance(value, nn.Parameter):
                return value
    return default


def _probability(value) -> float:
    return float(value.p) if isinstance(value, nn.Dropout) else float(value or 0.0)


def _config(module: nn.Module):
    segments, rates = _find(module, "segment_lengths"), _find(module, "dilation_rates")
    if segments is None or rates is None:
        raise ValueError(f"{type(module).__name__} has no segment_lengths / dilation_rates attributes; expected "
                         "them on the module or on its attention child")
    return [int(w) for w in segments], [int(r) for r in rates]


def _factory(module: nn.Module) -> dict:
    parameter = next(module.parameters(), None)
    return {} if parameter is None else {"device": parameter.device, "dtype": parameter.dtype}


def _load(target: nn.Module, source: nn.Module, rename=None) -> nn.Module:
    """Copies source's parameters and buffers into target; every one of source's must find its place."""
    state = source.state_dict()
    if rename is not None:
        state = rename(state)
    target.load_state_dict(state, strict=True)
    target.train(source.training)
    return target


def _multihead(module: nn.Module) -> nn.Module:
    children = dict(module.named_children())
    out_proj = children["out_proj"]
    fused = "qkv_proj" in children
    num_heads = _find(module, "num_heads")
    if num_heads is None:
        raise ValueError(f"{type(module).__name__} has no num_heads attribute; expected one")
    segments, rates = _config(module)
    qk_norms = "q_ln" in children or "k_ln" in children
    if qk_norms and not ("q_ln" in children and "k_ln" in children):
        raise ValueError(f"{type(module).__name__} has only one of q_ln, k_ln; expected both")
    if qk_norms and "norm" in children:
        raise ValueError(f"{type(module).__name__} has both norm and q_ln/k_ln; expected one of them")
    norm = children.get("q_ln") or children.get("norm")
    if "Improved" in type(module).__name__:
        _warn_once("improved")
    arguments = dict(dropout=_probability(_find(module, "dropout", "attention_dropout", default=0.0)),
                     bias=out_proj.bias is not None, layer_norm=norm is not None,
                     layer_norm_eps=norm.eps if norm is not None else 1e-5,
                     gamma_init=float(_find(module, "gamma_init", default=1.0)),
                     norm_style="sub_ln" if "norm" in children else "longnet_pytorch", **_factory(module))
    cls = ImprovedMultiheadDilatedAttention if fused else MultiheadDilatedAttention
    return _load(cls(out_proj.in_features, int(num_heads), rates, segments, **arguments), module)


def _block_sparse_core(module: nn.Module) -> nn.Module:
    _warn_once("block_sparse")
    config = _find(module, "sparse_config")
    if config is None:
        config = SparsePatternConfig()
    elif not isinstance(config, SparsePatternConfig):
        fields = ("pattern_type", "block_size", "sparsity_ratio", "window_size", "global_tokens", "dilation_rates")
        config = SparsePatternConfig(**{f: getattr(config, f) for f in fields if getattr(config, f, None) is not None})
    segments, rates = _config(module)
    return BlockSparseRingDilatedAttention(segments, rates, config)


def _block_sparse_multihead(module: nn.Module) -> nn.Module:
    """That library's block-sparse multi-head module: a fused qkv_projection.qkv_proj and
    qkv_projection.out_proj, no LayerNorm (a LayerNorm after out_proj has no counterpart)."""
    if getattr(module, "use_layer_norm", False) or hasattr(module, "layer_norm"):
        raise NotImplementedError(f"from_longnet: {type(module).__name__} with use_layer_norm=True (a LayerNorm "
                                  "after out_proj) has no counterpart in dattn; expected use_layer_norm=False")
    dropout = _probability(_find(module, "dropout", default=0.0))
    if dropout > 0.0:
        raise NotImplementedError(f"from_longnet: {type(module).__name__} has dropout = {dropout} on its output; "
                                  "dattn's dropout is attention dropout; expected dropout = 0")
    projection = module.qkv_projection
    E = projection.out_proj.in_features
    core = _block_sparse_core(module.attention)
    result = BlockSparseRingMultiheadDilatedAttention(
        E, int(_find(module, "num_heads")), core.segment_lengths, core.dilation_rates,
        bias=projection.out_proj.bias is not None, sparse_config=core.sparse_config, layer_norm=False,
        batch_first=bool(getattr(module, "batch_first", True)), **_factory(module))

    def rename(state):
        renamed = {}
        for key, value in state.items():
            if key.startswith("qkv_projection.qkv_proj."):
                leaf = key.rsplit(".", 1)[1]
                for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
                    renamed[f"{name}.{leaf}"] = value[i * E:(i + 1) * E]
            elif key.startswith("qkv_projection.out_proj."):
                renamed[key[len("qkv_projection."):]] = value
            else:
                renamed[key] = value
        return renamed
    return _load(result, module, rename)


def _core(module: nn.Module) -> nn.Module:
    if "Improved" in type(module).__name__:
        _warn_once("improved")
    segments, rates = _config(module)
    dropout = _probability(_find(module, "attention_dropout", "dropout", default=0.0))
    result = DilatedAttention(segments, rates, softmax_scale=_find(module, "softmax_scale"), attention_dropout=dropout)
    return result.train(module.training)


def _layer(module: nn.Module, cls) -> nn.Module:
    attention = module.self_attn
    segments, rates = _config(attention)
    layer = cls(module.norm1.normalized_shape[0], int(_find(attention, "num_heads")), segments, rates,
                dim_feedforward=module.linear1.out_features, dropout=_probability(module.dropout),
                activation=module.activation, layer_norm_eps=module.norm1.eps,
                gamma_init=float(getattr(module, "gamma_init", 1.0)), **_factory(module))
    for name in ("self_attn", "multihead_attn"):
        if hasattr(layer, name):
            setattr(layer, name, _multihead(getattr(module, name)))
    return _load(layer, module)


def _stack_config(stack: nn.Module) -> Optional[nn.Module]:
    if getattr(stack, "norm", None) is not None:
        raise ValueError(f"{type(stack).__name__} has a final norm; expected norm=None (as that library's LongNet)")
    return stack


def _long_net(module: nn.Module, lm: Optional[nn.Module] = None) -> nn.Module:
    encoder, decoder = _stack_config(module.encoder), _stack_config(module.decoder)
    first = encoder.layers[0]
    attention = first.self_attn
    segments, rates = _config(attention)
    arguments = dict(d_model=first.norm1.normalized_shape[0], nhead=int(_find(attention, "num_heads")),
                     num_encoder_layers=len(encoder.layers), num_decoder_layers=len(decoder.layers),
                     dim_feedforward=first.linear1.out_features, segment_lengths=segments, dilation_rates=rates,
                     dropout=_probability(first.dropout), activation=first.activation,
                     layer_norm_eps=first.norm1.eps, **_factory(module))
    if lm is None:
        result = LongNet(**arguments)
        target = result
    else:
        result = LongNetLM(lm.token_embedding.num_embeddings, **arguments)
        target = result.long_net
    for stack, source in ((target.encoder, encoder), (target.decoder, decoder)):
        stack.layers = nn.ModuleList(from_longnet(layer) for layer in source.layers)
    return _load(result, lm if lm is not None else module)


_LAYERS = {"DilatedTransformerEncoderLayer": DilatedTransformerEncoderLayer,
           "DilatedTransformerDecoderLayer": DilatedTransformerDecoderLayer}


def _convert(module: nn.Module) -> Optional[nn.Module]:
    """dattn's module for one of that library's, or None when module is not one of them."""
    name = type(module).__name__
    children = dict(module.named_children())
    if name == "LongNetLM":
        return _long_net(module.long_net, module)
    if name == "LongNet":
        return _long_net(module)
    if name in _LAYERS:
        return _layer(module, _LAYERS[name])
    if name == "BlockSparseRingMultiheadDilatedAttention" and "qkv_projection" in children:
        return _block_sparse_multihead(module)
    if "out_proj" in children and ("qkv_proj" in children or "q_proj" in children):
        return _multihead(module)
    if "BlockSparse" in name and hasattr(module, "segment_lengths"):
        return _block_sparse_core(module)
    if name in ("DilatedAttention", "ImprovedDilatedAttention"):
        return _core(module)
    return None


def from_longnet(module: nn.Module) -> nn.Module:
    """dattn's equivalent of ``module``, a live module of the PyTorch LongNet library
    (``MultiheadDilatedAttention``, ``ImprovedMultiheadDilatedAttention``, ``DilatedAttention``,
    ``ImprovedDilatedAttention``, the block-sparse core and multi-head module, ``DilatedTransformerEncoderLayer`` /
    ``DecoderLayer``, ``LongNet``, ``LongNetLM``) or of any model containing them (a converted deep copy is
    returned; ``module`` is left unchanged). Weights are copied; the unfused module with ``q_ln``/``k_ln``
    becomes ``norm_style="longnet_pytorch"``. Where that library computes a different function (its
    Improved cores, its block-sparse) the result computes dattn's and a warning says so once."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module is {type(module).__name__}; expected a torch.nn.Module")
    converted = _convert(module)
    if converted is not None:
        return converted
    result = copy.deepcopy(module)
    _replace_children(result)
    return result


def _replace_children(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        converted = _convert(child)
        if converted is None:
            _replace_children(child)
        else:
            setattr(module, name, converted)
