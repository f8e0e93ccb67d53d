"""Packed variable-length batches: dattn.dilated_attention_varlen and block_sparse_attention_varlen
against the float64 reference (dattn on float64 tensors runs the C++ reference), against each
sequence attended alone, with sequences of length 0 and 1, grouped-query heads and dropout."""

import pytest
import torch

import dattn
from helpers import assert_close_bar, assert_lse, randn

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = lambda d: str(d).split(".")[-1]  # noqa: E731


def packed_inputs(lengths, H, Hkv, D, dtype):
    T = sum(lengths)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)
    q = randn(T, H, D, dtype=dtype, requires_grad=True)
    k, v = (randn(T, Hkv, D, dtype=dtype, requires_grad=True) for _ in range(2))
    return q, k, v, cu, max(lengths)


def check_against_reference(fn, q, k, v, dtype, seed=3):
    torch.manual_seed(seed)
    out, lse = fn(q, k, v)
    dout = randn(*q.shape, dtype=dtype)
    out.backward(dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    torch.manual_seed(seed)
    ref, ref_lse = fn(q64, k64, v64)
    ref.backward(dout.double())
    assert out.shape == q.shape and lse.shape == (q.size(1), q.size(0))
    assert_close_bar(out, ref, dtype, "out")
    assert_lse(lse, ref_lse, dtype)
    for name, t, t64 in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        assert t.grad.shape == t.shape
        assert_close_bar(t.grad, t64.grad, dtype, name)


# (lengths, H, Hkv, D, segment_lengths, dilation_rates, mode, causal, dropout_p)
CASES = [
    pytest.param([17, 0, 1, 40], 4, 2, 16, [8, 16], [1, 2], "grouped", True, 0.0, id="grouped-causal-gqa-0-1"),
    pytest.param([33, 5, 64], 2, 2, 8, [4, 16, 32], [1, 2, 4], "longnet", False, 0.0, id="longnet"),
    pytest.param([1, 1, 29], 3, 1, 7, [6, 64], [2, 3], "grouped", False, 0.25, id="mqa-dropout-w>N"),
    pytest.param([50, 0], 4, 4, 32, [12], [3], "longnet", True, 0.3, id="longnet-causal-dropout"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lengths,H,Hkv,D,w,r,mode,causal,p", CASES)
def test_dilated_against_reference(lengths, H, Hkv, D, w, r, mode, causal, p, dtype):
    q, k, v, cu, max_seqlen = packed_inputs(lengths, H, Hkv, D, dtype)
    check_against_reference(
        lambda q, k, v: dattn.dilated_attention_varlen(q, k, v, cu, max_seqlen, w, r, is_causal=causal, mode=mode,
                                                       dropout_p=p, return_lse=True), q, k, v, dtype)


@pytest.mark.parametrize("mode", ["grouped", "longnet"])
def test_each_sequence_alone(mode):
    """The definition: sequence b equals dilated_attention of that sequence as a batch of one."""
    lengths = [21, 0, 1, 34, 8]
    q, k, v, cu, max_seqlen = packed_inputs(lengths, 4, 2, 8, torch.float64)
    args = ([4, 16], [1, 2])
    out, lse = dattn.dilated_attention_varlen(q, k, v, cu, max_seqlen, *args, is_causal=True, mode=mode,
                                              return_lse=True)
    out.sum().backward()
    start = 0
    for n in lengths:
        if n:
            rows = slice(start, start + n)
            qs, ks, vs = (t.detach()[rows].unsqueeze(0).requires_grad_() for t in (q, k, v))
            alone, alone_lse = dattn.dilated_attention(qs, ks, vs, *args, is_causal=True, mode=mode, return_lse=True)
            alone.sum().backward()
            assert torch.allclose(out[rows], alone[0], rtol=0, atol=1e-12)
            assert torch.equal(torch.isinf(lse[:, rows]), torch.isinf(alone_lse[0]))
            for t, ts in ((q, qs), (k, ks), (v, vs)):
                assert torch.allclose(t.grad[rows], ts.grad[0], rtol=0, atol=1e-12)
        start += n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS)
@pytest.mark.parametrize("config", [dict(pattern_type="local_window", window_size=16),
                                    dict(pattern_type="dilated_sparse", dilation_rates=[1, 3]),
                                    dict(pattern_type="global_local", window_size=8, global_tokens=1)],
                         ids=lambda c: c["pattern_type"])
def test_block_sparse(config, dtype):
    lengths = [37, 0, 1, 64, 9]
    pattern = dattn.SparsePatternConfig(block_size=8, **config)
    q, k, v, cu, max_seqlen = packed_inputs(lengths, 4, 2, 16, dtype)
    check_against_reference(
        lambda q, k, v: dattn.block_sparse_attention_varlen(q, k, v, cu, max_seqlen, pattern, 8, is_causal=True,
                                                            dropout_p=0.2, return_lse=True), q, k, v, dtype)
    # Each sequence alone with the pattern's mask for its length (float64, no dropout).
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    out = dattn.block_sparse_attention_varlen(q64, k64, v64, cu, max_seqlen, pattern, 8)
    start = 0
    for n in lengths:
        if n:
            rows = slice(start, start + n)
            alone = dattn.block_sparse_attention(q64[rows][None], k64[rows][None], v64[rows][None],
                                                 pattern.dense_mask(n), 8)
            assert torch.allclose(out[rows], alone[0], rtol=0, atol=1e-12)
        start += n


def test_validate_false_on_good_input():
    q, k, v, cu, max_seqlen = packed_inputs([5, 9], 2, 1, 8, torch.float32)
    a = dattn.dilated_attention_varlen(q, k, v, cu, max_seqlen, [4], [1])
    b = dattn.dilated_attention_varlen(q, k, v, cu, max_seqlen, [4], [1], validate=False)
    assert torch.equal(a, b)


def test_errors_name_the_argument():
    q, k, v, cu, _ = packed_inputs([5, 9], 2, 1, 8, torch.float32)
    call = lambda cu, max_seqlen=9, **kw: dattn.dilated_attention_varlen(q, k, v, cu, max_seqlen, [4], [1], **kw)  # noqa
    with pytest.raises(ValueError, match=r"cu_seqlens\[0\] = 1; expected 0"):
        call(torch.tensor([1, 5, 14], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens\[2\] = 3 < cu_seqlens\[1\] = 5"):
        call(torch.tensor([0, 5, 3, 14], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens\[2\] = 13; expected T = 14"):
        call(torch.tensor([0, 5, 13], dtype=torch.int32))
    with pytest.raises(ValueError, match="max_seqlen = 8"):
        call(cu, 8)
    with pytest.raises(ValueError, match="cu_seqlens has dtype torch.int64"):
        call(cu.long())
    with pytest.raises(ValueError, match="k has 3 heads and q has H = 2"):
        dattn.dilated_attention_varlen(q, randn(14, 3, 8), randn(14, 3, 8), cu, 9, [4], [1])
    with pytest.raises(ValueError, match="expected a 3-D"):
        dattn.dilated_attention_varlen(q[None], k, v, cu, 9, [4], [1])
    pattern = dattn.SparsePatternConfig("local_window", block_size=4, window_size=8)
    with pytest.raises(ValueError, match="block_size = 8 but pattern.block_size = 4"):
        dattn.block_sparse_attention_varlen(q, k, v, cu, 9, pattern, 8)
    with pytest.raises(ValueError, match="'dilated' needs segment lengths"):
        dattn.block_sparse_attention_varlen(q, k, v, cu, 9, dattn.SparsePatternConfig("dilated", block_size=4), 4)
    with pytest.raises(TypeError, match="expected a dattn.SparsePatternConfig"):
        dattn.block_sparse_attention_varlen(q, k, v, cu, 9, torch.ones(4, 4, dtype=torch.bool), 4)
