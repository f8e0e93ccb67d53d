"""The modules: same math as composed by hand, fused == unfused, state_dict, init, errors."""

import inspect
import io
import math

import pytest
import torch
import torch.nn.functional as F

import dattn
from helpers import randn, rel_err
from reference_attention import dilated_attention_reference

E, H, W, R = 32, 4, [8, 16, 32], [1, 2, 4]


def by_hand(x_q, x_k, x_v, Wq, bq, Wk, bk, Wv, bv, norm_w, norm_b, Wo, bo, mode="grouped", causal=False,
            mask=None, eps=1e-5):
    """SPEC.md "Multi-head modules", written out: projections, heads, attention, sub-LN, out_proj."""
    B, N, _ = x_q.shape
    q = (x_q @ Wq.T + bq).view(B, N, H, E // H)
    k = (x_k @ Wk.T + bk).view(B, N, H, E // H)
    v = (x_v @ Wv.T + bv).view(B, N, H, E // H)
    x, _ = dilated_attention_reference(q, k, v, W, R, is_causal=causal, mode=mode, key_padding_mask=mask)
    x = x.reshape(B, N, E)
    if norm_w is not None:
        x = F.layer_norm(x, (E,), norm_w, norm_b, eps)
    return x @ Wo.T + bo


def unfused_weights(m):
    return (m.q_proj.weight, m.q_proj.bias, m.k_proj.weight, m.k_proj.bias, m.v_proj.weight, m.v_proj.bias,
            m.norm.weight if m.norm is not None else None, m.norm.bias if m.norm is not None else None,
            m.out_proj.weight, m.out_proj.bias)


def out_of(result):
    """The output tensor of either module: the fused one always returns (output, None)."""
    if isinstance(result, tuple):
        out, weights = result
        assert weights is None
        return out
    return result


def fused_from(unfused, **kwargs):
    f = dattn.ImprovedMultiheadDilatedAttention(E, H, R, W, **kwargs).to(unfused.out_proj.weight.dtype)
    with torch.no_grad():
        f.qkv_proj.weight.copy_(torch.cat([unfused.q_proj.weight, unfused.k_proj.weight, unfused.v_proj.weight]))
        f.qkv_proj.bias.copy_(torch.cat([unfused.q_proj.bias, unfused.k_proj.bias, unfused.v_proj.bias]))
        f.out_proj.load_state_dict(unfused.out_proj.state_dict())
        if unfused.norm is not None:
            f.norm.load_state_dict(unfused.norm.state_dict())
    return f


def randomise_(module):
    # Non-trivial biases and norm parameters (the MAGNETO init leaves them 0 and 1).
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return module


def test_signatures_follow_spec():
    names = lambda f: list(inspect.signature(f).parameters)
    assert names(dattn.MultiheadDilatedAttention.__init__)[1:] == [
        "embed_dim", "num_heads", "dilation_rates", "segment_lengths", "dropout", "bias", "layer_norm",
        "layer_norm_eps", "gamma_init", "device", "dtype", "mode", "group", "layout", "norm_style", "num_kv_heads"]
    assert names(dattn.ImprovedMultiheadDilatedAttention.__init__)[1:] == [
        "embed_dim", "num_heads", "dilation_rates", "segment_lengths", "dropout", "bias", "layer_norm",
        "layer_norm_eps", "gamma_init", "device", "dtype", "mode", "use_tf32", "group", "layout", "norm_style",
        "num_kv_heads"]
    for cls in (dattn.MultiheadDilatedAttention, dattn.ImprovedMultiheadDilatedAttention):
        norm_style = inspect.signature(cls.__init__).parameters["norm_style"]
        assert norm_style.kind is inspect.Parameter.KEYWORD_ONLY and norm_style.default == "sub_ln"
        kind = inspect.signature(cls.__init__).parameters["num_kv_heads"].kind
        assert kind == inspect.Parameter.KEYWORD_ONLY
    for cls in (dattn.MultiheadDilatedAttention, dattn.ImprovedMultiheadDilatedAttention):
        assert names(cls.forward)[1:] == ["query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
                                          "is_causal"]
    assert names(dattn.DilatedAttention.__init__)[1:] == [
        "segment_lengths", "dilation_rates", "softmax_scale", "attention_dropout", "mode", "use_tf32", "group",
        "layout"]
    assert names(dattn.ImprovedDilatedAttention.__init__)[1:] == [
        "segment_lengths", "dilation_rates", "dropout", "use_tf32", "group", "layout"]
    for cls in (dattn.DilatedAttention, dattn.ImprovedDilatedAttention):
        assert names(cls.forward)[1:] == ["q", "k", "v", "is_causal", "key_padding_mask"]
    assert names(dattn.dilated_attention)[3:] == [
        "segment_lengths", "dilation_rates", "is_causal", "scale", "mode", "key_padding_mask", "dropout_p",
        "use_tf32", "return_lse"]


@pytest.mark.parametrize("mode", ["grouped", "longnet"])
@pytest.mark.parametrize("layer_norm", [True, False])
def test_module_equals_math_by_hand(mode, layer_norm):
    m = randomise_(dattn.MultiheadDilatedAttention(E, H, R, W, layer_norm=layer_norm, mode=mode).double())
    xq, xk, xv = (torch.randn(2, 40, E, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.rand(2, 40) < 0.2
    out = m(xq, xk, xv, key_padding_mask=mask, is_causal=True)
    weights = [w.detach().clone().requires_grad_() if w is not None else None for w in unfused_weights(m)]
    xs = [x.detach().clone().requires_grad_() for x in (xq, xk, xv)]
    ref = by_hand(*xs, *weights, mode=mode, causal=True, mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    dout = torch.randn_like(out)
    out.backward(dout)
    ref.backward(dout)
    for x, x_ref in zip((xq, xk, xv), xs):
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    for p, p_ref in zip(unfused_weights(m), weights):
        if p is not None:
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [dattn.MultiheadDilatedAttention, dattn.ImprovedMultiheadDilatedAttention])
def test_module_gradcheck(cls):
    m = randomise_(cls(8, 2, [1, 2], [4, 12], mode="longnet").double())
    x = torch.randn(1, 12, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[0, -2:] = True
    assert torch.autograd.gradcheck(lambda x: out_of(m(x, key_padding_mask=mask, is_causal=True)), (x,))


def test_float32_module_within_bar_of_float64():
    m = randomise_(dattn.MultiheadDilatedAttention(E, H, R, W))
    x = randn(2, 64, E, requires_grad=True)
    out = m(x)
    out.sum().backward()
    m64 = dattn.MultiheadDilatedAttention(E, H, R, W).double()
    m64.load_state_dict(m.state_dict())
    x64 = x.detach().double().requires_grad_()
    ref = m64(x64)
    ref.sum().backward()
    # The bar applies to the attention itself; the projections add float32 GEMM rounding.
    assert rel_err(out, ref) < 1e-5
    assert rel_err(x.grad, x64.grad) < 1e-5


@pytest.mark.parametrize("inputs", ["self", "kv-shared", "all-different"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_fused_equals_unfused(inputs, dtype):
    u = randomise_(dattn.MultiheadDilatedAttention(E, H, R, W)).to(dtype)
    f = fused_from(u)
    x = randn(2, 48, E, dtype=dtype, requires_grad=True)
    y = randn(2, 48, E, dtype=dtype, requires_grad=True)
    z = randn(2, 48, E, dtype=dtype, requires_grad=True)
    args = {"self": (x,), "kv-shared": (x, y, y), "all-different": (x, y, z)}[inputs]
    out_u = u(*args, is_causal=True)
    out_f, weights = f(*args, is_causal=True)
    assert weights is None
    bar = 1e-12 if dtype == torch.float64 else 2e-6
    assert rel_err(out_f, out_u) < bar
    dout = randn(*out_u.shape, dtype=dtype)
    grads_u = torch.autograd.grad(out_u, list(args) + list(u.parameters()), dout, allow_unused=True)
    grads_f = torch.autograd.grad(out_f, list(args) + list(f.parameters()), dout, allow_unused=True)
    n = len(args)
    for a, b in zip(grads_u[:n], grads_f[:n]):
        assert rel_err(b, a) < bar
    pu = dict(zip([k for k, _ in u.named_parameters()], grads_u[n:]))
    pf = dict(zip([k for k, _ in f.named_parameters()], grads_f[n:]))
    assert rel_err(pf["qkv_proj.weight"], torch.cat([pu["q_proj.weight"], pu["k_proj.weight"],
                                                     pu["v_proj.weight"]])) < bar
    assert rel_err(pf["qkv_proj.bias"], torch.cat([pu["q_proj.bias"], pu["k_proj.bias"], pu["v_proj.bias"]])) < bar
    for name in ("out_proj.weight", "out_proj.bias", "norm.weight", "norm.bias"):
        assert rel_err(pf[name], pu[name]) < bar


def test_fused_self_attention_uses_one_product_and_no_copy(monkeypatch):
    f = dattn.ImprovedMultiheadDilatedAttention(E, H, R, W)
    seen = {}

    def spy(qkv, *args, **kwargs):
        seen["qkv"] = qkv
        return real(qkv, *args, **kwargs)

    import dattn._ops as ops
    real = ops.attention_qkvpacked_forward
    monkeypatch.setattr(ops, "attention_qkvpacked_forward", spy)
    calls = []
    f.qkv_proj.register_forward_hook(lambda mod, inp, out: calls.append(out))
    f(randn(2, 32, E))
    assert len(calls) == 1 and calls[0].shape == (2, 32, 3 * E)
    assert seen["qkv"].shape == (2, 32, 3, H, E // H)
    assert seen["qkv"].data_ptr() == calls[0].data_ptr()  # a view of the projection output


@pytest.mark.parametrize("cls", [dattn.MultiheadDilatedAttention, dattn.ImprovedMultiheadDilatedAttention])
def test_state_dict_round_trip(cls):
    m = randomise_(cls(E, H, R, W))
    expected_keys = {"out_proj.weight", "out_proj.bias", "norm.weight", "norm.bias"}
    if cls is dattn.ImprovedMultiheadDilatedAttention:
        expected_keys |= {"qkv_proj.weight", "qkv_proj.bias"}
        assert m.qkv_proj.weight.shape == (3 * E, E)
    else:
        expected_keys |= {f"{p}_proj.{t}" for p in "qkv" for t in ("weight", "bias")}
    assert set(m.state_dict()) == expected_keys
    buffer = io.BytesIO()
    torch.save(m.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(99)
    m2 = cls(E, H, R, W)
    m2.load_state_dict(torch.load(buffer))
    x = randn(1, 32, E)
    assert torch.equal(out_of(m(x)), out_of(m2(x)))


@pytest.mark.parametrize("cls", [dattn.MultiheadDilatedAttention, dattn.ImprovedMultiheadDilatedAttention])
def test_magneto_init(cls):
    E_big, gamma = 256, 2.5
    m = cls(E_big, 8, [1, 2], [64, 128], gamma_init=gamma)
    if cls is dattn.MultiheadDilatedAttention:
        weights = [m.q_proj.weight, m.k_proj.weight, m.v_proj.weight]
        biases = [m.q_proj.bias, m.k_proj.bias, m.v_proj.bias]
    else:
        weights = list(m.qkv_proj.weight.split(E_big))
        biases = [m.qkv_proj.bias]
    # Xavier-normal of an [E, E] matrix: std = gain * sqrt(2 / (E + E)).
    for w, gain in zip(weights + [m.out_proj.weight], [1.0, 1.0, gamma, gamma]):
        std = gain * math.sqrt(2.0 / (2 * E_big))
        assert abs(w.std().item() / std - 1) < 0.03
        assert abs(w.mean().item()) < 0.03 * std
    for b in biases + [m.out_proj.bias]:
        assert (b == 0).all()
    assert (m.norm.weight == 1).all() and (m.norm.bias == 0).all()


def test_no_bias_no_layer_norm():
    for cls in (dattn.MultiheadDilatedAttention, dattn.ImprovedMultiheadDilatedAttention):
        m = cls(E, H, R, W, bias=False, layer_norm=False)
        assert m.norm is None and m.out_proj.bias is None
        assert all("bias" not in k and "norm" not in k for k in m.state_dict())
        assert out_of(m(randn(1, 16, E))).shape == (1, 16, E)


def test_need_weights_and_defaults():
    m = dattn.MultiheadDilatedAttention(E, H, R, W)
    x = randn(2, 32, E)
    out = m(x)
    assert isinstance(out, torch.Tensor) and out.shape == x.shape
    out2, weights = m(x, x, x, need_weights=True)
    assert weights is None and torch.equal(out, out2)
    # The fused module always returns (output, None), as that library's does.
    f = fused_from(m)
    for need_weights in (False, True):
        result = f(x, x, x, need_weights=need_weights)
        assert isinstance(result, tuple) and len(result) == 2 and result[1] is None
        assert rel_err(result[0], out) < 2e-6


def test_device_and_dtype_arguments():
    m = dattn.ImprovedMultiheadDilatedAttention(E, H, R, W, device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in m.parameters())
    assert m(torch.randn(1, 16, E, dtype=torch.float64))[0].dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_module(dtype):
    try:
        F.linear(torch.ones(1, 2, dtype=dtype), torch.ones(2, 2, dtype=dtype))
    except RuntimeError:
        pytest.skip(f"this torch has no CPU matrix product in {dtype}")
    m = dattn.ImprovedMultiheadDilatedAttention(E, H, R, W, dtype=dtype)
    x = randn(2, 32, E, dtype=dtype, requires_grad=True)
    out, _ = m(x)
    out.float().sum().backward()
    assert out.dtype == dtype and torch.isfinite(out).all() and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------------------------------------
# Dropout in modules: training only, seeds from torch's default CPU generator.

@pytest.mark.parametrize("cls", [dattn.MultiheadDilatedAttention, dattn.ImprovedMultiheadDilatedAttention])
def test_module_dropout_train_eval(cls):
    m = cls(E, H, R, W, dropout=0.3)
    no_drop = cls(E, H, R, W, dropout=0.0)
    no_drop.load_state_dict(m.state_dict())
    x = randn(2, 32, E)
    m.eval()
    assert torch.equal(out_of(m(x)), out_of(no_drop(x)))  # evaluation: no dropout
    m.train()
    torch.manual_seed(11)
    a = out_of(m(x))
    torch.manual_seed(11)
    b = out_of(m(x))
    c = out_of(m(x))
    assert torch.equal(a, b)  # reproducible from torch.manual_seed
    assert not torch.equal(a, c)
    assert rel_err(a, out_of(no_drop(x))) > 0.01


def test_module_dropout_uses_the_spec_seed():
    m = dattn.DilatedAttention(W, R, attention_dropout=0.4)
    q, k, v = (randn(1, 32, 3, 8, dtype=torch.float64) for _ in range(3))
    torch.manual_seed(21)
    seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    torch.manual_seed(21)
    out = m(q, k, v)
    ref, _ = dilated_attention_reference(q, k, v, W, R, dropout_p=0.4, dropout_seed=seed)
    torch.testing.assert_close(out, ref)
    m.eval()
    torch.testing.assert_close(m(q, k, v), dilated_attention_reference(q, k, v, W, R)[0])


def test_dilated_attention_modules_equal_functional():
    q, k, v = (randn(2, 32, 3, 8) for _ in range(3))
    mask = torch.rand(2, 32) < 0.3
    expected = dattn.dilated_attention(q, k, v, W, R, is_causal=True, key_padding_mask=mask)
    for module in (dattn.DilatedAttention(W, R), dattn.ImprovedDilatedAttention(W, R)):
        assert torch.equal(module(q, k, v, is_causal=True, key_padding_mask=mask), expected)
    longnet = dattn.DilatedAttention(W, R, softmax_scale=0.2, mode="longnet")
    assert torch.equal(longnet(q, k, v), dattn.dilated_attention(q, k, v, W, R, scale=0.2, mode="longnet"))


# ---------------------------------------------------------------------------------------------
# Errors.

@pytest.mark.parametrize("cls", [dattn.MultiheadDilatedAttention, dattn.ImprovedMultiheadDilatedAttention])
def test_module_errors(cls):
    m = cls(E, H, R, W)
    x = randn(2, 16, E)
    with pytest.raises(ValueError, match="attn_mask is not supported.*use is_causal=True or key_padding_mask"):
        m(x, attn_mask=torch.zeros(16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match=rf"query has shape \[2, 16, 8\]; expected \[B, N, {E}\]"):
        m(randn(2, 16, 8))
    with pytest.raises(ValueError, match=r"key has shape \[2, 17, 32\]; expected \[2, 16, 32\]"):
        m(x, randn(2, 17, E), randn(2, 17, E))
    with pytest.raises(TypeError, match="query has dtype torch.float64; expected torch.float32"):
        m(x.double())
    with pytest.raises(TypeError, match="query is list; expected a torch.Tensor"):
        m([1.0])
    with pytest.raises(ValueError, match=r"key_padding_mask has shape \[2, 15\]; expected \[2, 16\]"):
        m(x, key_padding_mask=torch.zeros(2, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="embed_dim = 30 is not divisible by num_heads = 4"):
        cls(30, 4, R, W)
    with pytest.raises(ValueError, match="dropout = 1.5; expected 0 <= dropout < 1"):
        cls(E, H, R, W, dropout=1.5)
    with pytest.raises(ValueError, match=r"dilation rate must be in \[1, segment length\]"):
        cls(E, H, [1, 40], [8, 16])
    with pytest.raises(ValueError, match="mode = 'x'; expected 'grouped' or 'longnet'"):
        cls(E, H, R, W, mode="x")
    with pytest.raises(ValueError, match="layout = 'striped'; expected 'contiguous' or 'zigzag'"):
        cls(E, H, R, W, layout="striped")
    with pytest.raises(TypeError, match="group = .*expected a torch.distributed ProcessGroup or None"):
        cls(E, H, R, W, group=object())
    cls(E, H, R, W, group=None, layout="zigzag")  # the layout alone is accepted


def test_dilated_attention_module_errors():
    with pytest.raises(ValueError, match="attention_dropout = -0.1; expected"):
        dattn.DilatedAttention(W, R, attention_dropout=-0.1)
    with pytest.raises(ValueError, match="segment_lengths has 3 entries but dilation_rates has 2"):
        dattn.ImprovedDilatedAttention(W, [1, 2])
    with pytest.raises(TypeError, match="expected a torch.distributed ProcessGroup or None"):
        dattn.DilatedAttention(W, R, group="world")
    m = dattn.DilatedAttention(W, R)
    with pytest.raises(ValueError, match="q has shape"):
        m(randn(2, 16, 8), randn(2, 16, 8), randn(2, 16, 8))
