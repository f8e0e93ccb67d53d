"""Shared helpers for the Python tests: SPEC.md accuracy bars, random inputs, CUDA markers."""

import math
import os

import pytest
import torch

import dattn

# SPEC.md "Accuracy bars": relative L2 error of out and gradients, and the lse tolerance t.
OUT_BAR = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 3e-3, torch.float64: 1e-12}
LSE_BAR = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3, torch.float64: 1e-5}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(x).all(), "NaN or Inf never passes"
    norm = ref.norm().item()
    if norm == 0.0:
        return 0.0 if (x == 0).all() else math.inf
    return (x - ref).norm().item() / norm


def assert_close_bar(x, ref, dtype, what=""):
    err = rel_err(x, ref)
    assert err <= OUT_BAR[dtype], f"{what}: relative error {err:.3g} > {OUT_BAR[dtype]:.3g} ({dtype})"


def assert_lse(lse, ref, dtype):
    lse, ref = lse.detach().double().cpu(), ref.detach().double().cpu()
    assert lse.dtype == torch.float64 and lse.shape == ref.shape
    ref_inf = torch.isneginf(ref)
    assert torch.equal(torch.isneginf(lse), ref_inf), "lse must be -inf exactly where the reference's is"
    assert not torch.isnan(lse).any() and not torch.isposinf(lse).any()
    finite = ~ref_inf
    t = LSE_BAR[dtype]
    bound = t * torch.clamp(ref[finite].abs(), min=1.0)
    worst = ((lse[finite] - ref[finite]).abs() - bound).max().item() if finite.any() else -1.0
    assert worst <= 0.0, f"lse off by more than {t} * max(1, |ref|)"


def randn(*shape, dtype=torch.float32, device="cpu", generator=None, requires_grad=False):
    x = torch.randn(*shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    return x.requires_grad_(requires_grad)


def cuda_usable() -> bool:
    return torch.cuda.is_available() and dattn.has_cuda


def cuda_skip_reason() -> str:
    if not torch.cuda.is_available():
        return "no CUDA device"
    return "dattn was built without the CUDA backend (DATTN_CUDA)"


requires_cuda = pytest.mark.skipif(
    not cuda_usable() and not os.environ.get("DATTN_REQUIRE_CUDA"), reason=cuda_skip_reason())
