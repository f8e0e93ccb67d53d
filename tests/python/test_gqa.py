"""Grouped-query heads (k, v with Hkv heads, H % Hkv == 0; query head h reads head h // (H / Hkv)):
the functional forms and the multi-head modules against the float64 reference (dattn on float64
tensors runs the C++ reference), and against attention over k, v repeated to H heads."""

import pytest
import torch

import dattn
from helpers import assert_close_bar, assert_lse, randn

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = lambda d: str(d).split(".")[-1]  # noqa: E731

# (B, N, H, Hkv, D, segment_lengths, dilation_rates, mode, causal, padding, dropout_p)
CASES = [
    pytest.param(2, 64, 4, 2, 16, [16, 32, 64], [1, 2, 4], "grouped", False, False, 0.0, id="grouped-ratio2"),
    pytest.param(2, 64, 4, 1, 16, [16, 32, 64], [1, 2, 4], "longnet", True, False, 0.0, id="longnet-mqa-causal"),
    pytest.param(1, 50, 8, 2, 8, [16, 32, 20], [1, 2, 3], "grouped", True, True, 0.0, id="grouped-ratio4-partial"),
    pytest.param(2, 41, 2, 1, 7, [8, 16, 64], [1, 2, 4], "grouped", False, True, 0.2, id="H<G-mqa-dropout"),
    pytest.param(1, 37, 6, 3, 12, [8, 64], [2, 5], "longnet", True, True, 0.3, id="longnet-dropout-padding"),
    pytest.param(2, 33, 3, 3, 32, [128], [1], "grouped", False, False, 0.0, id="ratio1"),
]


def padding_mask(B, N):
    mask = torch.rand(B, N) < 0.3
    mask[-1, N // 2:] = True
    return mask


def reference(fn, q, k, v, dout, seed):
    """fn on float64 copies (the C++ reference), with the same dropout seed; returns out, lse, grads."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    torch.manual_seed(seed)
    out, lse = fn(q64, k64, v64)
    out.backward(dout.double())
    return out, lse, (q64.grad, k64.grad, v64.grad)


def check_against_reference(fn, q, k, v, dtype, seed=0):
    torch.manual_seed(seed)
    out, lse = fn(q, k, v)
    assert out.shape == q.shape and lse.shape == (q.size(0), q.size(2), q.size(1))
    dout = randn(*q.shape, dtype=dtype)
    out.backward(dout)
    assert k.grad.shape == k.shape and v.grad.shape == v.shape
    ref, ref_lse, grads = reference(fn, q, k, v, dout, seed)
    assert_close_bar(out, ref, dtype, "out")
    assert_lse(lse, ref_lse, dtype)
    for name, t, ref_grad in zip(("dq", "dk", "dv"), (q, k, v), grads):
        assert_close_bar(t.grad, ref_grad, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("B,N,H,Hkv,D,w,r,mode,causal,padding,p", CASES)
def test_dilated_attention(B, N, H, Hkv, D, w, r, mode, causal, padding, p, dtype):
    q = randn(B, N, H, D, dtype=dtype, requires_grad=True)
    k, v = (randn(B, N, Hkv, D, dtype=dtype, requires_grad=True) for _ in range(2))
    mask = padding_mask(B, N) if padding else None
    check_against_reference(
        lambda q, k, v: dattn.dilated_attention(q, k, v, w, r, is_causal=causal, mode=mode, key_padding_mask=mask,
                                                dropout_p=p, return_lse=True), q, k, v, dtype)


@pytest.mark.parametrize("mode", ["grouped", "longnet"])
@pytest.mark.parametrize("H,Hkv", [(4, 2), (4, 1), (6, 3)])
def test_equals_attention_over_repeated_heads(H, Hkv, mode):
    """Query head h reads key/value head h // (H / Hkv); dk, dv sum over the heads that share one."""
    q = randn(2, 45, H, 8, dtype=torch.float64, requires_grad=True)
    k, v = (randn(2, 45, Hkv, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    dout = randn(2, 45, H, 8, dtype=torch.float64)
    args = ([8, 16, 32], [1, 2, 4])
    out = dattn.dilated_attention(q, k, v, *args, is_causal=True, mode=mode)
    out.backward(dout)
    k_rep, v_rep = (t.detach().repeat_interleave(H // Hkv, dim=2).requires_grad_() for t in (k, v))
    q2 = q.detach().requires_grad_()
    out_rep = dattn.dilated_attention(q2, k_rep, v_rep, *args, is_causal=True, mode=mode)
    out_rep.backward(dout)
    assert torch.allclose(out, out_rep, rtol=0, atol=1e-12)
    assert torch.allclose(q.grad, q2.grad, rtol=0, atol=1e-12)
    for grad, repeated in ((k.grad, k_rep.grad), (v.grad, v_rep.grad)):
        summed = repeated.view(2, 45, Hkv, H // Hkv, 8).sum(3)
        assert torch.allclose(grad, summed, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("per_head", [False, True])
def test_block_sparse_attention(per_head, dtype):
    H, Hkv, N, block = 4, 2, 70, 8
    nb = (N + block - 1) // block
    dense = torch.rand((H, nb, nb) if per_head else (nb, nb)) < 0.4
    mask = dattn.block_sparse_mask(dense, "cpu")
    q = randn(2, N, H, 16, dtype=dtype, requires_grad=True)
    k, v = (randn(2, N, Hkv, 16, dtype=dtype, requires_grad=True) for _ in range(2))
    check_against_reference(
        lambda q, k, v: dattn.block_sparse_attention(q, k, v, mask, block, is_causal=per_head,
                                                     dropout_p=0.0 if per_head else 0.25, return_lse=True),
        q, k, v, dtype)


def test_hilbert_functional_form():
    q = randn(1, 36, 4, 8, requires_grad=True)
    k, v = (randn(1, 36, 1, 8, requires_grad=True) for _ in range(2))
    check_against_reference(
        lambda q, k, v: dattn.hilbert_dilated_attention(q, k, v, [9, 18], [1, 2], grid_shape=(6, 6), is_causal=True,
                                                        return_lse=True), q, k, v, torch.float32)


def test_errors_name_both_head_counts():
    q = randn(1, 8, 4, 8)
    with pytest.raises(ValueError, match="k has 3 heads and q has H = 4"):
        dattn.dilated_attention(q, randn(1, 8, 3, 8), randn(1, 8, 3, 8), [4], [1])
    with pytest.raises(ValueError, match="v has shape"):
        dattn.dilated_attention(q, randn(1, 8, 2, 8), randn(1, 8, 4, 8), [4], [1])


@pytest.mark.parametrize("cls", [dattn.MultiheadDilatedAttention, dattn.ImprovedMultiheadDilatedAttention])
def test_modules_take_num_kv_heads(cls):
    torch.manual_seed(0)
    E, H, Hkv = 32, 4, 2
    m = cls(E, H, [1, 2], [8, 16], num_kv_heads=Hkv, dtype=torch.float64)
    assert m.num_kv_heads == Hkv
    if cls is dattn.ImprovedMultiheadDilatedAttention:
        assert m.qkv_proj.weight.shape == (E + 2 * Hkv * E // H, E)
    else:
        assert m.k_proj.weight.shape == m.v_proj.weight.shape == (Hkv * E // H, E)
    x = randn(2, 24, E, dtype=torch.float64)
    y = randn(2, 24, E, dtype=torch.float64)
    for key, value in ((x, x), (y, y), (y, x)):  # self-attention, shared key/value, separate
        out = m(x, key, value, is_causal=True)
        if cls is dattn.ImprovedMultiheadDilatedAttention:
            out, weights = out  # the fused module returns (output, None), as that library's does
            assert weights is None
        # The same attention written out: projections, k, v repeated per query head, dattn without GQA.
        D = E // H
        if cls is dattn.ImprovedMultiheadDilatedAttention:
            w, b = m.qkv_proj.weight, m.qkv_proj.bias
            wq, wk, wv = w[:E], w[E:E + Hkv * D], w[E + Hkv * D:]
            bq, bk, bv = b[:E], b[E:E + Hkv * D], b[E + Hkv * D:]
        else:
            (wq, bq), (wk, bk), (wv, bv) = ((p.weight, p.bias) for p in (m.q_proj, m.k_proj, m.v_proj))
        q = torch.nn.functional.linear(x, wq, bq).view(2, 24, H, D)
        k = torch.nn.functional.linear(key, wk, bk).view(2, 24, Hkv, D).repeat_interleave(H // Hkv, dim=2)
        v = torch.nn.functional.linear(value, wv, bv).view(2, 24, Hkv, D).repeat_interleave(H // Hkv, dim=2)
        a = dattn.dilated_attention(q, k, v, [8, 16], [1, 2], is_causal=True).reshape(2, 24, E)
        expected = m.out_proj(m.norm(a))
        assert torch.allclose(out, expected, rtol=0, atol=1e-10)
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_module_num_kv_heads_errors():
    with pytest.raises(ValueError, match="num_kv_heads = 3 does not divide num_heads = 4"):
        dattn.MultiheadDilatedAttention(32, 4, [1], [8], num_kv_heads=3)
    with pytest.raises(TypeError, match="num_kv_heads"):
        dattn.ImprovedMultiheadDilatedAttention(32, 4, [1], [8], num_kv_heads=2.0)
    with pytest.raises(TypeError):  # keyword-only
        dattn.MultiheadDilatedAttention(32, 4, [1], [8], 0.0, True, True, 1e-5, 1.0, None, None, "grouped", None,
                                        "contiguous", 2)


def test_block_sparse_module_weights():
    """The module's attention weights with Hkv heads equal those with k, v repeated per query head."""
    torch.manual_seed(2)
    q = torch.randn(2, 100, 4, 16)
    k, v = torch.randn(2, 100, 2, 16), torch.randn(2, 100, 2, 16)
    module = dattn.BlockSparseRingDilatedAttention([64], [1], dattn.SparsePatternConfig("local_window", block_size=32,
                                                                                        window_size=96))
    out, weights = module(q, k, v, is_causal=True, return_attention_weights=True)
    out_rep, weights_rep = module(q, k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2), is_causal=True,
                                  return_attention_weights=True)
    assert torch.allclose(out, out_rep, atol=1e-6)
    assert torch.allclose(weights["values"], weights_rep["values"], atol=1e-6)
