"""The multi-head module with block-sparse attention inside (the PyTorch LongNet library's
``BlockSparseRingMultiheadDilatedAttention``): the projections, sub-LayerNorm and output projection
of ``MultiheadDilatedAttention`` around ``block_sparse_attention`` with the mask ``sparse_config``
names."""

from typing import Optional, Sequence

import torch.distributed as dist
from torch import Tensor

from dattn.modules import MultiheadDilatedAttention
from dattn.ring import ring_block_sparse_attention
from dattn.sparse import BlockSparseRingDilatedAttention, block_sparse_attention

__all__ = ["BlockSparseRingMultiheadDilatedAttention"]

_MODULE_KEYWORDS = ("layer_norm", "layer_norm_eps", "gamma_init", "device", "dtype", "group", "layout", "norm_style")


class BlockSparseRingMultiheadDilatedAttention(MultiheadDilatedAttention):
    """``MultiheadDilatedAttention`` (same parameters, init and ``norm_style``) whose attention is
    block-sparse: one softmax per row over the keys of the allowed blocks of ``sparse_config`` (a
    ``SparsePatternConfig``, a dict of its arguments, or None for the default). ``dropout`` is
    attention dropout (training only). ``batch_first=False`` takes and returns ``[N, B, E]``.
    Further keywords: ``layer_norm``, ``layer_norm_eps``, ``gamma_init``, ``device``, ``dtype``,
    ``group``, ``layout``, ``norm_style`` (anything else is an error).

    ``forward`` returns ``(output, None)``, or with ``need_weights=True`` ``(output, weights)``
    where ``weights`` is the block dict of ``BlockSparseRingDilatedAttention`` (its ``values``
    averaged over heads when ``average_attn_weights``)."""

    def __init__(self, embed_dim: int, num_heads: int, segment_lengths: Sequence[int], dilation_rates: Sequence[int],
                 dropout: float = 0.0, bias: bool = True, sparse_config=None, batch_first: bool = True, **kwargs):
        unknown = sorted(set(kwargs) - set(_MODULE_KEYWORDS))
        if unknown:
            raise TypeError(f"BlockSparseRingMultiheadDilatedAttention got keyword {unknown[0]!r}; expected keywords "
                            f"among {', '.join(_MODULE_KEYWORDS)}")
        if not isinstance(batch_first, bool):
            raise TypeError(f"batch_first is {type(batch_first).__name__}; expected a bool")
        super().__init__(embed_dim, num_heads, dilation_rates, segment_lengths, dropout=dropout, bias=bias, **kwargs)
        self.batch_first = batch_first
        # Holds the configuration and the block masks per sequence length and device (no parameters).
        self.attention = BlockSparseRingDilatedAttention(self.segment_lengths, self.dilation_rates, sparse_config)
        self.sparse_config = self.attention.sparse_config
        self._weights_request = None

    def _attend(self, q, k, v, is_causal, key_padding_mask):
        dropout_p = self.dropout if self.training else 0.0
        block = self.sparse_config.block_size
        if self.group is not None:
            mask = self.attention.mask(q.size(1) * dist.get_world_size(self.group), q.device)
            return ring_block_sparse_attention(q, k, v, mask, block, self.group, self.layout, is_causal,
                                               key_padding_mask=key_padding_mask, dropout_p=dropout_p)
        if self._weights_request is not None:
            self._weights_request["weights"] = self.attention(q, k, v, is_causal, True, key_padding_mask)[1]
        return block_sparse_attention(q, k, v, self.attention.mask(q.size(1), q.device), block, is_causal=is_causal,
                                      key_padding_mask=key_padding_mask, dropout_p=dropout_p)

    def _attend_packed(self, qkv, is_causal, key_padding_mask):
        return self._attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], is_causal, key_padding_mask)

    def forward(self, query: Tensor, key: Optional[Tensor] = None, value: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = False,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True, is_causal: bool = False):
        if not self.batch_first:
            query, key, value = (None if x is None else x.transpose(0, 1) for x in (query, key, value))
        if need_weights and self.group is not None:
            raise ValueError("need_weights=True with a group: the weights need the whole sequence on one rank; "
                             "expected False")
        self._weights_request = {} if need_weights else None
        try:
            out = super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=False,
                                  attn_mask=attn_mask, is_causal=is_causal)
            weights = None if self._weights_request is None else self._weights_request["weights"]
        finally:
            self._weights_request = None
        if weights is not None and average_attn_weights:
            weights = dict(weights, values=weights["values"].mean(dim=1))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        config = self.sparse_config
        return super().extra_repr() + (f", pattern_type={config.pattern_type!r}, block_size={config.block_size}, "
                                       f"batch_first={self.batch_first}")
