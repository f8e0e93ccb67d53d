"""Checks of the tests' own float64 reference against facts independent of it."""

import math

import numpy as np
import pytest
import torch

from reference_attention import dilated_attention_reference, dropout_keep, philox4x32_10


def test_philox_known_answers():
    # SPEC.md (Random123 known-answer vectors).
    words = philox4x32_10((0, 0, 0, 0), (0, 0))
    assert [int(w) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    words = philox4x32_10((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0))
    assert [int(w) for w in words] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_dropout_keep_rate():
    keep = dropout_keep(seed=12345, offset=0, batch=2, heads=3, seqlen=64, p=0.25)
    assert keep.shape == (2, 3, 64, 64)
    assert abs(keep.double().mean().item() - 0.75) < 0.02
    # The decision depends on (b, h, i, j) only through the counter: another seed differs.
    assert not torch.equal(keep, dropout_keep(seed=12346, offset=0, batch=2, heads=3, seqlen=64, p=0.25))


def plain_attention(q, k, v, mask=None, scale=None):
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = scale * torch.einsum("bihd,bjhd->bhij", q, k)
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf)
    p = torch.softmax(s, -1)
    return torch.einsum("bhij,bjhd->bihd", p, v), torch.logsumexp(s, -1)


def test_one_full_branch_is_plain_attention():
    q, k, v = (torch.randn(2, 20, 3, 5, dtype=torch.float64) for _ in range(3))
    for mode in ("grouped", "longnet"):
        out, lse = dilated_attention_reference(q, k, v, [32], [1], mode=mode)
        ref, ref_lse = plain_attention(q, k, v)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(lse, ref_lse)
    causal = torch.ones(20, 20, dtype=torch.bool).tril()
    out, _ = dilated_attention_reference(q, k, v, [20], [1], is_causal=True)
    torch.testing.assert_close(out, plain_attention(q, k, v, causal)[0])


def test_grouped_by_hand():
    # H = 2, G = 2: head 0 uses branch 0 (w=4, r=1), head 1 uses branch 1 (w=8, r=2, offset 1).
    B, N, H, D = 1, 8, 2, 3
    q, k, v = (torch.randn(B, N, H, D, dtype=torch.float64) for _ in range(3))
    out, lse = dilated_attention_reference(q, k, v, [4, 8], [1, 2])
    expected = torch.zeros_like(out)
    for start in (0, 4):
        sl = slice(start, start + 4)
        o, _ = plain_attention(q[:, sl, :1], k[:, sl, :1], v[:, sl, :1])
        expected[:, sl, :1] = o / 2
    idx = torch.tensor([1, 3, 5, 7])
    o, _ = plain_attention(q[:, idx, 1:], k[:, idx, 1:], v[:, idx, 1:])
    expected[:, idx, 1:] = o / 2
    torch.testing.assert_close(out, expected)
    assert torch.isneginf(lse[0, 1, ::2]).all() and torch.isfinite(lse[0, 1, 1::2]).all()


def test_longnet_is_one_softmax_over_the_branch_multiset():
    # Every head in both branches; the merge equals one softmax where a key counts once per branch.
    B, N, H, D = 1, 8, 2, 3
    q, k, v = (torch.randn(B, N, H, D, dtype=torch.float64) for _ in range(3))
    w, r = [4, 8], [1, 2]
    out, lse = dilated_attention_reference(q, k, v, w, r, mode="longnet")
    scale = 1 / math.sqrt(D)
    for h in range(H):
        for p in range(N):
            keys = []
            for wi, ri in zip(w, r):
                start = p // wi * wi
                if (p - start) % ri != h % ri:
                    continue
                keys += [j for j in range(start + h % ri, min(start + wi, N), ri)]
            if not keys:
                assert torch.isneginf(lse[0, h, p]) and (out[0, p, h] == 0).all()
                continue
            s = torch.stack([scale * q[0, p, h] @ k[0, j, h] for j in keys])
            prob = torch.softmax(s, 0)
            expected = sum(prob[n] * v[0, j, h] for n, j in enumerate(keys))
            torch.testing.assert_close(out[0, p, h], expected)
            torch.testing.assert_close(lse[0, h, p], torch.logsumexp(s, 0))


@pytest.mark.parametrize("mode", ["grouped", "longnet"])
def test_reference_gradients_are_finite_with_empty_rows(mode):
    q, k, v = (torch.randn(2, 12, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[1] = True  # a batch entry with every key padded
    out, _ = dilated_attention_reference(q, k, v, [4, 12], [2, 3], mode=mode, key_padding_mask=mask)
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
        assert (t.grad[1] == 0).all()
    assert np.isfinite(out.detach().numpy()).all()
