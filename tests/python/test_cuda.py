"""CUDA: the same checks on the GPU (skipped without a GPU or without dattn's CUDA backend;
DATTN_REQUIRE_CUDA=1 turns the skip into a failure, for scripts/gpu-check)."""

import pytest
import torch

import dattn
from helpers import assert_close_bar, assert_lse, randn, rel_err, requires_cuda
from reference_attention import dilated_attention_reference

pytestmark = requires_cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def padding_mask(B, N):
    mask = torch.rand(B, N) < 0.2
    mask[-1, N - N // 3:] = True
    return mask


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("mode,causal,padding", [("grouped", False, False), ("grouped", True, True),
                                                 ("longnet", False, True), ("longnet", True, False)])
@pytest.mark.parametrize("D", [16, 64, 128])
def test_against_reference(D, mode, causal, padding, dtype):
    B, N, H = 2, 256, 6
    w, r = [64, 128, 256], [1, 2, 4]
    q, k, v = (randn(B, N, H, D, dtype=dtype, device="cuda", requires_grad=True) for _ in range(3))
    mask = padding_mask(B, N) if padding else None
    out, lse = dattn.dilated_attention(q, k, v, w, r, is_causal=causal, mode=mode,
                                       key_padding_mask=None if mask is None else mask.cuda(), return_lse=True)
    dout = randn(B, N, H, D, dtype=dtype, device="cuda")
    out.backward(dout)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = dilated_attention_reference(q64, k64, v64, w, r, is_causal=causal, mode=mode, key_padding_mask=mask)
    ref.backward(dout.cpu().double())
    assert out.device.type == "cuda" and lse.device.type == "cuda"
    assert_close_bar(out, ref, dtype, "out")
    assert_lse(lse, ref_lse, dtype)
    for name, t, t64 in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        assert_close_bar(t.grad, t64.grad, dtype, name)


def test_tf32_path_within_its_bar():
    q, k, v = (randn(1, 256, 4, 64, device="cuda") for _ in range(3))
    out = dattn.dilated_attention(q, k, v, [64, 256], [1, 4], use_tf32=True)
    ref, _ = dilated_attention_reference(q.cpu().double(), k.cpu().double(), v.cpu().double(), [64, 256], [1, 4])
    assert rel_err(out, ref) <= 3e-3


def test_fused_buffer_views_and_packed():
    B, N, H, D = 2, 128, 4, 64
    qkv = randn(B, N, 3, H, D, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    out = dattn.dilated_attention_qkvpacked(qkv, [32, 128], [1, 2], is_causal=True)
    dout = randn(B, N, H, D, dtype=torch.bfloat16, device="cuda")
    out.backward(dout)
    base = qkv.detach().cpu().double().requires_grad_()
    ref, _ = dilated_attention_reference(*base.unbind(2), [32, 128], [1, 2], is_causal=True)
    ref.backward(dout.cpu().double())
    assert_close_bar(out, ref, torch.bfloat16, "out")
    assert_close_bar(qkv.grad, base.grad, torch.bfloat16, "dqkv")


def test_runs_on_the_current_stream():
    q, k, v = (randn(2, 256, 4, 64, device="cuda") for _ in range(3))
    expected = dattn.dilated_attention(q, k, v, [64, 256], [1, 4])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            x = q * 1.0  # produced on the side stream right before use
            out = dattn.dilated_attention(x, k, v, [64, 256], [1, 4])
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_zero_stride_gradient():
    q, k, v = (randn(1, 128, 4, 32, device="cuda", requires_grad=True) for _ in range(3))
    dattn.dilated_attention(q, k, v, [32, 128], [1, 2]).sum().backward()
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    dilated_attention_reference(q64, k64, v64, [32, 128], [1, 2])[0].sum().backward()
    assert_close_bar(q.grad, q64.grad, torch.float32, "dq")


@pytest.mark.parametrize("cls", [dattn.MultiheadDilatedAttention, dattn.ImprovedMultiheadDilatedAttention])
def test_module_on_gpu_equals_cpu(cls):
    m = cls(768, 12, [1, 2, 4], [64, 128, 256])
    x = randn(2, 256, 768)
    expected = m(x)
    out = m.cuda()(x.cuda())
    if cls is dattn.ImprovedMultiheadDilatedAttention:  # always (output, None)
        (expected, _), (out, _) = expected, out
    assert rel_err(out, expected) < 1e-4  # cuBLAS and CPU projections round differently


@pytest.mark.parametrize("mode", ["grouped", "longnet"])
def test_dropout_same_on_cpu_and_gpu(mode):
    # SPEC.md: the same seed gives the same keep decisions on CPU and GPU.
    q, k, v = (randn(2, 128, 4, 64) for _ in range(3))
    torch.manual_seed(8)
    cpu = dattn.dilated_attention(q, k, v, [32, 128], [1, 2], mode=mode, dropout_p=0.2)
    torch.manual_seed(8)
    gpu = dattn.dilated_attention(q.cuda(), k.cuda(), v.cuda(), [32, 128], [1, 2], mode=mode, dropout_p=0.2)
    assert rel_err(gpu, cpu) < 2e-5


def test_gpu_errors():
    q, k, v = (randn(1, 64, 2, 8, device="cuda") for _ in range(3))
    with pytest.raises(ValueError, match="head dim D = 8 is not supported on the GPU"):
        dattn.dilated_attention(q, k, v, [32], [1])
    q, k, v = (randn(1, 64, 2, 64, device="cuda") for _ in range(3))
    with pytest.raises(ValueError, match="k is on cpu; expected cuda"):
        dattn.dilated_attention(q, k.cpu(), v, [32], [1])
    with pytest.raises(ValueError, match="key_padding_mask is on cpu; expected cuda"):
        dattn.dilated_attention(q, k, v, [32], [1], key_padding_mask=torch.zeros(1, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match="reference"):
        dattn.dilated_attention(q.double(), k.double(), v.double(), [32], [1])
