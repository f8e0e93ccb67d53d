"""Decoding with a key/value cache: dattn.dilated_attention_with_kvcache against the float64
reference and against recomputing the whole sequence, the issue's generation test, and the
multi-head modules' decode path in a decoder-only stack."""

import pytest
import torch

import dattn
from helpers import assert_close_bar, assert_lse, randn, requires_cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = lambda d: str(d).split(".")[-1]  # noqa: E731


def whole_sequence_rows(q, k_cache, v_cache, lengths, w, r, mode):
    """The definition: causal attention over each sequence's first L positions, last Tn rows."""
    B, Tn, H, D = q.shape
    rows, lses = [], []
    for b in range(B):
        L = int(lengths[b])
        q_full = torch.zeros(1, L, H, D, dtype=q.dtype)
        q_full[0, L - Tn:] = q[b]
        out, lse = dattn.dilated_attention(q_full, k_cache[b:b + 1, :L], v_cache[b:b + 1, :L], w, r, is_causal=True,
                                           mode=mode, return_lse=True)
        rows.append(out[0, L - Tn:])
        lses.append(lse[0, :, L - Tn:])
    return torch.stack(rows), torch.stack(lses)


# (cached lengths, Tn, H, Hkv, D, segment_lengths, dilation_rates, mode, with_new)
CASES = [
    pytest.param([0, 15, 16, 17], 1, 4, 1, 16, [16, 32], [1, 2], "grouped", True, id="tn1-boundaries-mqa"),
    pytest.param([7, 40], 5, 4, 2, 16, [8, 64], [1, 4], "longnet", True, id="tn5-longnet"),
    pytest.param([30, 60], 25, 6, 3, 16, [8, 16, 32], [1, 2, 4], "grouped", False, id="tn>segment-no-new"),
    pytest.param([64, 3], 3, 2, 2, 32, [4, 100], [2, 3], "longnet", False, id="no-new-w>N"),
]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=DTYPE_IDS)
@pytest.mark.parametrize("cached,Tn,H,Hkv,D,w,r,mode,with_new", CASES)
def test_cuda_against_reference(cached, Tn, H, Hkv, D, w, r, mode, with_new, dtype):
    """The same calls on CUDA tensors (cache_seqlens on the device): out, lse and the caches after
    the call against the float64 reference on the CPU."""
    B, Nmax, dev = len(cached), 100, torch.device("cuda")
    q = randn(B, Tn, H, D, dtype=dtype)
    k_cache, v_cache = (randn(B, Nmax, Hkv, D, dtype=dtype) for _ in range(2))
    k_new, v_new = (randn(B, Tn, Hkv, D, dtype=dtype) for _ in range(2)) if with_new else (None, None)
    seqlens = torch.tensor(cached, dtype=torch.int32)
    k_gpu, v_gpu = k_cache.to(dev), v_cache.to(dev)
    new_gpu = (None, None) if k_new is None else (k_new.to(dev), v_new.to(dev))
    out, lse = dattn.dilated_attention_with_kvcache(q.to(dev), k_gpu, v_gpu, seqlens.to(dev), w, r, k_new=new_gpu[0],
                                                    v_new=new_gpu[1], mode=mode, return_lse=True)
    k_ref, v_ref = k_cache.double(), v_cache.double()
    new64 = (None, None) if k_new is None else (k_new.double(), v_new.double())
    ref, ref_lse = dattn.dilated_attention_with_kvcache(q.double(), k_ref, v_ref, seqlens, w, r, k_new=new64[0],
                                                        v_new=new64[1], mode=mode, return_lse=True)
    assert torch.equal(k_gpu.cpu().double(), k_ref) and torch.equal(v_gpu.cpu().double(), v_ref), "the same rows written"
    assert_close_bar(out.cpu(), ref, dtype, "out")
    assert_lse(lse.cpu(), ref_lse, dtype)


@requires_cuda
def test_cuda_validation_before_writing():
    """cache_seqlens on the device that overflow the cache: an error, and nothing written."""
    dev = torch.device("cuda")
    q = torch.randn(2, 1, 2, 16, device=dev)
    k_cache, v_cache = torch.randn(2, 8, 2, 16, device=dev), torch.randn(2, 8, 2, 16, device=dev)
    before = k_cache.clone()
    k_new = torch.randn(2, 1, 2, 16, device=dev)
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] = 8"):
        dattn.dilated_attention_with_kvcache(q, k_cache, v_cache, torch.tensor([0, 8], dtype=torch.int32, device=dev),
                                             [4], [1], k_new=k_new, v_new=k_new.clone())
    assert torch.equal(k_cache, before)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("cached,Tn,H,Hkv,D,w,r,mode,with_new", CASES)
def test_against_reference_and_whole_sequence(cached, Tn, H, Hkv, D, w, r, mode, with_new, dtype):
    B, Nmax = len(cached), 100
    q = randn(B, Tn, H, D, dtype=dtype)
    k_cache, v_cache = (randn(B, Nmax, Hkv, D, dtype=dtype) for _ in range(2))
    k_new, v_new = (randn(B, Tn, Hkv, D, dtype=dtype) for _ in range(2)) if with_new else (None, None)
    seqlens = torch.tensor(cached, dtype=torch.int32)
    lengths = seqlens + (Tn if with_new else 0)
    k_ref, v_ref = k_cache.double(), v_cache.double()
    out, lse = dattn.dilated_attention_with_kvcache(q, k_cache, v_cache, seqlens, w, r, k_new=k_new, v_new=v_new,
                                                    mode=mode, return_lse=True)
    new64 = (None, None) if k_new is None else (k_new.double(), v_new.double())
    ref, ref_lse = dattn.dilated_attention_with_kvcache(q.double(), k_ref, v_ref, seqlens, w, r, k_new=new64[0],
                                                        v_new=new64[1], mode=mode, return_lse=True)
    assert torch.equal(seqlens, torch.tensor(cached, dtype=torch.int32)), "cache_seqlens is never modified"
    assert torch.equal(k_cache.double(), k_ref) and torch.equal(v_cache.double(), v_ref), "the same rows written"
    assert_close_bar(out, ref, dtype, "out")
    assert_lse(lse, ref_lse, dtype)
    whole, whole_lse = whole_sequence_rows(q.double(), k_ref, v_ref, lengths, w, r, mode)
    assert_close_bar(ref, whole, torch.float64, "reference vs whole sequence")
    assert torch.equal(torch.isinf(ref_lse), torch.isinf(whole_lse))


@pytest.mark.parametrize("mode", ["grouped", "longnet"])
def test_generation(mode):
    """The issue's generation test: fp32, segments [64, 256, 1024], rates [1, 2, 4], Hkv = H/4; a
    200-token prompt, 1000 steps of Tn = 1, one step of Tn = 37; every step within the fp32 bar of
    recomputing the whole sequence."""
    torch.manual_seed(0)
    w, r, H, Hkv, D = [64, 256, 1024], [1, 2, 4], 8, 2, 16
    steps = [200] + [1] * 1000 + [37]
    N = sum(steps)
    q, k, v = randn(1, N, H, D), randn(1, N, Hkv, D), randn(1, N, Hkv, D)
    k_cache, v_cache = torch.zeros(1, N, Hkv, D), torch.zeros(1, N, Hkv, D)
    seqlens = torch.zeros(1, dtype=torch.int32)
    worst, L = 0.0, 0
    for Tn in steps:
        rows = slice(L, L + Tn)
        out = dattn.dilated_attention_with_kvcache(q[:, rows], k_cache, v_cache, seqlens, w, r, k_new=k[:, rows],
                                                   v_new=v[:, rows], mode=mode)
        L += Tn
        seqlens += Tn
        whole = dattn.dilated_attention(q[:, :L], k[:, :L], v[:, :L], w, r, is_causal=True, mode=mode)[:, L - Tn:]
        err = ((out - whole).norm() / whole.norm()).item() if whole.norm() > 0 else (out != 0).sum().item()
        worst = max(worst, err)
        assert err <= 1e-5, f"step ending at L = {L} (Tn = {Tn}): relative error {err:.3g}"
    assert torch.equal(k_cache, k) and torch.equal(v_cache, v)


@pytest.mark.parametrize("cls", [dattn.MultiheadDilatedAttention, dattn.ImprovedMultiheadDilatedAttention])
def test_module_decode_in_a_decoder_stack(cls):
    """Two causal layers with residuals: prompt, then token by token, equals the full forward."""
    torch.manual_seed(1)
    E, H, Hkv = 32, 4, 2
    layers = [cls(E, H, [1, 2], [8, 16], num_kv_heads=Hkv, dtype=torch.float64).eval() for _ in range(2)]

    def full(x):
        for layer in layers:
            out = layer(x, is_causal=True)
            x = x + (out[0] if isinstance(out, tuple) else out)  # the fused module returns (output, None)
        return x

    x = randn(2, 40, E, dtype=torch.float64)
    with torch.no_grad():
        expected = full(x)
        caches = [layer.new_cache(2, 40) for layer in layers]
        outputs = []
        for rows in [slice(0, 11)] + [slice(t, t + 1) for t in range(11, 33)] + [slice(33, 40)]:
            h = x[:, rows]
            for layer, cache in zip(layers, caches):
                h = h + layer.decode(h, cache)
            outputs.append(h)
        got = torch.cat(outputs, dim=1)
    assert torch.allclose(got, expected, rtol=0, atol=1e-10)
    assert all(int(s) == 40 for cache in caches for s in cache.seqlens)


def test_errors():
    q, cache, seqlens = randn(2, 3, 4, 8), randn(2, 10, 2, 8), torch.tensor([3, 7], dtype=torch.int32)
    new = randn(2, 3, 2, 8)
    call = lambda seqlens, **kw: dattn.dilated_attention_with_kvcache(q, cache, cache.clone(), seqlens, [4], [1], **kw)  # noqa
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] = 8 gives L = 11"):
        call(torch.tensor([3, 8], dtype=torch.int32), k_new=new, v_new=new)
    with pytest.raises(ValueError, match=r"cache_seqlens\[0\] = 2 < Tn = 3"):
        call(torch.tensor([2, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="k_new is given without v_new"):
        call(seqlens, k_new=new)
    with pytest.raises(ValueError, match="cache_seqlens has dtype torch.int64"):
        call(seqlens.long())
    with pytest.raises(ValueError, match="k has 3 heads and q has H = 4"):
        dattn.dilated_attention_with_kvcache(q, randn(2, 10, 3, 8), randn(2, 10, 3, 8), seqlens, [4], [1])
    with pytest.raises(ValueError, match="q requires grad; decoding has no backward"):
        dattn.dilated_attention_with_kvcache(q.requires_grad_(), cache, cache, seqlens, [4], [1])


def test_generation_example_runs():
    import pathlib
    import subprocess
    import sys

    example = pathlib.Path(__file__).resolve().parents[2] / "examples" / "python" / "generate.py"
    result = subprocess.run([sys.executable, str(example), "--tokens", "40"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "cache holds 72 tokens" in result.stdout
