"""The PyTorch LongNet library's factory functions and presets, with its signatures, over dattn's
modules; and its out-of-scope names, which raise an error naming dattn's alternative."""

from typing import Optional, Sequence

import torch.distributed as dist

from dattn.block_sparse_multihead import BlockSparseRingMultiheadDilatedAttention
from dattn.modules import (DilatedAttention, ImprovedDilatedAttention, ImprovedMultiheadDilatedAttention,
                           MultiheadDilatedAttention)
from dattn.ring import RingDilatedAttention
from dattn.sparse import BlockSparseRingDilatedAttention, SparsePatternConfig, as_sparse_config

__all__ = ["create_dilated_attention", "create_multihead_dilated_attention", "create_block_sparse_attention",
           "create_multihead_block_sparse", "get_block_sparse_preset", "OUT_OF_SCOPE"]

ATTENTION_TYPES = ("auto", "standard", "improved", "ring", "block_sparse_ring")
_PATTERN_KEYS = ("pattern_type", "block_size", "sparsity_ratio", "window_size", "global_tokens")


def _config(segment_lengths, dilation_rates):
    return ([2048, 4096, 8192] if segment_lengths is None else segment_lengths,
            [1, 2, 4] if dilation_rates is None else dilation_rates)


def _attention_type(attention_type: str) -> str:
    if attention_type not in ATTENTION_TYPES:
        hint = ""
        if isinstance(attention_type, str) and "distributed" in attention_type:
            hint = " (for several processes pass group= to the 'ring' or 'block_sparse_ring' type)"
        raise ValueError(f"attention_type = {attention_type!r}; expected one of {', '.join(ATTENTION_TYPES)}{hint}")
    return "standard" if attention_type == "auto" else attention_type  # "auto" is "standard" on every machine


def _sparse_config(kwargs: dict, sparse_config=None) -> SparsePatternConfig:
    """sparse_config (None, config or dict) with the pattern keywords the library's factories take
    (pattern_type, block_size, ...) folded in; the keywords are removed from kwargs."""
    config = as_sparse_config(sparse_config)
    overrides = {key: kwargs.pop(key) for key in _PATTERN_KEYS if key in kwargs and kwargs[key] is not None}
    for key in _PATTERN_KEYS:
        kwargs.pop(key, None)
    if not overrides:
        return config
    fields = {"pattern_type": config.pattern_type, "block_size": config.block_size,
              "sparsity_ratio": config.sparsity_ratio, "window_size": config.window_size,
              "global_tokens": config.global_tokens, "dilation_rates": config.dilation_rates}
    fields.update(overrides)
    return SparsePatternConfig(**fields)


def _default_group(kwargs: dict) -> None:
    if kwargs.get("group") is None and dist.is_available() and dist.is_initialized():
        kwargs["group"] = dist.group.WORLD


def create_dilated_attention(attention_type="auto", segment_lengths=None, dilation_rates=None, **kwargs):
    """A dilated attention core over q, k, v ``[B, N, H, D]``: "standard" (``DilatedAttention``; "auto"
    is "standard" on every machine), "improved" (``ImprovedDilatedAttention``, the same correct
    function), "ring" (``RingDilatedAttention``) or "block_sparse_ring"
    (``BlockSparseRingDilatedAttention``). Defaults: segments [2048, 4096, 8192], rates [1, 2, 4].
    ``kwargs`` go to the module (``dropout`` names the attention dropout of "standard" too); an
    argument the module does not take is an error."""
    kind = _attention_type(attention_type)
    segment_lengths, dilation_rates = _config(segment_lengths, dilation_rates)
    if kind == "standard":
        if "dropout" in kwargs:
            if "attention_dropout" in kwargs:
                raise ValueError("both dropout and attention_dropout given; expected one of them")
            kwargs["attention_dropout"] = kwargs.pop("dropout")
        return DilatedAttention(segment_lengths, dilation_rates, **kwargs)
    if kind == "improved":
        return ImprovedDilatedAttention(segment_lengths, dilation_rates, **kwargs)
    if kind == "ring":
        return RingDilatedAttention(segment_lengths, dilation_rates, **kwargs)
    sparse_config = _sparse_config(kwargs, kwargs.pop("sparse_config", None))
    return BlockSparseRingDilatedAttention(segment_lengths, dilation_rates, sparse_config, **kwargs)


def create_multihead_dilated_attention(attention_type="auto", embed_dim=768, num_heads=12, segment_lengths=None,
                                       dilation_rates=None, **kwargs):
    """A multi-head module over ``[B, N, embed_dim]``: "standard" (``MultiheadDilatedAttention``;
    "auto" is "standard"), "improved" (``ImprovedMultiheadDilatedAttention``), "ring"
    (``MultiheadDilatedAttention`` over ``group``, default the default process group when one is
    initialised) or "block_sparse_ring" (``BlockSparseRingMultiheadDilatedAttention``). Note the
    argument order: segments before rates here, rates before segments in the modules."""
    kind = _attention_type(attention_type)
    segment_lengths, dilation_rates = _config(segment_lengths, dilation_rates)
    if kind == "standard":
        return MultiheadDilatedAttention(embed_dim, num_heads, dilation_rates, segment_lengths, **kwargs)
    if kind == "improved":
        return ImprovedMultiheadDilatedAttention(embed_dim, num_heads, dilation_rates, segment_lengths, **kwargs)
    if kind == "ring":
        _default_group(kwargs)
        return MultiheadDilatedAttention(embed_dim, num_heads, dilation_rates, segment_lengths, **kwargs)
    sparse_config = _sparse_config(kwargs, kwargs.pop("sparse_config", None))
    return BlockSparseRingMultiheadDilatedAttention(embed_dim, num_heads, segment_lengths, dilation_rates,
                                                    sparse_config=sparse_config, **kwargs)


BLOCK_SPARSE_VARIANTS = ("auto", "base", "multihead")


def create_block_sparse_attention(variant="auto", segment_lengths=None, dilation_rates=None, sparse_config=None,
                                  sparsity_ratio=None, block_size=None, adaptive_config=None,
                                  distributed_config=None, embed_dim=None, num_heads=None, **kwargs):
    """Block-sparse attention: ``BlockSparseRingMultiheadDilatedAttention`` when ``embed_dim`` and
    ``num_heads`` are given (or ``variant="multihead"``, which needs them), else the core
    ``BlockSparseRingDilatedAttention``. ``sparse_config`` is None, a ``SparsePatternConfig`` or a
    dict; ``sparsity_ratio`` and ``block_size`` override its fields. The adaptive and distributed
    variants are not provided (errors name the alternative)."""
    if adaptive_config is not None or variant in ("adaptive", "hierarchical"):
        raise NotImplementedError(f"variant {variant!r} / adaptive_config: dattn has no adaptive or hierarchical "
                                  "block-sparse attention; use a fixed pattern (SparsePatternConfig) or pass a bool "
                                  "block mask to dattn.block_sparse_attention")
    if distributed_config is not None or variant == "distributed":
        raise NotImplementedError("variant 'distributed' / distributed_config: use variant='multihead' or 'base' "
                                  "with group=<torch.distributed process group> (dattn's ring runs the block mask "
                                  "across ranks)")
    if variant not in BLOCK_SPARSE_VARIANTS:
        raise ValueError(f"variant = {variant!r}; expected one of {', '.join(BLOCK_SPARSE_VARIANTS)}")
    if (embed_dim is None) != (num_heads is None):
        raise ValueError(f"embed_dim = {embed_dim!r}, num_heads = {num_heads!r}; expected both (the multi-head "
                         "module) or neither (the attention core)")
    if variant == "multihead" and embed_dim is None:
        raise ValueError("variant='multihead' needs embed_dim and num_heads; expected both to be given")
    segment_lengths, dilation_rates = _config(segment_lengths, dilation_rates)
    kwargs.update(sparsity_ratio=sparsity_ratio, block_size=block_size)
    config = _sparse_config(kwargs, sparse_config)
    if embed_dim is not None:
        return BlockSparseRingMultiheadDilatedAttention(embed_dim, num_heads, segment_lengths, dilation_rates,
                                                        sparse_config=config, **kwargs)
    return BlockSparseRingDilatedAttention(segment_lengths, dilation_rates, config, **kwargs)


def create_multihead_block_sparse(embed_dim, num_heads, sparsity_ratio=0.1, **kwargs):
    """``create_block_sparse_attention("multihead", embed_dim=..., num_heads=..., sparsity_ratio=...)``."""
    return create_block_sparse_attention("multihead", embed_dim=embed_dim, num_heads=num_heads,
                                         sparsity_ratio=sparsity_ratio, **kwargs)


PRESETS = {
    "local": dict(pattern_type="local_window", block_size=64, sparsity_ratio=0.05, window_size=256),
    "dilated": dict(pattern_type="dilated_sparse", block_size=64, sparsity_ratio=0.1, dilation_rates=[1, 2, 4, 8]),
    "global_local": dict(pattern_type="global_local", block_size=64, sparsity_ratio=0.1, window_size=256,
                         global_tokens=64),
    "ultra_sparse": dict(pattern_type="dilated_sparse", block_size=128, sparsity_ratio=0.01),
}


def get_block_sparse_preset(name, **overrides):
    """The ``SparsePatternConfig`` of a named preset ("local", "dilated", "global_local",
    "ultra_sparse"), with ``overrides`` (its fields) replacing the preset's values."""
    if name not in PRESETS:
        raise ValueError(f"name = {name!r}; expected one of {', '.join(PRESETS)}")
    return as_sparse_config({**PRESETS[name], **overrides}, "the preset with overrides")


def _out_of_scope(name: str, alternative: str):
    def unsupported(*args, **kwargs):
        raise NotImplementedError(f"dattn does not provide {name}; use {alternative}")
    unsupported.__name__ = unsupported.__qualname__ = name
    unsupported.__doc__ = f"Not provided by dattn (calling it raises NotImplementedError); use {alternative}."
    return unsupported


_ADAPTIVE = "a fixed pattern: dattn.SparsePatternConfig / get_block_sparse_preset, or a bool block mask passed to " \
            "dattn.block_sparse_attention"
_DISTRIBUTED = "dattn.BlockSparseRingMultiheadDilatedAttention(..., group=<process group>) or " \
               "BlockSparseRingDilatedAttention(..., group=...) (the ring runs the block mask across ranks)"
_PATTERNS = "dattn.SparsePatternConfig and the mask builders dattn.local_window_mask, dilated_sparse_mask, " \
            "global_local_mask, dilated_mask"
OUT_OF_SCOPE = {name: _out_of_scope(name, alternative) for name, alternative in (
    ("BlockSparseAdaptive", _ADAPTIVE), ("AdaptiveConfig", _ADAPTIVE), ("AdaptiveSparsityTrainer", _ADAPTIVE),
    ("ContentAdaptiveSparsity", _ADAPTIVE), ("create_adaptive_sparse_attention", _ADAPTIVE),
    ("create_adaptive_block_sparse", _ADAPTIVE),
    ("BlockSparseRingDistributedDilatedAttention", _DISTRIBUTED), ("DistributedSparseConfig", _DISTRIBUTED),
    ("DistributedSparsePattern", _DISTRIBUTED),
    ("PatternConfig", _PATTERNS), ("PatternType", _PATTERNS), ("PatternOptimizer", _PATTERNS),
    ("PatternQualityAnalyzer", _PATTERNS), ("SparsePatternGenerator", _PATTERNS))}
