"""Block-sparse attention against a dense float64 masked softmax written here."""

import math

import pytest
import torch

import dattn
from helpers import OUT_BAR, assert_close_bar, assert_lse, requires_cuda
from reference_attention import _masked_softmax_attention, dropout_keep


def reference(q, k, v, dense_mask, block_size, is_causal=False, key_padding_mask=None, dropout_p=0.0, seed=0):
    """One softmax per row over every allowed key (float64, differentiable)."""
    B, N, H, D = q.shape
    pos = torch.arange(N)
    heads_mask = dense_mask if dense_mask.dim() == 3 else dense_mask.expand(H, -1, -1)
    allowed = heads_mask[:, pos // block_size][:, :, pos // block_size]  # [H, N, N]
    if is_causal:
        allowed = allowed & (pos[None, :] <= pos[:, None])
    not_padded = torch.ones(B, N, dtype=torch.bool) if key_padding_mask is None else ~key_padding_mask
    factor = (dropout_keep(seed, 0, B, H, N, dropout_p).double() / (1 - dropout_p)) if dropout_p > 0 else \
        torch.ones(B, H, N, N, dtype=torch.float64)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(D)
    outs, lses = [], []
    for h in range(H):
        o, l = _masked_softmax_attention(scores[:, h], allowed[h][None] & not_padded[:, None, :], v[:, :, h],
                                         factor[:, h])
        outs.append(o)
        lses.append(l)
    return torch.stack(outs, 2), torch.stack(lses, 1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", range(6))
def test_random_masks_match_reference(dtype, seed, device):
    g = torch.Generator().manual_seed(seed)
    B, H = 2, 3
    N = int(torch.randint(1, 90, (1,), generator=g)) * (4 if device == "cuda" else 1)
    D = [16, 32, 7 if device == "cpu" else 128, 64][seed % 4]
    block = int(torch.randint(1, 40, (1,), generator=g)) * (3 if device == "cuda" else 1)
    nb = math.ceil(N / block)
    density = [0.0, 0.3, 0.7, 1.0][seed % 4]
    shape = (H, nb, nb) if seed % 2 else (nb, nb)
    mask = torch.rand(shape, generator=g) < density
    causal = seed % 3 == 1
    padding = torch.rand(B, N, generator=g) < 0.2 if seed % 2 == 0 else None
    dropout_p = 0.25 if seed == 3 else 0.0
    q, k, v = (torch.randn(B, N, H, D, generator=g).to(dtype).to(device).requires_grad_() for _ in range(3))
    torch.manual_seed(100 + seed)
    out, lse = dattn.block_sparse_attention(q, k, v, mask, block, is_causal=causal,
                                            key_padding_mask=None if padding is None else padding.to(device),
                                            dropout_p=dropout_p, return_lse=True)
    assert out.device == q.device and lse.device == q.device
    torch.manual_seed(100 + seed)
    drop_seed = int(torch.randint(0, 2 ** 62, (1,)).item()) if dropout_p > 0 else 0
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = reference(q64, k64, v64, mask, block, causal, padding, dropout_p, drop_seed)
    assert_close_bar(out, ref, dtype, "out")
    assert_lse(lse, ref_lse, dtype)
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad.to(dtype).to(device))
    ref.backward(grad.double())
    for name, x, r in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        if r.norm() == 0:
            assert x.float().norm() <= OUT_BAR[dtype] * math.sqrt(x.numel()), name
        else:
            assert_close_bar(x, r, dtype, name)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_prebuilt_mask_equals_the_bool_tensor(device):
    g = torch.Generator().manual_seed(7)
    B, N, H, D, block = 2, 40, 3, 16, 8
    dense = torch.rand(H, 5, 5, generator=g) < 0.5
    mask = dattn.block_sparse_mask(dense, device)
    assert (mask.heads, mask.query_blocks, mask.key_blocks) == (H, 5, 5)
    assert mask.allowed_pairs == int(dense.sum()) and mask.device == ("cpu" if device == "cpu" else "cuda:0")
    q, k, v = (torch.randn(B, N, H, D, generator=g).to(device) for _ in range(3))
    want = dattn.block_sparse_attention(q, k, v, dense, block, is_causal=True)
    for _ in range(2):  # one mask, any number of calls
        assert torch.equal(dattn.block_sparse_attention(q, k, v, mask, block, is_causal=True), want)


def test_prebuilt_mask_refuses_what_is_not_a_bool_block_mask():
    with pytest.raises(TypeError, match="block_mask is a 2-D torch.float32 tensor; expected a bool tensor"):
        dattn.block_sparse_mask(torch.ones(2, 2))
    with pytest.raises(TypeError, match="block_mask is a 4-D torch.bool tensor"):
        dattn.block_sparse_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="block_mask is list"):
        dattn.block_sparse_attention(*(torch.randn(1, 8, 1, 4) for _ in range(3)), [[True]], 8)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 13, 2, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.rand(2, 3, 3, generator=g) < 0.6
    assert torch.autograd.gradcheck(lambda a, b, c: dattn.block_sparse_attention(a, b, c, mask, 5, is_causal=True),
                                    (q, k, v))


def test_named_patterns():
    assert dattn.local_window_mask(5, 256, 64).int().tolist() == [
        [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    sparse = dattn.dilated_sparse_mask(6, [2])
    assert sparse[0].int().tolist() == [1, 0, 1, 0, 0, 0] and sparse[3].int().tolist() == [0, 1, 0, 1, 0, 1]
    glob = dattn.global_local_mask(4, 0, 1, 64)
    assert glob[0].all() and glob[:, 0].all() and glob[2].int().tolist() == [1, 0, 1, 0]
    dil = dattn.dilated_mask(256, [128, 256], [1, 2], 64)  # 4 blocks: branch 0 dense 2x2 pairs, branch 1 odd blocks
    assert dil.int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 1], [0, 0, 1, 1], [0, 1, 1, 1]]
    with pytest.raises(ValueError, match="multiple of block_size"):
        dattn.dilated_mask(256, [100], [1], 64)


def test_module_and_weights():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 200, 3, 16) for _ in range(3))
    config = dattn.SparsePatternConfig("local_window", block_size=32, window_size=96)
    module = dattn.BlockSparseRingDilatedAttention([64, 128], [1, 2], config)
    out, weights = module(q, k, v, is_causal=True, return_attention_weights=True)
    mask = dattn.local_window_mask(7, 96, 32)
    ref, _ = reference(q.double(), k.double(), v.double(), mask, 32, is_causal=True)
    assert_close_bar(out, ref, torch.float32, "out")
    assert weights["shape"] == (7, 7) and weights["block_size"] == 32
    assert weights["indices"].shape[1] == int(mask.sum()) and weights["values"].shape == (2, 3, int(mask.sum()), 32, 32)
    # Each row's probabilities over its allowed blocks sum to 1 (rows past N are all zero).
    sums = torch.zeros(2, 3, 7 * 32)
    for e, qb in enumerate(weights["indices"][0].tolist()):
        sums[:, :, qb * 32:(qb + 1) * 32] += weights["values"][:, :, e].sum(-1)
    assert torch.allclose(sums[:, :, :200], torch.ones(2, 3, 200), atol=1e-5)
    with pytest.raises(ValueError, match="pattern_type"):
        dattn.SparsePatternConfig("adaptive")
    with pytest.raises(TypeError, match="expected a torch.distributed ProcessGroup or None"):
        dattn.BlockSparseRingDilatedAttention([64], [1], group=object())


def test_dilated_pattern_module_uses_segments():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 256, 2, 8) for _ in range(3))
    module = dattn.BlockSparseRingDilatedAttention([128, 256], [1, 2], dattn.SparsePatternConfig("dilated", block_size=64))
    ref, _ = reference(q.double(), k.double(), v.double(), dattn.dilated_mask(256, [128, 256], [1, 2], 64), 64)
    assert_close_bar(module(q, k, v), ref, torch.float32, "out")
