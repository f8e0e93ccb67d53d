"""dattn.from_longnet on stand-ins with that library's class and parameter names: the converted
module reproduces the composition written out by hand from docs/semantics.md to 1e-10 (float64)."""

import warnings

import pytest
import torch
from torch import nn

import dattn
import longnet_standins as lib
from helpers import rel_err

E, H, W, R = 16, 4, [8, 16], [1, 2]
BAR = 1e-10


def x_of(n=32, batch=2, seed=1):
    return torch.randn(batch, n, E, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("layer_norm", [True, False])
@pytest.mark.parametrize("is_causal", [False, True])
def test_unfused_module_maps_to_longnet_pytorch_norm_style(layer_norm, is_causal):
    source = lib.randomise_(lib.MultiheadDilatedAttention(E, H, R, W, layer_norm=layer_norm))
    converted = dattn.from_longnet(source)
    assert isinstance(converted, dattn.MultiheadDilatedAttention)
    assert converted.norm_style == "longnet_pytorch" and converted.layer_norm == layer_norm
    assert set(converted.state_dict()) == set(source.state_dict())  # the library's checkpoints load strictly
    x, y = x_of(), x_of(seed=2)
    assert rel_err(converted(x, is_causal=is_causal), source.expected(x, x, x, is_causal)) < BAR
    assert rel_err(converted(x, y, y, is_causal=is_causal), source.expected(x, y, y, is_causal)) < BAR


def test_fused_module_warns_once_and_computes_the_spec_function():
    source = lib.randomise_(lib.ImprovedMultiheadDilatedAttention(E, H, R, W))
    dattn.convert._WARNED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = dattn.from_longnet(source)
        dattn.from_longnet(source)
    assert [str(w.message) for w in caught if "Improved" in str(w.message)].__len__() == 1
    assert isinstance(converted, dattn.ImprovedMultiheadDilatedAttention) and converted.norm_style == "sub_ln"
    x = x_of()
    out, weights = converted(x, is_causal=True)
    assert weights is None and rel_err(out, source.expected(x, is_causal=True)) < BAR


@pytest.mark.parametrize("cls", [lib.DilatedAttention, lib.ImprovedDilatedAttention])
def test_attention_core(cls):
    source = cls(W, R, softmax_scale=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = dattn.from_longnet(source)
    assert isinstance(converted, dattn.DilatedAttention)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 32, H, 8, generator=g, dtype=torch.float64) for _ in range(3))
    assert rel_err(converted(q, k, v, is_causal=True), source.expected(q, k, v, is_causal=True)) < BAR


def test_transformer_layers():
    encoder = lib.randomise_(lib.DilatedTransformerEncoderLayer(E, H, W, R, 24), seed=4)
    decoder = lib.randomise_(lib.DilatedTransformerDecoderLayer(E, H, W, R, 24), seed=5)
    enc, dec = dattn.from_longnet(encoder), dattn.from_longnet(decoder)
    assert isinstance(enc, dattn.DilatedTransformerEncoderLayer)
    assert isinstance(dec, dattn.DilatedTransformerDecoderLayer)
    x, memory = x_of(), x_of(seed=6)
    assert rel_err(enc(x, is_causal=True), encoder.expected(x, is_causal=True)) < BAR
    assert rel_err(dec(x, memory, tgt_is_causal=True, memory_is_causal=True),
                   decoder.expected(x, memory, is_causal=True)) < BAR


def test_long_net_and_language_model():
    net = lib.randomise_(lib.LongNet(E, H, W, R, 24, 2, 1), seed=7)
    converted = dattn.from_longnet(net)
    assert isinstance(converted, dattn.LongNet)
    x = x_of(n=20)
    assert rel_err(converted(x), net.expected(x)) < BAR
    lm = lib.randomise_(lib.LongNetLM(11, E, H, W, R, 24, 1, 2), seed=8)
    converted = dattn.from_longnet(lm)
    assert isinstance(converted, dattn.LongNetLM)
    tokens = torch.randint(0, 11, (2, 21), generator=torch.Generator().manual_seed(9))
    assert rel_err(converted(tokens), lm.expected(tokens)) < BAR
    assert rel_err(converted(tokens, is_causal=False), lm.expected(tokens, is_causal=False)) < BAR


def test_a_model_containing_library_modules_is_converted_inside_and_left_unchanged():
    model = nn.Sequential(nn.Linear(E, E), lib.MultiheadDilatedAttention(E, H, R, W))
    lib.randomise_(model, seed=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = dattn.from_longnet(model)
    assert isinstance(converted[1], dattn.MultiheadDilatedAttention)
    assert isinstance(model[1], lib.MultiheadDilatedAttention)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = x_of()
    h = model[0](x)
    assert rel_err(converted(x), model[1].expected(h, h, h)) < BAR


def test_bad_input_is_named():
    with pytest.raises(TypeError, match="module is int"):
        dattn.from_longnet(3)


def test_block_sparse_multihead_computes_one_softmax_per_row():
    source = lib.randomise_(lib.BlockSparseRingMultiheadDilatedAttention(
        E, H, [64], [1], lib.SparsePatternConfig(block_size=8, window_size=24)), seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = dattn.from_longnet(source)
    assert isinstance(converted, dattn.BlockSparseRingMultiheadDilatedAttention)
    assert converted.sparse_config.block_size == 8 and converted.sparse_config.window_size == 24
    x = x_of(n=44)
    for is_causal in (False, True):
        out, _ = converted(x, is_causal=is_causal)
        assert rel_err(out, source.expected(x, is_causal)) < BAR
    source.use_layer_norm = True
    with pytest.raises(NotImplementedError, match="use_layer_norm=True"):
        dattn.from_longnet(source)
