"""RingDilatedAttention over a 2-process gloo group: the gathered output and gradients equal
single-process dilated attention; shard/unshard round trips. Grouped-query heads also over ranks
as threads of this process (a stand-in for torch.distributed), on CPU and CUDA tensors: k, v keep
their Hkv heads on the ring."""

import collections
import os
import socket
import tempfile
import threading
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dattn
from helpers import assert_close_bar, requires_cuda


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASES = [
    dict(layout="contiguous", causal=False, mode="grouped", w=[8, 16], r=[1, 2], padding=False),
    dict(layout="zigzag", causal=True, mode="grouped", w=[6, 24], r=[1, 3], padding=True, kv_heads=1),
    dict(layout="zigzag", causal=True, mode="longnet", w=[5, 32], r=[1, 2], padding=False),
    dict(layout="contiguous", causal=True, mode="longnet", w=[12], r=[2], padding=True, kv_heads=1),
    dict(layout="contiguous", causal=False, mode="grouped", w=[4, 32], r=[1, 4], padding=False),  # geo-like
    dict(layout="zigzag", causal=False, mode="longnet", w=[3, 16, 40], r=[2, 4, 5], padding=True),
]
B, N, H, D, E = 2, 32, 3, 8, 24
# Block-sparse masks on the ring (blocks of 4 rows: every rank's chunk is a whole number of them).
SPARSE_CASES = [
    dict(layout="contiguous", causal=False, padding=False, config=("local_window", dict(window_size=8))),
    dict(layout="zigzag", causal=True, padding=True, config=("dilated_sparse", dict(dilation_rates=[1, 3]))),
    dict(layout="zigzag", causal=False, padding=False, config=("global_local", dict(window_size=8, global_tokens=1))),
    dict(layout="contiguous", causal=True, padding=True, config=("local_window", dict(window_size=16))),
]


def _sparse_config(case):
    name, kwargs = case["config"]
    return dattn.SparsePatternConfig(name, block_size=4, **kwargs)


def _inputs(i):
    """q, k, v, dout and a padding mask of case i; k, v with the case's kv_heads (grouped-query heads)."""
    g = torch.Generator().manual_seed(i)
    kv_heads = CASES[i].get("kv_heads", H)
    q, k, v, grad = (torch.randn(B, N, H if j in (0, 3) else kv_heads, D, generator=g) for j in range(4))
    padding = torch.rand(B, N, generator=g) < 0.2 if CASES[i]["padding"] else None
    return q, k, v, grad, padding


def _module(dropout):
    torch.manual_seed(0)  # the same weights in every process
    return dattn.MultiheadDilatedAttention(E, 3, [1, 2], [8, 32], dropout=dropout)


def _worker(rank, world, port, folder):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    for i, case in enumerate(CASES):
        q, k, v, grad, padding = _inputs(i)
        module = dattn.RingDilatedAttention(case["w"], case["r"], layout=case["layout"], mode=case["mode"])
        local = [dattn.shard_sequence(t, rank, world, case["layout"]).requires_grad_() for t in (q, k, v)]
        local_padding = None if padding is None else dattn.shard_sequence(padding, rank, world, case["layout"])
        out = module(*local, is_causal=case["causal"], key_padding_mask=local_padding)
        out.backward(dattn.shard_sequence(grad, rank, world, case["layout"]))
        torch.save({"out": out.detach(), "grads": [t.grad for t in local]}, os.path.join(folder, f"{i}-{rank}.pt"))
    for i, case in enumerate(SPARSE_CASES):
        q, k, v, grad, padding = _inputs(i)
        if not case["padding"]:
            padding = None
        elif padding is None:
            padding = torch.rand(B, N, generator=torch.Generator().manual_seed(i)) < 0.2
        module = dattn.BlockSparseRingDilatedAttention([8], [1], _sparse_config(case), group=dist.group.WORLD,
                                                       layout=case["layout"])
        local = [dattn.shard_sequence(t, rank, world, case["layout"]).requires_grad_() for t in (q, k, v)]
        local_padding = None if padding is None else dattn.shard_sequence(padding, rank, world, case["layout"])
        out = module(*local, is_causal=case["causal"], key_padding_mask=local_padding)
        out.backward(dattn.shard_sequence(grad, rank, world, case["layout"]))
        torch.save({"out": out.detach(), "grads": [t.grad for t in local], "padding": padding},
                   os.path.join(folder, f"s{i}-{rank}.pt"))
    # A multi-head module given the group: projections per rank, attention over the ring; with
    # dropout, rank 0's seed (drawn after the same torch.manual_seed) reaches every rank.
    for dropout in (0.0, 0.3):
        layout = "zigzag"
        module = _module(dropout).train()
        module.group, module.layout = dist.group.WORLD, layout
        torch.manual_seed(5)
        x = torch.randn(B, N, E, generator=torch.Generator().manual_seed(9))
        local = dattn.shard_sequence(x, rank, world, layout).requires_grad_()
        out = module(local, is_causal=True)
        out.backward(dattn.shard_sequence(torch.ones(B, N, E), rank, world, layout))
        grads = [p.grad.clone() for p in module.parameters()]
        for g in grads:
            dist.all_reduce(g)
        torch.save({"out": out.detach(), "dx": local.grad, "grads": grads}, os.path.join(folder, f"m{dropout}-{rank}.pt"))
    dist.destroy_process_group()
    # torch 1.13's gloo worker threads drop their last collective's tensors a moment after wait()
    # returns; if that moment falls in interpreter shutdown, taking the GIL aborts the process
    # ("terminate called without an active exception", 1 run in ~30 on 2 cores). Every result is
    # on disk by now, so leave without the shutdown.
    os._exit(0)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("world", [2, 4])
def test_gloo_ring_equals_single_process(world):
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(world, _free_port(), folder), nprocs=world, join=True)
        for i, case in enumerate(CASES):
            q, k, v, grad, padding = _inputs(i)
            q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
            ref = dattn.dilated_attention(q64, k64, v64, case["w"], case["r"], is_causal=case["causal"],
                                          mode=case["mode"], key_padding_mask=padding)
            ref.backward(grad.double())
            parts = [torch.load(os.path.join(folder, f"{i}-{r}.pt")) for r in range(world)]
            out = dattn.unshard_sequence([p["out"] for p in parts], case["layout"])
            assert_close_bar(out, ref, torch.float32, f"case {i} out")
            for j, (name, r64) in enumerate((("dq", q64.grad), ("dk", k64.grad), ("dv", v64.grad))):
                got = dattn.unshard_sequence([p["grads"][j] for p in parts], case["layout"])
                assert_close_bar(got, r64, torch.float32, f"case {i} {name}")
        for i, case in enumerate(SPARSE_CASES):
            q, k, v, grad, _ = _inputs(i)
            parts = [torch.load(os.path.join(folder, f"s{i}-{r}.pt")) for r in range(world)]
            q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
            ref = dattn.block_sparse_attention(q64, k64, v64, _sparse_config(case).dense_mask(N), 4,
                                               is_causal=case["causal"], key_padding_mask=parts[0]["padding"])
            ref.backward(grad.double())
            out = dattn.unshard_sequence([p["out"] for p in parts], case["layout"])
            assert_close_bar(out, ref, torch.float32, f"sparse case {i} out")
            for j, (name, r64) in enumerate((("dq", q64.grad), ("dk", k64.grad), ("dv", v64.grad))):
                got = dattn.unshard_sequence([p["grads"][j] for p in parts], case["layout"])
                assert_close_bar(got, r64, torch.float32, f"sparse case {i} {name}")
        for dropout in (0.0, 0.3):
            module = _module(dropout).train().double()
            torch.manual_seed(5)
            x = torch.randn(B, N, E, generator=torch.Generator().manual_seed(9)).double().requires_grad_()
            ref = module(x, is_causal=True)
            ref.backward(torch.ones(B, N, E, dtype=torch.float64))
            parts = [torch.load(os.path.join(folder, f"m{dropout}-{r}.pt")) for r in range(world)]
            assert_close_bar(dattn.unshard_sequence([p["out"] for p in parts], "zigzag"), ref, torch.float32,
                             f"module dropout={dropout} out")
            assert_close_bar(dattn.unshard_sequence([p["dx"] for p in parts], "zigzag"), x.grad, torch.float32,
                             f"module dropout={dropout} dx")
            for (name, p), got in zip(module.named_parameters(), parts[0]["grads"]):
                if name == "k_proj.bias":  # exactly 0 (softmax ignores a shift of every key): round-off only
                    assert got.norm() <= 1e-5 * module.k_proj.weight.grad.norm(), f"module d{name}"
                    continue
                assert_close_bar(got, p.grad, torch.float32, f"module dropout={dropout} d{name}")


def test_schedule_sends_key_heads_under_grouped_query_heads(monkeypatch):
    """Under grouped-query heads a key head's row travels once where any query head of its group
    needs it (CPU tensors: k, v keep their Hkv heads on the ring)."""
    import dattn.ring as ring
    monkeypatch.setattr(ring.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(ring.dist, "get_rank", lambda group=None: 0)

    class Kind:  # entries row·H + query head of rows 0-2, H = 4
        def entries(self, layout, N, P, H, source, dest):
            return torch.tensor([0, 1, 2, 3, 4, 6, 9, 11])

    ctx = types.SimpleNamespace(group=None, kind=Kind(), layout="contiguous", N=8)
    outgoing, incoming = ring._Schedule(ctx, 4, 2, torch.device("cpu")).entries(1)
    assert outgoing.tolist() == incoming.tolist() == [0, 1, 2, 3, 4, 5]  # row·2 + query head // 2
    outgoing, _ = ring._Schedule(ctx, 4, 4, torch.device("cpu")).entries(1)
    assert outgoing.tolist() == [0, 1, 2, 3, 4, 6, 9, 11]


def test_transfer_entries_only_selected_keys():
    # Segments of 4 inside each rank's 8 rows travel nowhere; the rate-4 branch sends a quarter.
    args = ([4, 32], [1, 4], "grouped", False, "contiguous", 32, 4, 2)
    assert dattn._C.ring_transfer_entries(*args, 1, 0) == [h + 2 * row for row in range(1, 8, 4) for h in [1]]
    assert len(dattn._C.ring_transfer_entries(*args, 2, 2)) == 8 + 2  # own: every row of head 0, 2 of head 1
    assert dattn._C.ring_transfer_entries([4], [1], "grouped", False, "contiguous", 32, 4, 2, 0, 1) == []


def test_block_sparse_ring_skips_steps_no_query_block_needs():
    from dattn.ring import _BlockSparseSteps
    # 8 blocks of 4 rows over 4 ranks (2 blocks each); a window of one block each side: rank p's
    # queries need only ranks p - 1, p, p + 1, and causal ones only p - 1 and p.
    mask = dattn.block_sparse_mask(dattn.local_window_mask(8, 12, 4))
    pairs = _BlockSparseSteps(mask, 4, False, None, 0.0, 0)._needs("contiguous", 32, 4)
    assert pairs == {(s, d) for s in range(4) for d in range(4) if abs(s - d) <= 1}
    causal = _BlockSparseSteps(mask, 4, True, None, 0.0, 0)._needs("contiguous", 32, 4)
    assert causal == {(s, d) for s in range(4) for d in range(4) if 0 <= d - s <= 1}
    assert len(_BlockSparseSteps(mask, 4, True, None, 0.0, 0).entries("contiguous", 32, 4, 3, 3, 1)) == 0


def test_shard_unshard_round_trip_and_errors():
    x = torch.arange(24).view(1, 24)
    for layout in ("contiguous", "zigzag"):
        parts = [dattn.shard_sequence(x, r, 3, layout) for r in range(3)]
        assert torch.equal(dattn.unshard_sequence(parts, layout), x)
    assert dattn.shard_sequence(x, 1, 3, "zigzag").tolist() == [[4, 5, 6, 7, 16, 17, 18, 19]]
    with pytest.raises(ValueError, match="divisible"):
        dattn.shard_sequence(x, 0, 5)
    with pytest.raises(ValueError, match="layout"):
        dattn.shard_sequence(x, 0, 2, "striped")


class _ThreadRanks:
    """An in-process stand-in for the torch.distributed calls of dattn/ring.py (world size, rank,
    batched point-to-point sends and receives), one thread per rank, so that the ring runs on CPU
    or CUDA tensors in one process (CUDA: every rank on one GPU, which NCCL does not allow). A send
    leaves a copy in the receiver's mailbox at once; a receive waits for it. Each rank's group is a
    _ThreadRanks.Group; ring.py passes it back to every call. It also keeps the shape of every
    tensor sent, by (sender, tag)."""

    isend, irecv = "isend", "irecv"

    class Group:
        def __init__(self, ranks, rank):
            self.ranks, self.rank = ranks, rank

    class P2POp:
        def __init__(self, op, tensor, peer, group, tag):
            self.op, self.tensor, self.peer, self.group, self.tag = op, tensor, peer, group, tag

    class _Receive:
        def __init__(self, ranks, key, tensor):
            self.ranks, self.key, self.tensor = ranks, key, tensor

        def wait(self):
            with self.ranks.arrived:
                assert self.ranks.arrived.wait_for(lambda: self.ranks.queues[self.key], timeout=60), \
                    f"no message {self.key} within 60 s"
                message = self.ranks.queues[self.key].popleft()
            self.tensor.copy_(message)

    def __init__(self, P):
        self.P = P
        self.arrived = threading.Condition()
        self.queues = collections.defaultdict(collections.deque)  # (from, to, tag) -> tensors
        self.sent = collections.defaultdict(list)  # (from, tag) -> shapes

    def get_world_size(self, group=None):
        return self.P

    def get_rank(self, group=None):
        return group.rank

    def batch_isend_irecv(self, ops):
        requests = []
        for op in ops:
            if op.op == self.isend:
                with self.arrived:
                    self.queues[(op.group.rank, op.peer, op.tag)].append(op.tensor.clone())
                    self.sent[(op.group.rank, op.tag)].append(tuple(op.tensor.shape))
                    self.arrived.notify_all()
            else:
                requests.append(self._Receive(self, (op.peer, op.group.rank, op.tag), op.tensor))
        return requests

    def run(self, fn):
        """fn(group) on P threads; returns their results in rank order."""
        results, errors = [None] * self.P, [None] * self.P

        def rank_main(rank):
            try:
                results[rank] = fn(self.Group(self, rank))
            except BaseException as e:  # noqa: B902 (re-raised below)
                errors[rank] = e

        threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(self.P)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
            assert not t.is_alive(), "a rank did not finish"
        for e in errors:
            if e is not None:
                raise e
        return results


class _Context:  # what _RingFunction's forward saves for its backward
    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


# Grouped-query heads on the ring, CPU and CUDA tensors: H = 4 query heads over k, v with Hkv.
GQA_CASES = [
    dict(P=2, layout="zigzag", kv_heads=1, causal=True, padding=True, w=[6, 32], r=[1, 3], mode="grouped",
         dropout=0.0),
    dict(P=3, layout="contiguous", kv_heads=2, causal=False, padding=False, w=[48], r=[2], mode="longnet",
         dropout=0.25),
    dict(P=2, layout="contiguous", kv_heads=2, causal=True, padding=True, block=4, density=0.5, dropout=0.0),
    dict(P=4, layout="zigzag", kv_heads=1, causal=False, padding=False, block=2, density=1.0, dropout=0.0),
]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("case", range(len(GQA_CASES)))
def test_ring_moves_key_heads_under_grouped_query_heads(device, case, monkeypatch):
    """The ring's autograd function with Hkv < H over in-process ranks (threads): out, dq, dk, dv
    gathered equal single-process attention of the whole sequence, dk and dv keep Hkv heads, and
    no transfer holds more than a rank's n·Hkv key rows (k, v are never repeated to H heads)."""
    import dattn.ring as ring
    from dattn import _ops
    c = GQA_CASES[case]
    P, layout, Hkv = c["P"], c["layout"], c["kv_heads"]
    Bq, N, Hq, Dq = 2, 48, 4, 16
    n = N // P
    g = torch.Generator().manual_seed(100 + case)
    q, grad = (torch.randn(Bq, N, Hq, Dq, generator=g) for _ in range(2))
    k, v = (torch.randn(Bq, N, Hkv, Dq, generator=g) for _ in range(2))
    padding = torch.rand(Bq, N, generator=g) < 0.2 if c["padding"] else None
    torch.manual_seed(7)
    seed = _ops.draw_dropout_seed()
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    torch.manual_seed(7)  # the reference draws the same seed
    if "block" in c:
        nb = N // c["block"]
        dense = torch.rand(nb, nb, generator=g) < c["density"]
        kind = ring._BlockSparseSteps(ring.mask_on(dattn.block_sparse_mask(dense), torch.device(device)), c["block"],
                                      c["causal"], None, c["dropout"], seed)
        ref = dattn.block_sparse_attention(q64, k64, v64, dense, c["block"], is_causal=c["causal"],
                                           key_padding_mask=padding, dropout_p=c["dropout"])
    else:
        kind = ring._DilatedSteps(c["w"], c["r"], c["mode"], c["causal"], None, c["dropout"], seed)
        ref = dattn.dilated_attention(q64, k64, v64, c["w"], c["r"], is_causal=c["causal"], mode=c["mode"],
                                      key_padding_mask=padding, dropout_p=c["dropout"])
    ref.backward(grad.double())

    ranks = _ThreadRanks(P)
    monkeypatch.setattr(ring, "dist", ranks)

    def rank_main(group):
        def local(t):
            return None if t is None else dattn.shard_sequence(t, group.rank, P, layout).to(device)

        ctx = _Context()
        out = ring._RingFunction.forward(ctx, local(q), local(k), local(v), local(padding), group, layout, kind)
        dq, dk, dv = ring._RingFunction.backward(ctx, local(grad))[:3]
        return [t.cpu() for t in (out, dq, dk, dv)]

    results = ranks.run(rank_main)
    for j, (name, r64) in enumerate((("out", ref), ("dq", q64.grad), ("dk", k64.grad), ("dv", v64.grad))):
        got = dattn.unshard_sequence([r[j] for r in results], layout)
        assert got.shape == r64.shape, f"{name}: shape {tuple(got.shape)}; expected {tuple(r64.shape)}"
        assert_close_bar(got, r64, torch.float32, f"{device} case {case} {name}")
    key_transfers = [shape for (_, tag), shapes in ranks.sent.items() if tag in (1, 2) for shape in shapes
                     if len(shape) == 4]  # k, v [2, B, entries, D] and dk, dv back
    assert key_transfers, "nothing travelled"
    assert all(shape[2] <= n * Hkv for shape in key_transfers), key_transfers

