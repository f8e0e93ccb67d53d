"""Ring (sequence-parallel) attention over a torch.distributed process group (docs/semantics.md "Ring
(sequence-parallel) attention"): gloo for CPU tensors, NCCL for CUDA ones. Each rank holds N/P
tokens in the contiguous or zigzag layout; Python drives the schedule with point-to-point calls
(rank t steps away, both directions) and runs each step with the C++ one-pass ring steps: the
forward merges every step into float32 out and lse (ring_forward_step), the backward is one sweep
(ring_step_gradients, with delta = rowsum(dout∘out)) whose dk, dv go back to the keys' owners."""

import functools
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from dattn import _C, _ops
from dattn._block_mask import mask_on

__all__ = ["RingDilatedAttention", "ring_dilated_attention", "ring_block_sparse_attention", "shard_sequence",
           "unshard_sequence"]

LAYOUTS = ("contiguous", "zigzag")


def _check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"layout = {layout!r}; expected 'contiguous' or 'zigzag'")


def _rows(N: int, P: int, rank: int, layout: str):
    return _C.ring_rows(int(N), int(P), int(rank), layout)  # ValueError when N does not divide


def shard_sequence(x: Tensor, rank: int, world_size: int, layout: str = "contiguous", dim: int = 1) -> Tensor:
    """The part of x (along dim) that rank holds: one chunk (contiguous) or chunks p and 2P−1−p."""
    _check_layout(layout)
    rows = _rows(x.size(dim), world_size, rank, layout)
    return torch.cat([x.narrow(dim, b, e - b) for b, e in rows], dim=dim)


def unshard_sequence(parts: Sequence[Tensor], layout: str = "contiguous", dim: int = 1) -> Tensor:
    """All ranks' parts joined back in sequence order."""
    _check_layout(layout)
    P = len(parts)
    N = sum(p.size(dim) for p in parts)
    pieces = {}
    for rank, part in enumerate(parts):
        at = 0
        for b, e in _rows(N, P, rank, layout):
            pieces[b] = part.narrow(dim, at, e - b)
            at += e - b
    return torch.cat([pieces[b] for b in sorted(pieces)], dim=dim)


def _peer(group, group_rank):  # point-to-point calls take global ranks
    if group is None or not hasattr(dist, "get_global_rank"):
        return group_rank
    return dist.get_global_rank(group, group_rank)


@functools.lru_cache(maxsize=64)
def _transfer_entries(segment_lengths, dilation_rates, mode, causal, layout, N, P, H, source, dest):
    """The C++ ring_transfer_entries, kept for the next call of the same shape (a pure function of
    its arguments; at N = 2^20 one list takes tens of milliseconds to make)."""
    return torch.tensor(_C.ring_transfer_entries(list(segment_lengths), list(dilation_rates), mode, causal, layout, N, P,
                                                 H, source, dest), dtype=torch.int64)


class _DilatedSteps:
    """Dilated attention on the ring: the C++ one-pass steps, and as transfer entries the (row, head)
    entries of the sender's keys that the receiver's queries select (ring_transfer_entries), so
    only selected keys travel and pairs that share no segment exchange nothing."""

    def __init__(self, segment_lengths, dilation_rates, mode, causal, scale, dropout_p, seed):
        self.config = (list(segment_lengths), list(dilation_rates), mode, bool(causal), scale)
        self.dropout = (float(dropout_p), int(seed))

    def entries(self, layout, N, P, H, source, dest):
        w, r, mode, causal, _ = self.config
        return _transfer_entries(tuple(w), tuple(r), mode, causal, layout, N, P, H, source, dest)

    def forward_step(self, step, q, k, v, out, lse, mask, stream):
        _C.ring_forward_step(step, q, k, v, out, lse, *self.config, mask, *self.dropout, stream)

    def step_gradients(self, step, q, k, v, dout, lse, delta, dq, dk, dv, mask, stream):
        _C.ring_step_gradients(step, q, k, v, dout, lse, delta, dq, dk, dv, *self.config, mask, *self.dropout, stream)


class _BlockSparseSteps:
    """Block-sparse attention on the ring: a rank's whole key chunk travels to a rank whose
    query blocks the mask lets see one of its key blocks (causal: one not after them), and steps
    that no local query block needs move and compute nothing."""

    def __init__(self, mask, block_size, causal, scale, dropout_p, seed):
        self.mask, self.config = mask, (int(block_size), bool(causal), scale)
        self.dropout = (float(dropout_p), int(seed))
        self._needed = {}

    def _needs(self, layout, N, P):
        """The (source, dest) rank pairs with an allowed key block of source for a query block of dest."""
        if (layout, N, P) not in self._needed:
            block, causal = self.config[0], self.config[1]
            owner = {}
            for rank in range(P):
                for b, e in _rows(N, P, rank, layout):
                    for kb in range(b // block, e // block):
                        owner[kb] = rank
            offsets, columns, nqb = self.mask.row_offsets, self.mask.columns, self.mask.query_blocks
            pairs = set()
            for h in range(self.mask.heads):
                for qb in range(nqb):
                    row = h * (nqb + 1) + qb
                    for kb in columns[offsets[row]:offsets[row + 1]]:
                        if not (causal and kb > qb):
                            pairs.add((owner[kb], owner[qb]))
            self._needed[(layout, N, P)] = pairs
        return self._needed[(layout, N, P)]

    def entries(self, layout, N, P, H, source, dest):
        n = N // P
        return torch.arange(n * H) if (source, dest) in self._needs(layout, N, P) else torch.zeros(0, dtype=torch.int64)

    def forward_step(self, step, q, k, v, out, lse, mask, stream):
        _C.block_sparse_ring_forward_step(self.mask, step, q, k, v, out, lse, *self.config, mask, *self.dropout, stream)

    def step_gradients(self, step, q, k, v, dout, lse, delta, dq, dk, dv, mask, stream):
        _C.block_sparse_ring_step_gradients(self.mask, step, q, k, v, dout, lse, delta, dq, dk, dv, *self.config, mask,
                                            *self.dropout, stream)


class _Schedule:
    """What travels at each step t (to rank + t, from rank − t): the entries of the sender's keys
    (local_row·Hkv + key head) that the receiver's queries need, as the attention kind (ctx.kind)
    says for the H query heads: under grouped-query heads a key head's row travels where any query
    head of its group needs it (CPU and CUDA tensors alike: k, v and dk, dv keep their Hkv heads, and
    the step kernels read query head h's keys at head h // (H / Hkv) and sum the group's gradients)."""

    def __init__(self, ctx, H, kv_heads, device):
        self.group, self.P, self.rank = ctx.group, dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        group = H // kv_heads

        def entries(source, dest):
            e = ctx.kind.entries(ctx.layout, ctx.N, self.P, H, source, dest)
            if group > 1:  # ascending in (row, query head), so the key heads' entries come in order
                e = torch.unique_consecutive(e // H * kv_heads + e % H // group)
            return e.to(device, non_blocking=True)

        self._entries = entries
        self._cache = {}

    def entries(self, t):
        """(outgoing, incoming) of step t: this rank's entries that rank + t needs, and rank − t's
        entries this rank needs. Made when needed and kept for two steps only, so a rank holds
        O(N/P) of them, not P lists."""
        if t not in self._cache:
            for old in [s for s in self._cache if s < t - 1]:
                del self._cache[old]
            self._cache[t] = (self._entries(self.rank, (self.rank + t) % self.P),
                              self._entries((self.rank - t) % self.P, self.rank))
        return self._cache[t]

    def _start(self, t, send, receive, towards_dest, tag):
        """Starts sending `send` to rank + t and receiving `receive` from rank − t (or the reverse);
        returns the requests."""
        to, frm = (self.rank + t) % self.P, (self.rank - t) % self.P
        if not towards_dest:
            to, frm = frm, to
        ops = [dist.P2POp(dist.isend, x, _peer(self.group, to), self.group, tag) for x in send] + \
              [dist.P2POp(dist.irecv, x, _peer(self.group, frm), self.group, tag) for x in receive]
        return dist.batch_isend_irecv(ops) if ops else []

    def _post_keys(self, t, kv, mask):
        out, inc = self.entries(t)
        two, B, n, H, D = kv.shape
        send = [kv.reshape(2, B, n * H, D).index_select(2, out).contiguous(), mask] if len(out) else []
        receive = [torch.empty(2, B, len(inc), D, dtype=kv.dtype, device=kv.device), torch.empty_like(mask)] \
            if len(inc) else []
        return self._start(t, send, receive, True, tag=1), send, receive

    def steps(self, kv, mask):
        """Yields (t, kv, mask) for t = 0 .. P−1 in order, every rank in step: the keys (kv
        [2, B, n, H, D]) and mask of rank − t, its own at t = 0, or (t, None, None) when this rank
        needs none of them; entries that did not travel are zero. The exchange of step t + 1 is in
        flight while the caller computes step t."""
        two, B, n, H, D = kv.shape
        pending = self._post_keys(1, kv, mask) if self.P > 1 else None
        yield (0, kv, mask) if len(self.entries(0)[0]) else (0, None, None)
        for t in range(1, self.P):
            requests, send, receive = pending
            pending = self._post_keys(t + 1, kv, mask) if t + 1 < self.P else None
            for request in requests:
                request.wait()
            if not receive:
                yield t, None, None
                continue
            block = torch.zeros(2, B, n * H, D, dtype=kv.dtype, device=kv.device).index_copy_(2, self.entries(t)[1],
                                                                                              receive[0])
            yield t, block.view(2, B, n, H, D), receive[1]

    def return_gradients(self, t, partial, dkv):
        """dkv += the gradients of this rank's keys that rank + t computed; the partial ones of
        rank − t's keys (partial [2, B, n, H, D]) go back to it, packed like its keys came. Every
        rank calls it for every t in order (a pairwise exchange)."""
        two, B, n, H, D = dkv.shape
        out, inc = self.entries(t)
        send = [partial.reshape(2, B, n * H, D).index_select(2, inc).contiguous()] if len(inc) else []
        receive = [torch.empty(2, B, len(out), D, device=dkv.device)] if len(out) else []
        for request in self._start(t, send, receive, False, tag=2):
            request.wait()
        if len(out):
            dkv.view(2, B, n * H, D).index_add_(2, out, receive[0])


class _RingFunction(torch.autograd.Function):
    """The ring of any attention kind (kind: _DilatedSteps or _BlockSparseSteps): forward steps merge
    into float32 out and lse; the backward is one sweep with delta = rowsum(dout∘out)."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, group, layout, kind):
        P, rank = dist.get_world_size(group), dist.get_rank(group)
        B, n, H, D = q.shape
        N = n * P
        ctx.group, ctx.layout, ctx.N, ctx.kind = group, layout, N, kind
        merged = torch.zeros(B, n, H, D, dtype=torch.float32, device=q.device)
        merged_lse = torch.full((B, H, n), float("-inf"), dtype=torch.float32, device=q.device)
        stream = _ops._stream(q)

        def forward_step(chunk, kv, key_at, k0, k1, step_mask):
            q0, q1, at = chunk
            kind.forward_step((q0, N, k0, k1), _ops._view(q[:, at:at + q1 - q0]),
                              _ops._view(kv[0, :, key_at:key_at + k1 - k0]), _ops._view(kv[1, :, key_at:key_at + k1 - k0]),
                              _ops._view(merged[:, at:at + q1 - q0]), _ops._view(merged_lse[:, :, at:at + q1 - q0]),
                              _mask_view(step_mask), stream)

        chunks = _query_chunks(N, P, rank, layout)
        for t, kv, block_mask in _Schedule(ctx, H, k.size(2), q.device).steps(*_own_keys(k, v, key_padding_mask)):
            if kv is not None:
                _each_pair(ctx, (rank - t) % P, chunks, kv, block_mask if key_padding_mask is not None else None,
                           forward_step)
        ctx.save_for_backward(q, k, v, merged, merged_lse, key_padding_mask)
        return merged.to(q.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
        dout = grad_out.contiguous()
        P, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        B, n, H, D = q.shape
        N, stream = ctx.N, _ops._stream(q)
        delta = (dout.float() * out).sum(-1).transpose(1, 2)  # rowsum(dout∘out), [B, H, n]
        chunks = [(q0, q1, at, lse[:, :, at:at + q1 - q0].contiguous(), delta[:, :, at:at + q1 - q0].contiguous())
                  for q0, q1, at in _query_chunks(N, P, rank, ctx.layout)]
        dq = torch.zeros(B, n, H, D, device=q.device)
        dkv = torch.zeros(2, B, n, k.size(2), D, device=q.device)  # Hkv heads under grouped-query heads
        partial = torch.zeros_like(dkv)

        def gradient_step(chunk, kv, key_at, k0, k1, step_mask):
            q0, q1, at, chunk_lse, chunk_delta = chunk
            keys = slice(key_at, key_at + k1 - k0)
            ctx.kind.step_gradients((q0, N, k0, k1), _ops._view(q[:, at:at + q1 - q0]), _ops._view(kv[0, :, keys]),
                                    _ops._view(kv[1, :, keys]), _ops._view(dout[:, at:at + q1 - q0]),
                                    _ops._view(chunk_lse), _ops._view(chunk_delta), _ops._view(dq[:, at:at + q1 - q0]),
                                    _ops._view(partial[0, :, keys]), _ops._view(partial[1, :, keys]),
                                    _mask_view(step_mask), stream)

        schedule = _Schedule(ctx, H, k.size(2), q.device)
        for t, kv, block_mask in schedule.steps(*_own_keys(k, v, key_padding_mask)):
            partial.zero_()
            if kv is not None:
                _each_pair(ctx, (rank - t) % P, chunks, kv, block_mask if key_padding_mask is not None else None,
                           gradient_step)
            if t == 0:
                dkv += partial
            else:  # also when rank − t's keys were not needed: rank + t may send this rank's back
                schedule.return_gradients(t, partial, dkv)
        return (dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)) + (None,) * 4


def _query_chunks(N, P, rank, layout):
    """This rank's row ranges with their offsets in its local tensors: (q0, q1, at)."""
    chunks, at = [], 0
    for q0, q1 in _rows(N, P, rank, layout):
        chunks.append((q0, q1, at))
        at += q1 - q0
    return chunks


def _own_keys(k, v, key_padding_mask):
    B, n = k.shape[:2]
    mask = key_padding_mask if key_padding_mask is not None else torch.zeros(B, n, dtype=torch.bool, device=k.device)
    return torch.stack([k, v]).contiguous(), mask.to(torch.uint8).contiguous()


def _mask_view(mask):  # the caller holds the tensor while C++ reads it
    return None if mask is None else _ops._view(mask)


def _each_pair(ctx, source, chunks, kv, block_mask, fn):
    """fn(chunk, kv, key_at, k0, k1, step_mask) for every (query chunk, key chunk of source) pair."""
    P = dist.get_world_size(ctx.group)
    key_at = 0
    for k0, k1 in _rows(ctx.N, P, source, ctx.layout):
        step_mask = None if block_mask is None else block_mask[:, key_at:key_at + k1 - k0].bool().contiguous()
        for chunk in chunks:
            fn(chunk, kv, key_at, k0, k1, step_mask)
        key_at += k1 - k0


def _group_seed(group, device) -> int:
    """docs/semantics.md: the group's rank 0 draws the dropout seed and broadcasts it (on the tensors' device:
    NCCL moves CUDA tensors only)."""
    seed = torch.tensor([_ops.draw_dropout_seed() if dist.get_rank(group) == 0 else 0], dtype=torch.int64,
                        device=device)
    dist.broadcast(seed, src=_peer(group, 0), group=group)
    return int(seed.item())


def check_group(group, layout) -> None:
    """The trailing ``group=None, layout="contiguous"`` arguments of the modules."""
    _check_layout(layout)
    if group is not None and not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(f"group = {group!r}; expected a torch.distributed ProcessGroup or None")


def ring_dilated_attention(q: Tensor, k: Tensor, v: Tensor, segment_lengths: Sequence[int],
                           dilation_rates: Sequence[int], group, layout: str = "contiguous", is_causal: bool = False,
                           scale: Optional[float] = None, mode: str = "grouped",
                           key_padding_mask: Optional[Tensor] = None, dropout_p: float = 0.0) -> Tensor:
    """``dilated_attention`` of one sequence split over the ranks of ``group``: q, k, v
    ``[B, N/P, H, D]`` and ``key_padding_mask`` ``[B, N/P]`` are this rank's rows in ``layout``;
    returns this rank's rows of the output, with autograd. CPU tensors over gloo, CUDA tensors over
    NCCL (a CUDA build of dattn)."""
    _ops.check_attention_inputs(q, k, v)
    _check_layout(layout)
    segment_lengths, dilation_rates = _ops.check_config(segment_lengths, dilation_rates)
    mode, scale, dropout_p = _ops.check_mode(mode), _ops.check_scale(scale), _ops.check_dropout(dropout_p)
    if q.device.type == "cuda" and not _C.has_cuda:
        raise ValueError(f"q is on {q.device}; this dattn build has no CUDA kernels (expected cpu tensors)")
    _ops.check_key_padding_mask(key_padding_mask, q.size(0), q.size(1), q.device)
    seed = _group_seed(group, q.device) if dropout_p > 0.0 else 0
    kind = _DilatedSteps(segment_lengths, dilation_rates, mode, is_causal, scale, dropout_p, seed)
    return _RingFunction.apply(q, k, v, key_padding_mask, group, layout, kind)


def ring_block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, mask, block_size: int, group,
                                layout: str = "contiguous", is_causal: bool = False, scale: Optional[float] = None,
                                key_padding_mask: Optional[Tensor] = None, dropout_p: float = 0.0) -> Tensor:
    """Block-sparse attention of one sequence split over the ranks of ``group`` (CPU tensors over
    gloo, CUDA tensors over NCCL): ``mask`` is the ``BlockSparseMask`` of the whole sequence; every
    rank's chunk (N/P, or N/2P zigzag) must be a multiple of ``block_size``. Returns this rank's
    rows, with autograd."""
    _ops.check_attention_inputs(q, k, v)
    _check_layout(layout)
    mask = mask_on(mask, q.device)
    P = dist.get_world_size(group)
    parts = 2 * P if layout == "zigzag" else P
    chunk = q.size(1) * P // parts
    if chunk % block_size != 0:
        raise ValueError(f"each rank's chunk of {chunk} rows is not a multiple of block_size = {block_size}; expected "
                         f"N / {parts} ({layout} layout) to be a multiple of it")
    scale, dropout_p = _ops.check_scale(scale), _ops.check_dropout(dropout_p)
    _ops.check_key_padding_mask(key_padding_mask, q.size(0), q.size(1), q.device)
    seed = _group_seed(group, q.device) if dropout_p > 0.0 else 0
    kind = _BlockSparseSteps(mask, block_size, is_causal, scale, dropout_p, seed)
    return _RingFunction.apply(q, k, v, key_padding_mask, group, layout, kind)


class RingDilatedAttention(nn.Module):
    """Dilated attention of one sequence split over the ranks of a process group: each rank passes
    its local q, k, v ``[B, N/P, H, D]`` (and key_padding_mask ``[B, N/P]``) in ``layout`` and gets
    its rows of the output. ``group=None`` means the default group when one is initialised, else a
    single process. CPU tensors over gloo, CUDA tensors over NCCL."""

    def __init__(self, segment_lengths: Sequence[int], dilation_rates: Sequence[int], group=None,
                 layout: str = "contiguous", mode: str = "grouped"):
        super().__init__()
        check_group(group, layout)
        self.segment_lengths, self.dilation_rates = _ops.check_config(segment_lengths, dilation_rates)
        self.group, self.layout, self.mode = group, layout, _ops.check_mode(mode)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False,
                key_padding_mask: Optional[Tensor] = None) -> Tensor:
        if self.group is None and not (dist.is_available() and dist.is_initialized()):
            _ops.check_attention_inputs(q, k, v)
            return _ops.attention_forward(q, k, v, key_padding_mask, self.segment_lengths, self.dilation_rates,
                                          is_causal, None, self.mode, 0.0, 0, False)[0]
        return ring_dilated_attention(q, k, v, self.segment_lengths, self.dilation_rates, self.group, self.layout,
                                      is_causal, None, self.mode, key_padding_mask)
