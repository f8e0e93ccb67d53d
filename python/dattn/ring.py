"""Ring (sequence-parallel) attention over a torch.distributed process group (SPEC.md "Ring
(sequence-parallel) attention"). Each rank holds N/P tokens in the contiguous or zigzag layout;
Python drives the schedule with point-to-point calls (rank t steps away, both directions) and
runs each step with the C++ ring-step kernels and the log-sum-exp merge."""

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from dattn import _C, _ops

__all__ = ["RingDilatedAttention", "ring_dilated_attention", "shard_sequence", "unshard_sequence"]

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


class _Schedule:
    """What travels at each step t (to rank + t, from rank − t): the (row, head) entries of the
    sender's keys that the receiver's queries select (the C++ ring_transfer_entries), so only
    selected keys travel and pairs that share no segment exchange nothing."""

    def __init__(self, ctx, H):
        self.group, self.P, self.rank = ctx.group, dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        args = (ctx.segment_lengths, ctx.dilation_rates, ctx.mode, ctx.causal, ctx.layout, ctx.N, self.P, H)

        self._entries = lambda source, dest: torch.tensor(_C.ring_transfer_entries(*args, source, dest),
                                                          dtype=torch.int64)
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
        receive = [torch.empty(2, B, len(inc), D, dtype=kv.dtype), torch.empty_like(mask)] if len(inc) else []
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
            block = torch.zeros(2, B, n * H, D, dtype=kv.dtype).index_copy_(2, self.entries(t)[1], receive[0])
            yield t, block.view(2, B, n, H, D), receive[1]

    def return_gradients(self, t, partial, dkv):
        """dkv += the gradients of this rank's keys that rank + t computed; the partial ones of
        rank − t's keys (partial [2, B, n, H, D]) go back to it, packed like its keys came. Every
        rank calls it for every t in order (a pairwise exchange)."""
        two, B, n, H, D = dkv.shape
        out, inc = self.entries(t)
        send = [partial.reshape(2, B, n * H, D).index_select(2, inc).contiguous()] if len(inc) else []
        receive = [torch.empty(2, B, len(out), D)] if len(out) else []
        for request in self._start(t, send, receive, False, tag=2):
            request.wait()
        if len(out):
            dkv.view(2, B, n * H, D).index_add_(2, out, receive[0])


def _config(ctx):
    return (ctx.segment_lengths, ctx.dilation_rates, ctx.mode, ctx.causal, ctx.scale)


class _RingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, group, layout, segment_lengths, dilation_rates, is_causal, scale, mode,
                dropout_p, seed):
        P, rank = dist.get_world_size(group), dist.get_rank(group)
        B, n, H, D = q.shape
        N = n * P
        ctx.group, ctx.layout, ctx.N = group, layout, N
        ctx.segment_lengths, ctx.dilation_rates, ctx.mode = list(segment_lengths), list(dilation_rates), mode
        ctx.causal, ctx.scale, ctx.dropout_p, ctx.seed = bool(is_causal), scale, float(dropout_p), int(seed)
        mask = key_padding_mask if key_padding_mask is not None else torch.zeros(B, n, dtype=torch.bool)
        own = (torch.stack([k, v]).contiguous(), mask.to(torch.uint8).contiguous())
        merged = torch.zeros(B, n, H, D, dtype=torch.float32)
        merged_lse = torch.full((B, H, n), float("-inf"), dtype=torch.float32)
        mine = _rows(N, P, rank, layout)
        schedule = _Schedule(ctx, H)
        for t, kv, block_mask in schedule.steps(*own):
            if kv is None:
                continue
            source = (rank - t) % P
            key_at = 0
            for k0, k1 in _rows(N, P, source, layout):
                step_mask = block_mask[:, key_at:key_at + k1 - k0].bool().contiguous() if key_padding_mask is not None \
                    else None
                query_at = 0
                for q0, q1 in mine:
                    part = torch.empty(B, q1 - q0, H, D, dtype=q.dtype)
                    part_lse = torch.empty(B, H, q1 - q0, dtype=torch.float32)
                    _C.forward(_ops._view(q[:, query_at:query_at + q1 - q0]), _ops._view(kv[0, :, key_at:key_at + k1 - k0]),
                               _ops._view(kv[1, :, key_at:key_at + k1 - k0]), _ops._view(part), _ops._view(part_lse),
                               **_ops._config_args(step_mask, segment_lengths, dilation_rates, is_causal, scale, mode,
                                                   dropout_p, seed, False, 0),
                               ring_step=(q0, N, k0, k1))
                    _C.merge_partial(_ops._view(merged[:, query_at:query_at + q1 - q0]),
                                     _ops._view(merged_lse[:, :, query_at:query_at + q1 - q0]), _ops._view(part),
                                     _ops._view(part_lse))
                    query_at += q1 - q0
                key_at += k1 - k0
        ctx.save_for_backward(q, k, v, merged_lse, key_padding_mask)
        return merged.to(q.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, lse, key_padding_mask = ctx.saved_tensors
        dout = grad_out.contiguous()
        group, layout, N = ctx.group, ctx.layout, ctx.N
        P, rank = dist.get_world_size(group), dist.get_rank(group)
        B, n, H, D = q.shape
        mask = key_padding_mask if key_padding_mask is not None else torch.zeros(B, n, dtype=torch.bool)
        own = (torch.stack([k, v]).contiguous(), mask.to(torch.uint8).contiguous())
        schedule = _Schedule(ctx, H)
        w, r, mode, causal, scale = _config(ctx)
        mine = _rows(N, P, rank, layout)
        chunks = []
        at = 0
        for q0, q1 in mine:
            c = q1 - q0
            chunks.append((q0, q1, at, lse[:, :, at:at + c].contiguous(), torch.zeros(B, c, H, D), torch.zeros(B, c, H, D),
                           torch.zeros(B, H, c)))
            at += c

        def step(t, kv, block_mask, fn):  # fn over every (query chunk, key chunk) pair of rank − t's keys
            key_at = 0
            for k0, k1 in _rows(N, P, (rank - t) % P, layout):
                step_mask = block_mask[:, key_at:key_at + k1 - k0].bool().contiguous() if key_padding_mask is not None \
                    else None
                for chunk in chunks:
                    fn(chunk, kv, key_at, k0, k1, step_mask)
                key_at += k1 - k0

        def query_step(chunk, kv, key_at, k0, k1, step_mask):
            q0, q1, q_at, chunk_lse, sum_gk, sum_pk, delta = chunk
            _C.ring_query_gradients((q0, N, k0, k1), _ops._view(q[:, q_at:q_at + q1 - q0]),
                                    _ops._view(kv[0, :, key_at:key_at + k1 - k0]), _ops._view(kv[1, :, key_at:key_at + k1 - k0]),
                                    _ops._view(dout[:, q_at:q_at + q1 - q0]), _ops._view(chunk_lse), _ops._view(sum_gk),
                                    _ops._view(sum_pk), _ops._view(delta), w, r, mode, causal, scale,
                                    None if step_mask is None else _ops._view(step_mask), ctx.dropout_p, ctx.seed)

        for t, kv, block_mask in schedule.steps(*own):
            if kv is not None:
                step(t, kv, block_mask, query_step)
        dq = torch.empty_like(q)
        for q0, q1, q_at, _, sum_gk, sum_pk, delta in chunks:
            view = dq[:, q_at:q_at + q1 - q0]
            _C.ring_finish_query_gradients(_ops._view(sum_gk), _ops._view(sum_pk), _ops._view(delta), _ops._view(view), w,
                                           r, scale)

        dkv = torch.zeros(2, B, n, H, D)
        partial = torch.zeros(2, B, n, H, D)
        for t, kv, block_mask in schedule.steps(*own):
            partial.zero_()

            def key_step(chunk, kv, key_at, k0, k1, step_mask):
                q0, q1, q_at, chunk_lse, _, _, delta = chunk
                _C.ring_key_gradients((q0, N, k0, k1), _ops._view(q[:, q_at:q_at + q1 - q0]),
                                      _ops._view(kv[0, :, key_at:key_at + k1 - k0]),
                                      _ops._view(kv[1, :, key_at:key_at + k1 - k0]), _ops._view(dout[:, q_at:q_at + q1 - q0]),
                                      _ops._view(chunk_lse), _ops._view(delta),
                                      _ops._view(partial[0, :, key_at:key_at + k1 - k0]),
                                      _ops._view(partial[1, :, key_at:key_at + k1 - k0]), w, r, mode, causal, scale,
                                      None if step_mask is None else _ops._view(step_mask), ctx.dropout_p, ctx.seed)

            if kv is not None:
                step(t, kv, block_mask, key_step)
            if t == 0:
                dkv += partial
            else:  # also when rank − t's keys were not needed: rank + t may send this rank's back
                schedule.return_gradients(t, partial, dkv)
        return (dq, dkv[0].to(k.dtype), dkv[1].to(v.dtype)) + (None,) * 10


def _group_seed(group) -> int:
    """SPEC.md: the group's rank 0 draws the dropout seed and broadcasts it."""
    seed = torch.tensor([_ops.draw_dropout_seed() if dist.get_rank(group) == 0 else 0], dtype=torch.int64)
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
    returns this rank's rows of the output, with autograd. CPU tensors (gloo)."""
    _ops.check_attention_inputs(q, k, v)
    _check_layout(layout)
    segment_lengths, dilation_rates = _ops.check_config(segment_lengths, dilation_rates)
    mode, scale, dropout_p = _ops.check_mode(mode), _ops.check_scale(scale), _ops.check_dropout(dropout_p)
    if q.device.type != "cpu":
        raise ValueError(f"q is on {q.device}; ring attention runs on cpu tensors (gloo) so far")
    _ops.check_key_padding_mask(key_padding_mask, q.size(0), q.size(1), q.device)
    seed = _group_seed(group) if dropout_p > 0.0 else 0
    return _RingFunction.apply(q, k, v, key_padding_mask, group, layout, segment_lengths, dilation_rates,
                               bool(is_causal), scale, mode, dropout_p, seed)


class RingDilatedAttention(nn.Module):
    """Dilated attention of one sequence split over the ranks of a process group: each rank passes
    its local q, k, v ``[B, N/P, H, D]`` (and key_padding_mask ``[B, N/P]``) in ``layout`` and gets
    its rows of the output. ``group=None`` means the default group when one is initialised, else a
    single process. CPU tensors (gloo) so far."""

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
