"""Stand-ins for the PyTorch LongNet library's modules: its class names, parameter names and
attributes only (no forward), and each one's function written out by hand from docs/semantics.md
(the multi-head composition, norm_style "longnet_pytorch", the MAGNETO layers, xPos), float64."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from reference_attention import dilated_attention_reference


def _heads(x, H):
    return x.view(x.size(0), x.size(1), H, -1)


class DilatedAttention(nn.Module):
    def __init__(self, segment_lengths, dilation_rates, softmax_scale=None, attention_dropout=0.0):
        super().__init__()
        self.segment_lengths, self.dilation_rates = segment_lengths, dilation_rates
        self.softmax_scale, self.dropout = softmax_scale, nn.Dropout(attention_dropout)

    def expected(self, q, k, v, is_causal=False):
        return dilated_attention_reference(q, k, v, self.segment_lengths, self.dilation_rates, is_causal=is_causal,
                                           scale=self.softmax_scale)[0]


class ImprovedDilatedAttention(DilatedAttention):
    pass


class MultiheadDilatedAttention(nn.Module):
    """The unfused module: q_proj, k_proj, v_proj, out_proj, and with layer_norm q_ln, k_ln."""

    def __init__(self, E, H, dilation_rates, segment_lengths, layer_norm=True, eps=1e-5):
        super().__init__()
        self.num_heads, self.gamma_init = H, 1.0
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(E, E) for _ in range(4))
        if layer_norm:
            self.q_ln, self.k_ln = nn.LayerNorm(E, eps=eps), nn.LayerNorm(E, eps=eps)
        self.layer_norm = layer_norm
        self.dilated_attention = DilatedAttention(segment_lengths, dilation_rates)

    def expected(self, query, key, value, is_causal=False):
        """docs/semantics.md, norm_style "longnet_pytorch": q_ln on projected q, k_ln on projected k,
        attention, q_ln again on the output, out_proj."""
        H, W, R = self.num_heads, self.dilated_attention.segment_lengths, self.dilated_attention.dilation_rates
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if self.layer_norm:
            q, k = self.q_ln(q), self.k_ln(k)
        x = dilated_attention_reference(_heads(q, H), _heads(k, H), _heads(v, H), W, R, is_causal=is_causal)[0]
        x = x.reshape(query.shape)
        if self.layer_norm:
            x = self.q_ln(x)
        return self.out_proj(x)


class ImprovedMultiheadDilatedAttention(nn.Module):
    """The fused module: qkv_proj (rows Wq, Wk, Wv), sub-LayerNorm norm, out_proj."""

    def __init__(self, E, H, dilation_rates, segment_lengths):
        super().__init__()
        self.num_heads, self.dropout = H, 0.0
        self.segment_lengths, self.dilation_rates = segment_lengths, dilation_rates
        self.qkv_proj, self.norm, self.out_proj = nn.Linear(E, 3 * E), nn.LayerNorm(E), nn.Linear(E, E)

    def expected(self, x, is_causal=False):
        H = self.num_heads
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)
        a = dilated_attention_reference(_heads(q, H), _heads(k, H), _heads(v, H), self.segment_lengths,
                                        self.dilation_rates, is_causal=is_causal)[0]
        return self.out_proj(self.norm(a.reshape(x.shape)))


class DilatedTransformerEncoderLayer(nn.Module):
    def __init__(self, E, H, W, R, ff):
        super().__init__()
        self.activation, self.gamma_init, self.dropout = F.gelu, 1.0, nn.Dropout(0.0)
        self.norm1, self.self_attn = nn.LayerNorm(E), MultiheadDilatedAttention(E, H, R, W)
        self.norm2, self.linear1, self.norm3, self.linear2 = nn.LayerNorm(E), nn.Linear(E, ff), nn.LayerNorm(ff), \
            nn.Linear(ff, E)

    def feedforward(self, x, norm_in, norm_mid):
        return self.linear2(norm_mid(self.activation(self.linear1(norm_in(x)))))

    def expected(self, x, is_causal=False):
        h = self.norm1(x)
        x = x + self.self_attn.expected(h, h, h, is_causal)
        return x + self.feedforward(x, self.norm2, self.norm3)


class DilatedTransformerDecoderLayer(nn.Module):
    def __init__(self, E, H, W, R, ff):
        super().__init__()
        self.activation, self.gamma_init, self.dropout = F.gelu, 1.0, nn.Dropout(0.0)
        self.norm1 = nn.LayerNorm(E)
        self.self_attn = MultiheadDilatedAttention(E, H, R, W, layer_norm=False)
        self.norm2, self.multihead_attn = nn.LayerNorm(E), MultiheadDilatedAttention(E, H, R, W)
        self.norm3, self.linear1, self.norm4, self.linear2 = nn.LayerNorm(E), nn.Linear(E, ff), nn.LayerNorm(ff), \
            nn.Linear(ff, E)

    feedforward = DilatedTransformerEncoderLayer.feedforward

    def expected(self, x, memory, is_causal=False):
        h = self.norm1(x)
        x = x + self.self_attn.expected(h, h, h, is_causal)
        h = self.norm2(x)
        x = x + self.multihead_attn.expected(h, memory, memory, is_causal)
        return x + self.feedforward(x, self.norm3, self.norm4)


class _Stack(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers, self.norm = nn.ModuleList(layers), None


class LongNet(nn.Module):
    def __init__(self, E, H, W, R, ff, encoders, decoders):
        super().__init__()
        self.encoder = _Stack([DilatedTransformerEncoderLayer(E, H, W, R, ff) for _ in range(encoders)])
        self.decoder = _Stack([DilatedTransformerDecoderLayer(E, H, W, R, ff) for _ in range(decoders)])

    def expected(self, x, is_causal=True):
        memory = x
        for layer in self.encoder.layers:
            memory = layer.expected(memory, is_causal)
        for layer in self.decoder.layers:
            x = layer.expected(x, memory, is_causal)
        return x


class XPOS(nn.Module):
    def __init__(self, dim, scale_base=512):
        super().__init__()
        self.scale_base = scale_base
        self.register_buffer("scale", (torch.arange(0, dim, 2) + 0.4 * dim) / (1.4 * dim))

    def expected(self, x):
        """Pair j of channels of token t, as the complex number a + ib, times
        exp(i·t/10000^(j/(dim/2))) · scale_j^((t − ceil(N/2)) / scale_base)."""
        N, half = x.size(1), x.size(2) // 2
        out = torch.empty_like(x)
        for t in range(N):
            for j in range(half):
                angle = t / 10000 ** (j / half)
                magnitude = self.scale[j].item() ** ((t - math.ceil(N / 2)) / self.scale_base)
                z = torch.complex(x[:, t, 2 * j], x[:, t, 2 * j + 1]) * magnitude * complex(math.cos(angle),
                                                                                           math.sin(angle))
                out[:, t, 2 * j], out[:, t, 2 * j + 1] = z.real, z.imag
        return out


class LongNetLM(nn.Module):
    def __init__(self, tokens, E, H, W, R, ff, encoders, decoders):
        super().__init__()
        self.token_embedding, self.pos_embedding = nn.Embedding(tokens, E), XPOS(E)
        self.long_net = LongNet(E, H, W, R, ff, encoders, decoders)
        self.norm, self.out = nn.LayerNorm(E), nn.Linear(E, tokens)

    def expected(self, tokens, is_causal=True):
        x = self.token_embedding(tokens)
        x = x + self.pos_embedding.expected(x)
        return self.out(self.norm(self.long_net.expected(x, is_causal)))


def randomise_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter drawn anew (LayerNorm weights near 1, the rest small normals), float64."""
    generator = torch.Generator().manual_seed(seed)
    module.double()
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float64)
            p.copy_(1 + 0.1 * noise if name.endswith("ln.weight") or ".norm" in name or name.startswith("norm")
                    else 0.3 * noise)
    return module


class SparsePatternConfig:
    def __init__(self, pattern_type="local_window", block_size=64, window_size=256):
        self.pattern_type, self.block_size, self.window_size = pattern_type, block_size, window_size
        self.sparsity_ratio, self.global_tokens, self.dilation_rates = 0.1, 1, None


class BlockSparseRingDilatedAttention(nn.Module):
    def __init__(self, segment_lengths, dilation_rates, sparse_config):
        super().__init__()
        self.segment_lengths, self.dilation_rates, self.sparse_config = segment_lengths, dilation_rates, sparse_config


class FusedQKVProjection(nn.Module):
    def __init__(self, E):
        super().__init__()
        self.qkv_proj, self.out_proj = nn.Linear(E, 3 * E), nn.Linear(E, E)


class BlockSparseRingMultiheadDilatedAttention(nn.Module):
    """qkv_projection (qkv_proj, out_proj) around the block-sparse core, no LayerNorm."""

    def __init__(self, E, H, W, R, sparse_config):
        super().__init__()
        self.num_heads, self.dropout, self.batch_first, self.use_layer_norm = H, 0.0, True, False
        self.qkv_projection = FusedQKVProjection(E)
        self.attention = BlockSparseRingDilatedAttention(W, R, sparse_config)

    def expected(self, x, is_causal=False):
        """The local_window mask by hand (query block i sees key blocks i-half .. i+half), one softmax
        per row over the allowed keys, then out_proj."""
        from test_sparse import reference as block_sparse_reference

        config, H = self.attention.sparse_config, self.num_heads
        block, half = config.block_size, config.window_size // config.block_size // 2
        nb = -(-x.size(1) // block)
        blocks = torch.arange(nb)
        mask = (blocks[None, :] >= blocks[:, None] - half) & (blocks[None, :] <= blocks[:, None] + half)
        q, k, v = self.qkv_projection.qkv_proj(x).chunk(3, dim=-1)
        a = block_sparse_reference(_heads(q, H), _heads(k, H), _heads(v, H), mask, block, is_causal)[0]
        return self.qkv_projection.out_proj(a.reshape(x.shape))
