"""torch >= 2.4: the torch.ops.dattn custom operators, opcheck and torch.compile (skipped before)."""

import pytest
import torch

import dattn
from helpers import randn, rel_err

pytestmark = pytest.mark.skipif(not dattn.HAS_CUSTOM_OPS, reason="torch.library.custom_op needs torch >= 2.4")

W, R = [8, 16, 32], [1, 2, 4]


def config(mode="grouped", causal=True, dropout_p=0.0, seed=0):
    return (W, R, causal, None, mode, dropout_p, seed, False)


@pytest.mark.parametrize("mode", ["grouped", "longnet"])
def test_opcheck_forward(mode):
    q, k, v = (randn(2, 32, 4, 8, requires_grad=True) for _ in range(3))
    mask = torch.rand(2, 32) < 0.2
    torch.library.opcheck(torch.ops.dattn.dilated_attention_forward.default, (q, k, v, mask) + config(mode))
    qkv = randn(2, 32, 3, 4, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.dattn.dilated_attention_qkvpacked_forward.default, (qkv, None) + config(mode))


def test_opcheck_backward():
    q, k, v = (randn(2, 32, 4, 8) for _ in range(3))
    out, lse = torch.ops.dattn.dilated_attention_forward(q, k, v, None, *config())
    dout = randn(2, 32, 4, 8)
    torch.library.opcheck(torch.ops.dattn.dilated_attention_backward.default,
                          (dout, q, k, v, out, lse, None) + config())


@pytest.mark.parametrize("packed", [False, True])
def test_compile_keeps_the_graph(packed):
    def step(x):
        if packed:
            out = dattn.dilated_attention_qkvpacked(x, W, R, is_causal=True)
        else:
            out = dattn.dilated_attention(*x.unbind(2), W, R, is_causal=True, mode="longnet")
        return (out * out).sum()

    x = randn(2, 32, 3, 4, 8, requires_grad=True)
    eager = step(x)
    (g_eager,) = torch.autograd.grad(eager, x)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    y = x.detach().clone().requires_grad_()
    got = compiled(y)
    (g_compiled,) = torch.autograd.grad(got, y)
    assert rel_err(got, eager) < 1e-6
    assert rel_err(g_compiled, g_eager) < 1e-6


def test_compile_module_fullgraph():
    torch._dynamo.reset()
    m = dattn.ImprovedMultiheadDilatedAttention(32, 4, R, W).eval()
    x = randn(2, 32, 32, requires_grad=True)
    eager, _ = m(x, is_causal=True)  # the fused module returns (output, None)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    got, _ = compiled(x, is_causal=True)
    assert rel_err(got, eager) < 1e-6
    got.sum().backward()
    assert m.qkv_proj.weight.grad is not None and torch.isfinite(m.qkv_proj.weight.grad).all()


def test_compile_with_dropout_matches_eager():
    # Training-mode dropout draws its seed with .item(); compiled code must still follow torch.manual_seed.
    m = dattn.MultiheadDilatedAttention(32, 4, R, W, dropout=0.3).train()
    x = randn(2, 32, 32)
    torch.manual_seed(4)
    eager = m(x)
    compiled = torch.compile(m, backend="aot_eager")
    torch.manual_seed(4)
    got = compiled(x)
    assert rel_err(got, eager) < 1e-6


@pytest.mark.parametrize("packed", [False, True])
def test_op_autograd_equals_eager_function(packed):
    # Eager calls take the autograd.Function; the operator's registered autograd must agree.
    qkv = randn(2, 32, 3, 4, 8, requires_grad=True)
    dout = randn(2, 32, 4, 8)
    mask = torch.rand(2, 32) < 0.2
    if packed:
        out, lse = torch.ops.dattn.dilated_attention_qkvpacked_forward(qkv, mask, *config("longnet"))
        expected, expected_lse = dattn.dilated_attention_qkvpacked(qkv, W, R, is_causal=True, mode="longnet",
                                                                   key_padding_mask=mask, return_lse=True)
    else:
        out, lse = torch.ops.dattn.dilated_attention_forward(*qkv.unbind(2), mask, *config("longnet"))
        expected, expected_lse = dattn.dilated_attention(*qkv.unbind(2), W, R, is_causal=True, mode="longnet",
                                                         key_padding_mask=mask, return_lse=True)
    assert torch.equal(out, expected) and torch.equal(lse, expected_lse)
    (g_op,) = torch.autograd.grad(out, qkv, dout)
    (g_fn,) = torch.autograd.grad(expected, qkv, dout)
    assert torch.equal(g_op, g_fn)
