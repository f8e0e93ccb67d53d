"""dattn.dilated_attention against the float64 PyTorch reference of reference_attention.py."""

import math

import pytest
import torch

import dattn
from helpers import assert_close_bar, assert_lse, randn, rel_err, requires_cuda
from reference_attention import dilated_attention_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (B, N, H, D, segment_lengths, dilation_rates, mode, causal, padding, scale)
CASES = [
    pytest.param(2, 64, 4, 16, [16, 32, 64], [1, 2, 4], "grouped", False, False, None, id="grouped"),
    pytest.param(2, 64, 4, 16, [16, 32, 64], [1, 2, 4], "longnet", False, False, None, id="longnet"),
    pytest.param(1, 50, 5, 8, [16, 32, 20], [1, 2, 3], "grouped", True, False, None, id="grouped-causal-partial"),
    pytest.param(1, 50, 5, 8, [16, 32, 20], [1, 2, 3], "longnet", True, False, None, id="longnet-causal-partial"),
    pytest.param(2, 40, 2, 7, [8, 16, 64], [1, 2, 4], "grouped", False, True, None, id="grouped-H<G-padding-D7"),
    pytest.param(2, 40, 3, 12, [8, 64], [2, 5], "longnet", True, True, 0.3, id="longnet-causal-padding-scale"),
    pytest.param(1, 33, 3, 32, [128], [1], "grouped", False, False, None, id="one-segment-w>N"),
]


def padding_mask(B, N, generator=None):
    mask = torch.rand(B, N, generator=generator) < 0.3
    mask[-1, N // 2:] = True  # a long padded tail
    if B > 1:
        mask[0] = True  # a batch entry with every key padded: zeros, lse = -inf
    return mask


def run_case(B, N, H, D, w, r, mode, causal, padding, scale, dtype, dout_kind="random"):
    q, k, v = (randn(B, N, H, D, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = padding_mask(B, N) if padding else None
    out, lse = dattn.dilated_attention(q, k, v, w, r, is_causal=causal, scale=scale, mode=mode,
                                       key_padding_mask=mask, return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (B, H, N)
    if dout_kind == "random":
        dout = randn(B, N, H, D, dtype=dtype)
        out.backward(dout)
    else:  # out.sum(): autograd hands an all-zero-stride gradient
        dout = torch.ones(B, N, H, D, dtype=dtype)
        out.sum().backward()

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = dilated_attention_reference(q64, k64, v64, w, r, is_causal=causal, scale=scale, mode=mode,
                                               key_padding_mask=mask)
    ref.backward(dout.double())
    assert_close_bar(out, ref, dtype, "out")
    assert_lse(lse, ref_lse, dtype)
    for name, t, t64 in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        assert_close_bar(t.grad, t64.grad, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("B,N,H,D,w,r,mode,causal,padding,scale", CASES)
def test_against_reference(B, N, H, D, w, r, mode, causal, padding, scale, dtype):
    run_case(B, N, H, D, w, r, mode, causal, padding, scale, dtype)


@pytest.mark.parametrize("mode", ["grouped", "longnet"])
def test_float64_runs_the_reference(mode):
    run_case(2, 24, 3, 5, [8, 16], [1, 2], mode, True, True, None, torch.float64)


@pytest.mark.parametrize("mode", ["grouped", "longnet"])
def test_zero_stride_gradient_of_sum(mode):
    # out.sum().backward() hands an expanded gradient (all strides 0); the wrapper makes it contiguous.
    run_case(2, 48, 4, 16, [16, 48], [1, 3], mode, False, False, None, torch.float32, dout_kind="sum")


def test_views_of_a_fused_buffer_need_no_copy():
    B, N, H, D = 2, 64, 4, 16
    qkv = randn(B, N, 3, H, D, requires_grad=True)
    q, k, v = qkv.unbind(2)
    assert q.stride() == (N * 3 * H * D, 3 * H * D, D, 1)
    out = dattn.dilated_attention(q, k, v, [16, 64], [1, 2])
    dout = randn(B, N, H, D)
    out.backward(dout)
    base = qkv.detach().double().requires_grad_()
    ref, _ = dilated_attention_reference(*base.unbind(2), [16, 64], [1, 2])
    ref.backward(dout.double())
    assert_close_bar(out, ref, torch.float32, "out")
    assert_close_bar(qkv.grad, base.grad, torch.float32, "dqkv")


def test_other_strides():
    # [B, H, N, D] storage seen as [B, N, H, D] (SDPA's layout), and a batch-broadcast key.
    B, N, H, D = 2, 40, 3, 8
    q = randn(B, H, N, D).transpose(1, 2).requires_grad_()
    k = randn(1, N, H, D).expand(B, N, H, D)
    v = randn(B, N, H, 2 * D)[..., :D]
    out = dattn.dilated_attention(q, k, v, [8, 40], [1, 4], mode="longnet")
    ref, _ = dilated_attention_reference(q.double(), k.double(), v.double(), [8, 40], [1, 4], mode="longnet")
    assert_close_bar(out, ref, torch.float32, "out")


@pytest.mark.parametrize("mode", ["grouped", "longnet"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_qkvpacked_equals_unpacked(mode, dtype):
    B, N, H, D = 2, 48, 4, 8
    qkv = randn(B, N, 3, H, D, dtype=dtype, requires_grad=True)
    mask = padding_mask(B, N)
    out, lse = dattn.dilated_attention_qkvpacked(qkv, [16, 48], [1, 3], is_causal=True, mode=mode,
                                                 key_padding_mask=mask, return_lse=True)
    dout = randn(B, N, H, D, dtype=dtype)
    out.backward(dout)
    qkv2 = qkv.detach().clone().requires_grad_()
    out2, lse2 = dattn.dilated_attention(*qkv2.unbind(2), [16, 48], [1, 3], is_causal=True, mode=mode,
                                         key_padding_mask=mask, return_lse=True)
    out2.backward(dout)
    assert torch.equal(out, out2)
    assert torch.equal(lse, lse2)
    assert torch.equal(qkv.grad, qkv2.grad)


def test_lse_has_no_gradient():
    q, k, v = (randn(1, 16, 2, 4, requires_grad=True) for _ in range(3))
    out, lse = dattn.dilated_attention(q, k, v, [8], [1], return_lse=True)
    assert out.requires_grad and not lse.requires_grad


def test_no_grad_inference():
    q, k, v = (randn(1, 32, 2, 8, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        out = dattn.dilated_attention(q, k, v, [8, 16], [1, 2])
    assert not out.requires_grad
    ref, _ = dilated_attention_reference(q.double(), k.double(), v.double(), [8, 16], [1, 2])
    assert_close_bar(out, ref, torch.float32, "out")


# ---------------------------------------------------------------------------------------------
# gradcheck: float64 runs the C++ reference, so this exercises the bindings and autograd end to end.

@pytest.mark.parametrize("mode", ["grouped", "longnet"])
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(mode, causal):
    B, N, H, D = 2, 10, 3, 4
    q, k, v = (torch.randn(B, N, H, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[1, 7:] = True
    fn = lambda q, k, v: dattn.dilated_attention(q, k, v, [4, 10], [1, 2], is_causal=causal, mode=mode,
                                                 key_padding_mask=mask, scale=0.7)
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_gradcheck_qkvpacked_with_dropout():
    qkv = torch.randn(1, 12, 3, 2, 4, dtype=torch.float64, requires_grad=True)

    def fn(qkv):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)  # the same dropout mask on every evaluation
            return dattn.dilated_attention_qkvpacked(qkv, [6, 12], [1, 3], mode="longnet", dropout_p=0.3)

    assert torch.autograd.gradcheck(fn, (qkv,))


# ---------------------------------------------------------------------------------------------
# Dropout: the seed rule of SPEC.md.

def expected_seed(manual_seed):
    torch.manual_seed(manual_seed)
    return int(torch.randint(0, 2 ** 62, (1,)).item())


@pytest.mark.parametrize("mode", ["grouped", "longnet"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_dropout_matches_reference(mode, dtype):
    B, N, H, D, p = 2, 40, 3, 8, 0.25
    q, k, v = (randn(B, N, H, D, dtype=dtype, requires_grad=True) for _ in range(3))
    seed = expected_seed(1234)
    torch.manual_seed(1234)
    out = dattn.dilated_attention(q, k, v, [8, 40], [1, 2], mode=mode, dropout_p=p, is_causal=True)
    dout = randn(B, N, H, D, dtype=dtype)
    out.backward(dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = dilated_attention_reference(q64, k64, v64, [8, 40], [1, 2], mode=mode, dropout_p=p, dropout_seed=seed,
                                         is_causal=True)
    ref.backward(dout.double())
    bar = torch.float32 if dtype == torch.float32 else torch.float64
    assert_close_bar(out, ref, bar, "out")
    for name, t, t64 in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        assert_close_bar(t.grad, t64.grad, bar, name)
    # And it really dropped something: without dropout the answer differs.
    no_drop = dattn.dilated_attention(q, k, v, [8, 40], [1, 2], mode=mode, is_causal=True)
    assert rel_err(out, no_drop) > 0.05


def test_dropout_reproducible_with_manual_seed():
    q, k, v = (randn(1, 32, 2, 8) for _ in range(3))
    torch.manual_seed(5)
    a = dattn.dilated_attention(q, k, v, [16], [1], dropout_p=0.5)
    b = dattn.dilated_attention(q, k, v, [16], [1], dropout_p=0.5)
    torch.manual_seed(5)
    c = dattn.dilated_attention(q, k, v, [16], [1], dropout_p=0.5)
    assert torch.equal(a, c)
    assert not torch.equal(a, b)


def test_no_dropout_draws_no_seed():
    q, k, v = (randn(1, 16, 2, 4) for _ in range(3))
    torch.manual_seed(3)
    dattn.dilated_attention(q, k, v, [8], [1])
    after = torch.rand(1)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(1))


# ---------------------------------------------------------------------------------------------
# Validation: errors name the argument and the expected value.

def good(**overrides):
    args = dict(q=randn(1, 16, 2, 8), k=randn(1, 16, 2, 8), v=randn(1, 16, 2, 8), segment_lengths=[8, 16],
                dilation_rates=[1, 2])
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides,error,match", [
    (dict(q=randn(16, 2, 8)), ValueError, r"q has shape \[16, 2, 8\]; expected a 4-D \[B, N, H, D\]"),
    (dict(q=[1.0]), TypeError, "q is list; expected a torch.Tensor"),
    (dict(q=torch.ones(1, 16, 2, 8, dtype=torch.int32)), TypeError, "q has dtype torch.int32; expected"),
    (dict(k=randn(1, 16, 2, 8, dtype=torch.float64)), TypeError, r"k has dtype torch.float64; expected torch.float32"),
    (dict(v=randn(1, 17, 2, 8)), ValueError, r"v has shape \[1, 17, 2, 8\]; expected \[1, 16, 2, 8\]"),
    (dict(k=randn(1, 16, 8, 2).transpose(2, 3)), ValueError, "k has stride 2 along D; expected 1"),
    (dict(segment_lengths=[8], dilation_rates=[9]), ValueError,
     r"dilation rate must be in \[1, segment length\] in \(segment_lengths\[0\] = 8, dilation_rates\[0\] = 9\)"),
    (dict(segment_lengths=[8, 16], dilation_rates=[1]), ValueError, "segment_lengths has 2 entries but"),
    (dict(segment_lengths=[]), ValueError, "segment_lengths is empty"),
    (dict(segment_lengths=[8.5], dilation_rates=[1]), TypeError, "expected ints"),
    (dict(mode="dense"), ValueError, "mode = 'dense'; expected 'grouped' or 'longnet'"),
    (dict(dropout_p=1.0), ValueError, "dropout_p = 1.0; expected 0 <= dropout_p < 1"),
    (dict(scale=math.inf), ValueError, "scale = inf; expected a finite number"),
    (dict(key_padding_mask=torch.zeros(1, 16)), TypeError, "key_padding_mask has dtype torch.float32; expected torch.bool"),
    (dict(key_padding_mask=torch.zeros(2, 16, dtype=torch.bool)), ValueError,
     r"key_padding_mask has shape \[2, 16\]; expected \[1, 16\]"),
    (dict(q=randn(1, 16, 2, 300), k=randn(1, 16, 2, 300), v=randn(1, 16, 2, 300)), ValueError,
     "head dim D = 300 is not supported on the CPU; expected 1 <= D <= 256"),
])
def test_validation(overrides, error, match):
    with pytest.raises(error, match=match):
        dattn.dilated_attention(**good(**overrides))


def test_qkvpacked_validation():
    with pytest.raises(ValueError, match=r"qkv has shape \[1, 16, 2, 2, 8\]; expected a 5-D \[B, N, 3, H, D\]"):
        dattn.dilated_attention_qkvpacked(randn(1, 16, 2, 2, 8), [8], [1])


def test_forward_flops_matches_perf_md():
    # PERF.md: the `seed` config is 3.76 GFLOP forward in grouped mode.
    flops = dattn.forward_flops([512, 1024, 2048], [1, 2, 4], batch=2, seqlen=2048, heads=12, head_dim=64)
    assert abs(flops / 1e9 - 3.76) < 0.01


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("poisoned", ["q", "k"])
def test_nan_reaches_exactly_the_rows_that_see_it(device, dtype, poisoned):
    # Segments of 32, no dilation: a NaN in q[:, 37] spoils row 37 only, one in k[:, 37] every row of
    # its segment (32..63); the other rows stay finite, and nothing passes for "attended nothing".
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 96, 2, 64, generator=g).to(dtype).to(device) for _ in range(3))
    (q if poisoned == "q" else k)[0, 37, 1, 5] = float("nan")
    out, lse = dattn.dilated_attention(q, k, v, [32], [1], return_lse=True)
    rows = torch.isnan(out[0, :, 1]).any(-1).cpu()
    expected = torch.zeros(96, dtype=torch.bool)
    expected[slice(37, 38) if poisoned == "q" else slice(32, 64)] = True
    assert torch.equal(rows, expected)
    assert torch.equal(torch.isnan(lse[0, 1]).cpu(), expected)
    assert torch.isfinite(out[0, :, 0]).all()  # the other head never meets the NaN


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_gradients_bitwise_reproducible_under_deterministic_algorithms(device):
    # torch.use_deterministic_algorithms(True) asks the backward for its reproducible way (on CUDA
    # the dq blocks, never dQ by atomics): two runs give the same bits.
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 384, 4, 64, generator=g).to(torch.bfloat16).to(device) for _ in range(3))
    dout = torch.randn(2, 384, 4, 64, generator=g).to(torch.bfloat16).to(device)

    def gradients():
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        dattn.dilated_attention(*x, [128, 384], [1, 2], is_causal=True).backward(dout)
        return [t.grad for t in x]

    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        first, second = gradients(), gradients()
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
