"""Dilated attention written directly from SPEC.md in plain PyTorch (float64, dense masks).

Independent of the C++ reference: it builds, for every head and branch, the boolean
(query, key) mask SPEC.md describes and runs ordinary masked softmax attention, so autograd
gives the reference gradients. Only for small N (it is O(N^2) per head).
"""

import math

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------
# Philox4x32-10 (Random123) in numpy uint64 arithmetic: 32x32-bit products are exact in 64 bits.

_MUL0, _MUL1 = 0xD2511F53, 0xCD9E8D57
_WEYL0, _WEYL1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def philox4x32_10(counter, key):
    """counter: 4 arrays (or ints) of 32-bit words, key: 2 ints. Returns the 4 output words."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = np.uint64(key[0] & _MASK32), np.uint64(key[1] & _MASK32)
    m0, m1, mask, s32 = np.uint64(_MUL0), np.uint64(_MUL1), np.uint64(_MASK32), np.uint64(32)
    for _ in range(10):
        p0 = m0 * c0
        p1 = m1 * c2
        c0, c1, c2, c3 = (p1 >> s32) ^ c1 ^ k0, p1 & mask, (p0 >> s32) ^ c3 ^ k1, p0 & mask
        k0 = (k0 + np.uint64(_WEYL0)) & mask
        k1 = (k1 + np.uint64(_WEYL1)) & mask
    return c0, c1, c2, c3


def dropout_keep(seed, offset, batch, heads, seqlen, p):
    """keep[b, h, i, j] for every (batch, head, query i, key j): SPEC.md's decision."""
    threshold = np.uint64(int(p * 4294967296.0))
    b, h, i, j = np.meshgrid(np.arange(batch), np.arange(heads), np.arange(seqlen), np.arange(seqlen),
                             indexing="ij")
    b, h, i, j = (x.astype(np.uint64) for x in (b, h, i, j))
    words = philox4x32_10((j >> np.uint64(2), i, b * np.uint64(heads) + h,
                           np.full(j.shape, offset & _MASK32, dtype=np.uint64)),
                          (seed & _MASK32, (seed >> 32) & _MASK32))
    word = np.choose((j & np.uint64(3)).astype(np.int64), words)
    return torch.from_numpy(word >= threshold)


# ---------------------------------------------------------------------------------------------

def head_groups(heads, groups):
    """Grouped mode: group i holds H//G + (1 if i < H%G) contiguous heads. Returns group of head."""
    group_of = []
    for i in range(groups):
        group_of += [i] * (heads // groups + (1 if i < heads % groups else 0))
    return group_of


def branch_mask(seqlen, w, r, offset, causal):
    """[N, N] bool: (query p, key j) both selected by the branch in the same segment (causal: j <= p)."""
    pos = torch.arange(seqlen)
    segment = pos // w
    selected = (pos - segment * w) % r == offset
    allowed = selected[:, None] & selected[None, :] & (segment[:, None] == segment[None, :])
    if causal:
        allowed &= pos[None, :] <= pos[:, None]
    return allowed, selected


def _masked_softmax_attention(scores, allowed, v, factor):
    """scores [B, N, N], allowed [B, N, N], v [B, N, D], factor [B, N, N] dropout factor.
    Returns (out [B, N, D], lse [B, N]) with out = 0 and lse = -inf for rows with no allowed key.
    Written so that no NaN reaches the gradient through fully masked rows."""
    any_key = allowed.any(-1)
    neg_inf = torch.tensor(-math.inf, dtype=scores.dtype)
    masked = torch.where(allowed, scores, neg_inf)
    masked = torch.where(any_key[..., None], masked, torch.zeros_like(masked))
    lse = torch.logsumexp(masked, dim=-1)
    prob = torch.where(allowed, torch.exp(masked - lse[..., None]), torch.zeros_like(masked))
    out = (prob * factor) @ v
    return out, torch.where(any_key, lse, neg_inf)


def dilated_attention_reference(q, k, v, segment_lengths, dilation_rates, is_causal=False, scale=None,
                                mode="grouped", key_padding_mask=None, dropout_p=0.0, dropout_seed=0,
                                dropout_offset=0):
    """Returns (out [B, N, H, D] in q's dtype, lse [B, H, N] float64). Differentiable."""
    B, N, H, D = q.shape
    G = len(segment_lengths)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    scores = scale * torch.einsum("bihd,bjhd->bhij", q, k)  # [B, H, N, N]
    if dropout_p > 0:
        keep = dropout_keep(dropout_seed, dropout_offset, B, H, N, dropout_p)
        factor = keep.to(q.dtype) / (1.0 - dropout_p)
    else:
        factor = torch.ones(B, H, N, N, dtype=q.dtype)
    not_padded = torch.ones(B, N, dtype=torch.bool) if key_padding_mask is None else ~key_padding_mask.cpu()
    group_of = head_groups(H, G)

    outs, lses = [], []
    for h in range(H):
        branch_outs, branch_lses = [], []
        branches = [group_of[h]] if mode == "grouped" else list(range(G))
        for i in branches:
            w, r = segment_lengths[i], dilation_rates[i]
            offset = i % r if mode == "grouped" else h % r
            allowed, _ = branch_mask(N, w, r, offset, is_causal)
            allowed = allowed[None, :, :] & not_padded[:, None, :]
            o, l = _masked_softmax_attention(scores[:, h], allowed, v[:, :, h], factor[:, h])
            branch_outs.append(o)
            branch_lses.append(l)
        if mode == "grouped":
            out_h, lse_h = branch_outs[0] / G, branch_lses[0]
        else:
            # Merge by softmax denominators: lse = log sum_i exp(lse_i), out = sum_i exp(lse_i - lse) out_i.
            stacked = torch.stack(branch_lses)  # [G, B, N]
            valid = torch.isfinite(stacked)
            any_branch = valid.any(0)
            safe = torch.where(valid, stacked, torch.full_like(stacked, -math.inf))
            safe = torch.where(any_branch[None], safe, torch.zeros_like(safe))
            total = torch.logsumexp(safe, dim=0)
            weights = torch.where(valid, torch.exp(safe - total[None]), torch.zeros_like(safe))
            out_h = sum(weights[g][..., None] * branch_outs[g] for g in range(len(branch_outs)))
            lse_h = torch.where(any_branch, total, torch.full_like(total, -math.inf))
        outs.append(out_h)
        lses.append(lse_h)
    out = torch.stack(outs, dim=2)  # [B, N, H, D]
    lse = torch.stack(lses, dim=1)  # [B, H, N]
    return out, lse
