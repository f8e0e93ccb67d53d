"""The PyTorch LongNet library's names (signatures checked with inspect.signature), called as that
library's users call them, each against the float64 reference where it computes something."""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import dattn
from helpers import rel_err
from test_sparse import reference as block_sparse_reference


def parameters(f):
    return [(p.name, p.default) for p in inspect.signature(f).parameters.values() if p.name != "self"]


E = inspect.Parameter.empty
VAR = inspect.Parameter.empty


def test_signatures():
    assert str(inspect.signature(dattn.create_dilated_attention)) == \
        "(attention_type='auto', segment_lengths=None, dilation_rates=None, **kwargs)"
    assert str(inspect.signature(dattn.create_multihead_dilated_attention)) == \
        "(attention_type='auto', embed_dim=768, num_heads=12, segment_lengths=None, dilation_rates=None, **kwargs)"
    assert str(inspect.signature(dattn.create_block_sparse_attention)) == \
        ("(variant='auto', segment_lengths=None, dilation_rates=None, sparse_config=None, sparsity_ratio=None, "
         "block_size=None, adaptive_config=None, distributed_config=None, embed_dim=None, num_heads=None, **kwargs)")
    assert str(inspect.signature(dattn.create_multihead_block_sparse)) == \
        "(embed_dim, num_heads, sparsity_ratio=0.1, **kwargs)"
    assert str(inspect.signature(dattn.get_block_sparse_preset)) == "(name, **overrides)"
    assert parameters(dattn.BlockSparseRingMultiheadDilatedAttention.__init__) == [
        ("embed_dim", E), ("num_heads", E), ("segment_lengths", E), ("dilation_rates", E), ("dropout", 0.0),
        ("bias", True), ("sparse_config", None), ("batch_first", True), ("kwargs", VAR)]
    layer = [("d_model", E), ("nhead", E), ("segment_lengths", E), ("dilation_rates", E), ("dim_feedforward", 2048),
             ("dropout", 0.1), ("activation", F.relu), ("layer_norm_eps", 1e-5), ("gamma_init", 1.0),
             ("device", None), ("dtype", None)]
    assert parameters(dattn.DilatedTransformerEncoderLayer.__init__) == layer
    assert parameters(dattn.DilatedTransformerDecoderLayer.__init__) == layer
    assert parameters(dattn.DilatedTransformerEncoderLayer.forward) == [("src", E), ("is_causal", False)]
    assert parameters(dattn.DilatedTransformerDecoderLayer.forward) == [
        ("tgt", E), ("memory", E), ("tgt_is_causal", False), ("memory_is_causal", False)]
    net = [("d_model", 768), ("nhead", 12), ("num_encoder_layers", 12), ("num_decoder_layers", 12),
           ("dim_feedforward", 3072), ("segment_lengths", [2048, 4096, 8192, 16384, 32768]),
           ("dilation_rates", [1, 2, 4, 6, 12]), ("dropout", 0.0), ("activation", F.relu), ("layer_norm_eps", 1e-5),
           ("device", None), ("dtype", None)]
    assert parameters(dattn.LongNet.__init__) == net
    assert parameters(dattn.LongNetLM.__init__) == [("num_tokens", E)] + net
    assert parameters(dattn.LongNet.forward) == [("x", E), ("is_causal", True)]
    assert parameters(dattn.LongNetLM.forward) == [("tokens", E), ("is_causal", True)]


def test_dilated_factories():
    core = dattn.create_dilated_attention()
    assert type(core) is dattn.DilatedAttention  # "auto" is "standard" on every machine
    assert core.segment_lengths == [2048, 4096, 8192] and core.dilation_rates == [1, 2, 4]
    improved = dattn.create_dilated_attention("improved", segment_lengths=[8, 16], dilation_rates=[1, 2], dropout=0.1)
    assert type(improved) is dattn.ImprovedDilatedAttention and improved.dropout == 0.1
    assert dattn.create_dilated_attention("standard", [8], [1], dropout=0.2).attention_dropout == 0.2
    assert type(dattn.create_dilated_attention("ring", [8], [1])) is dattn.RingDilatedAttention
    sparse = dattn.create_dilated_attention("block_sparse_ring", [64], [1], block_size=16, window_size=32)
    assert type(sparse) is dattn.BlockSparseRingDilatedAttention and sparse.sparse_config.block_size == 16
    mha = dattn.create_multihead_dilated_attention("improved", 64, 4, [16, 32], [1, 2], dropout=0.0)
    assert type(mha) is dattn.ImprovedMultiheadDilatedAttention
    assert (mha.embed_dim, mha.num_heads, mha.segment_lengths, mha.dilation_rates) == (64, 4, [16, 32], [1, 2])
    assert type(dattn.create_multihead_dilated_attention()) is dattn.MultiheadDilatedAttention
    assert type(dattn.create_multihead_dilated_attention("ring", 64, 4, [16], [1])) is dattn.MultiheadDilatedAttention
    assert type(dattn.create_multihead_dilated_attention("block_sparse_ring", 64, 4, [64], [1], block_size=16)) \
        is dattn.BlockSparseRingMultiheadDilatedAttention
    with pytest.raises(ValueError, match="attention_type = 'distributed'.*group="):
        dattn.create_dilated_attention("distributed")
    with pytest.raises(TypeError, match="bogus"):
        dattn.create_dilated_attention("standard", bogus=1)


def test_block_sparse_factories_and_presets():
    core = dattn.create_block_sparse_attention(segment_lengths=[64], dilation_rates=[1], block_size=16)
    assert type(core) is dattn.BlockSparseRingDilatedAttention and core.sparse_config.block_size == 16
    mha = dattn.create_block_sparse_attention(embed_dim=32, num_heads=4, sparse_config={"pattern_type": "dilated_sparse",
                                                                                       "block_size": 8})
    assert type(mha) is dattn.BlockSparseRingMultiheadDilatedAttention
    assert mha.sparse_config.pattern_type == "dilated_sparse" and mha.sparse_config.block_size == 8
    m = dattn.create_multihead_block_sparse(32, 4, sparsity_ratio=0.2)
    assert m.sparse_config.sparsity_ratio == 0.2 and m.segment_lengths == [2048, 4096, 8192]
    for name, pattern in (("local", "local_window"), ("dilated", "dilated_sparse"), ("global_local", "global_local"),
                          ("ultra_sparse", "dilated_sparse")):
        assert dattn.get_block_sparse_preset(name).pattern_type == pattern
    assert dattn.get_block_sparse_preset("local", window_size=512).window_size == 512
    with pytest.raises(ValueError, match="name = 'hilbert'"):
        dattn.get_block_sparse_preset("hilbert")
    with pytest.raises(ValueError, match="key 'window'"):
        dattn.get_block_sparse_preset("local", window=3)
    with pytest.raises(ValueError, match="sparse_config has key 'patern_type'"):
        dattn.BlockSparseRingDilatedAttention([64], [1], {"patern_type": "local_window"})
    with pytest.raises(ValueError, match="pattern_type = 'adaptive'"):
        dattn.BlockSparseRingDilatedAttention([64], [1], {"pattern_type": "adaptive"})
    with pytest.raises(NotImplementedError, match="group="):
        dattn.create_block_sparse_attention("distributed")
    with pytest.raises(NotImplementedError, match="SparsePatternConfig"):
        dattn.create_block_sparse_attention(adaptive_config={})
    with pytest.raises(ValueError, match="embed_dim = 32, num_heads = None"):
        dattn.create_block_sparse_attention(embed_dim=32)


@pytest.mark.parametrize("name", ["BlockSparseAdaptive", "create_adaptive_sparse_attention",
                                  "BlockSparseRingDistributedDilatedAttention", "PatternQualityAnalyzer",
                                  "SparsePatternGenerator"])
def test_out_of_scope_names_name_the_alternative(name):
    with pytest.raises(NotImplementedError, match=f"dattn does not provide {name}; use .*dattn\\."):
        getattr(dattn, name)()


@pytest.mark.parametrize("is_causal", [False, True])
def test_block_sparse_multihead_equals_composition_by_hand(is_causal):
    torch.manual_seed(1)
    m = dattn.BlockSparseRingMultiheadDilatedAttention(32, 4, [64], [1], sparse_config={"block_size": 8,
                                                                                       "window_size": 16}).double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[1, -5:] = True
    out, weights = m(x, key_padding_mask=mask, is_causal=is_causal)
    assert weights is None
    heads = lambda t: t.view(2, 40, 4, 8)
    q, k, v = heads(m.q_proj(x)), heads(m.k_proj(x)), heads(m.v_proj(x))
    attn = block_sparse_reference(q, k, v, dattn.local_window_mask(5, 16, 8), 8, is_causal, mask)[0]
    expected = m.out_proj(F.layer_norm(attn.reshape(2, 40, 32), (32,), m.norm.weight, m.norm.bias))
    assert rel_err(out, expected) < 1e-12
    seq_first, _ = dattn.BlockSparseRingMultiheadDilatedAttention(32, 4, [64], [1], batch_first=False).double()(
        x.transpose(0, 1))
    assert seq_first.shape == (40, 2, 32)
    _, weights = m(x, need_weights=True)
    assert weights["values"].shape[1] == weights["indices"].shape[1]  # averaged over heads: [B, nnz, block, block]
    with pytest.raises(TypeError, match="keyword 'use_adaptive_sparsity'"):
        dattn.BlockSparseRingMultiheadDilatedAttention(32, 4, [64], [1], use_adaptive_sparsity=True)


def small_lm(**kwargs):
    return dattn.LongNetLM(37, d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=48,
                           segment_lengths=[8, 16], dilation_rates=[1, 2], **kwargs)


def test_longnet_lm_is_causal():
    lm = small_lm(dtype=torch.float64).eval()
    tokens = torch.randint(0, 37, (2, 40))
    changed = tokens.clone()
    changed[:, 25:] = (changed[:, 25:] + 7) % 37
    a, b = lm(tokens), lm(changed)
    assert a.shape == (2, 40, 37)
    assert torch.equal(a[:, :25], b[:, :25])  # earlier logits do not see later tokens
    assert not torch.allclose(a[:, 25:], b[:, 25:])
    assert not torch.equal(lm(tokens, is_causal=False)[:, :25], lm(changed, is_causal=False)[:, :25])


def test_encoder_layer_equals_composition_by_hand():
    layer = dattn.DilatedTransformerEncoderLayer(32, 4, [8, 16], [1, 2], dim_feedforward=48, dropout=0.0,
                                                 dtype=torch.float64)
    x = torch.randn(2, 24, 32, dtype=torch.float64)
    h = layer.norm1(x)
    y = x + layer.self_attn(h, is_causal=True)
    ff = layer.linear2(layer.norm3(F.relu(layer.linear1(layer.norm2(y)))))
    assert rel_err(layer(x, is_causal=True), y + ff) < 1e-12
    assert layer.self_attn.layer_norm and layer.self_attn.norm_style == "sub_ln"
    gamma = math.sqrt(math.log(3 * 2) * math.log(2 * 3) / 3)
    net = dattn.LongNet(32, 4, 3, 2, 48, [8], [1])
    assert net.encoder.layers[0].gamma_init == pytest.approx(gamma)
    assert net.decoder.layers[1].gamma_init == pytest.approx(math.sqrt(math.log(6)))
    assert not net.decoder.layers[0].self_attn.layer_norm
    with pytest.raises(ValueError, match="num_decoder_layers = 0"):
        dattn.LongNet(32, 4, 1, 0)
    with pytest.raises(ValueError, match="activation = 'tanh'"):
        dattn.DilatedTransformerEncoderLayer(32, 4, [8], [1], activation="tanh")


def test_longnet_gradcheck():
    lm = small_lm(dtype=torch.float64)
    net = dattn.LongNet(8, 2, 1, 1, 8, [4, 8], [1, 2], dtype=torch.float64)
    x = torch.randn(1, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: net(x), (x,))
    with pytest.raises(TypeError, match="tokens is a 3-D torch.float64 tensor"):
        lm(x)


def test_backends_report():
    info = dattn.backends()
    assert set(info) == {"cpu_isas", "cpu_isa", "cuda", "cuda_architectures", "cuda_device_visible", "cuda_kernels",
                         "mpi", "nccl"}
    assert (info["cuda_kernels"] != []) == info["cuda"] and set(info["cuda_kernels"]) <= {"sm80", "sm90"}
    assert "scalar" in info["cpu_isas"] and info["cpu_isa"] in info["cpu_isas"]
    assert info["cuda"] == dattn.has_cuda and (info["cuda_architectures"] != []) == info["cuda"]
