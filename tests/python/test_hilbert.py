"""Hilbert-ordered attention: the curve, and attention over permuted rows returned in place."""

import json
import math
import os

import pytest
import torch

import dattn
from helpers import assert_close_bar, requires_cuda
from reference_attention import dilated_attention_reference

ORDERS = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "hilbert_orders.json")


@pytest.mark.skipif(not os.path.exists(ORDERS), reason="shared/hilbert_orders.json is not beside the repository")
def test_orders_match_the_normative_file():
    with open(ORDERS) as f:
        orders = json.load(f)
    for key, expected in orders["grids"].items():
        h, w = map(int, key.split("x"))
        assert dattn.hilbert_order(h * w, (h, w)).tolist() == expected, key
    for key, expected in orders["sequences"].items():
        assert dattn.hilbert_order(int(key)).tolist() == expected, key


def test_bijection_and_errors():
    for h, w in [(1, 1), (3, 5), (7, 2), (16, 16), (13, 9)]:
        assert sorted(dattn.hilbert_order(h * w, (h, w)).tolist()) == list(range(h * w))
    with pytest.raises(ValueError, match="Hgrid"):
        dattn.HilbertDilatedAttention([8], [1], grid_shape=(3, 3))(*(torch.randn(1, 10, 1, 4) for _ in range(3)))


@pytest.mark.parametrize("mode", ["grouped", "longnet"])
def test_matches_dilated_attention_on_permuted_rows(mode):
    torch.manual_seed(0)
    B, N, H, D = 2, 35, 3, 8
    q, k, v = (torch.randn(B, N, H, D, requires_grad=True) for _ in range(3))
    padding = torch.rand(B, N) < 0.2
    module = dattn.HilbertDilatedAttention([8, 16], [1, 2], grid_shape=(5, 7), mode=mode)
    out = module(q, k, v, key_padding_mask=padding)
    order = dattn.hilbert_order(N, (5, 7))
    q64, k64, v64 = (t.detach().double()[:, order].requires_grad_() for t in (q, k, v))
    ref_perm, _ = dilated_attention_reference(q64, k64, v64, [8, 16], [1, 2], mode=mode,
                                              key_padding_mask=padding[:, order])
    ref = torch.empty_like(ref_perm)
    ref[:, order] = ref_perm
    assert_close_bar(out, ref, torch.float32, "out")
    grad = torch.randn(out.shape)
    out.backward(grad)
    ref.backward(grad.double())
    for x, r_perm in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        r = torch.empty_like(r_perm)
        r[:, order] = r_perm
        assert_close_bar(x, r, torch.float32, "grad")


def test_identity_order_equals_dilated_attention_exactly():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 40, 2, 8) for _ in range(3))
    out = dattn.hilbert_dilated_attention(q, k, v, [16], [2], is_causal=True, order=torch.arange(40))
    assert torch.equal(out, dattn.dilated_attention(q, k, v, [16], [2], is_causal=True))


def test_no_grad_call_matches_the_recorded_one():
    """With no gradient to record the call skips the autograd.Function: the same out and lse."""
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 64, 4, 8, requires_grad=True) for _ in range(3))
    out, lse = dattn.hilbert_dilated_attention(q, k, v, [32, 64], [1, 2], grid_shape=(8, 8), return_lse=True)
    with torch.no_grad():
        out2, lse2 = dattn.hilbert_dilated_attention(q, k, v, [32, 64], [1, 2], grid_shape=(8, 8), return_lse=True)
    assert out.grad_fn is not None and out2.grad_fn is None
    assert torch.equal(out.detach(), out2) and torch.equal(lse, lse2)


def test_hilbert_attention_module():
    torch.manual_seed(2)
    module = dattn.HilbertAttention(hidden_dim=24, num_heads=3, segment_size=16, dilation_rate=2)
    assert dattn.HilbertAttentionTritonFixed is dattn.HilbertAttention
    x = torch.randn(2, 30, 24)
    out = module(x)
    qkv = module.qkv_proj(x).view(2, 30, 3, 3, 8).double()
    order = dattn.hilbert_order(30)
    ref_perm, _ = dilated_attention_reference(qkv[:, order, 0], qkv[:, order, 1], qkv[:, order, 2], [16], [2],
                                              mode="longnet")
    ref = torch.empty_like(ref_perm)
    ref[:, order] = ref_perm
    expected = module.out_proj(ref.reshape(2, 30, 24).float())
    assert_close_bar(out, expected.double(), torch.float32, "module")
    plain = module(x, use_hilbert=False)
    direct = module.out_proj(dattn.dilated_attention(*module.qkv_proj(x).view(2, 30, 3, 3, 8).unbind(2), [16], [2],
                                                     mode="longnet").reshape(2, 30, 24))
    assert torch.allclose(plain, direct, atol=1e-6)


@requires_cuda
@pytest.mark.parametrize("mode", ["grouped", "longnet"])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_hilbert_matches_float64(mode, causal):
    torch.manual_seed(3)
    B, N, H, D = 2, 300, 4, 64
    q, k, v, grad = (torch.randn(B, N, H, D) for _ in range(4))
    module = dattn.HilbertDilatedAttention([64, 128], [1, 2], grid_shape=(15, 20), mode=mode)
    x64 = [t.double().requires_grad_() for t in (q, k, v)]
    ref = module(*x64, is_causal=causal)
    ref.backward(grad.double())
    xs = [t.cuda().to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    out = module(*xs, is_causal=causal)
    out.backward(grad.cuda().to(torch.bfloat16))
    assert_close_bar(out, ref, torch.bfloat16, "out")
    for name, got, want in zip(("dq", "dk", "dv"), xs, x64):
        assert_close_bar(got.grad, want.grad, torch.bfloat16, name)
