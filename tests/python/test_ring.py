"""RingDilatedAttention over a 2-process gloo group: the gathered output and gradients equal
single-process dilated attention; shard/unshard round trips."""

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dattn
from helpers import assert_close_bar


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASES = [
    dict(layout="contiguous", causal=False, mode="grouped", w=[8, 16], r=[1, 2], padding=False),
    dict(layout="zigzag", causal=True, mode="grouped", w=[6, 24], r=[1, 3], padding=True),
    dict(layout="zigzag", causal=True, mode="longnet", w=[5, 32], r=[1, 2], padding=False),
    dict(layout="contiguous", causal=True, mode="longnet", w=[12], r=[2], padding=True),
]


def _worker(rank, world, port, folder):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    for i, case in enumerate(CASES):
        g = torch.Generator().manual_seed(i)
        B, N, H, D = 2, 32, 3, 8
        q, k, v, grad = (torch.randn(B, N, H, D, generator=g) for _ in range(4))
        padding = torch.rand(B, N, generator=g) < 0.2 if case["padding"] else None
        module = dattn.RingDilatedAttention(case["w"], case["r"], layout=case["layout"], mode=case["mode"])
        local = [dattn.shard_sequence(t, rank, world, case["layout"]).requires_grad_() for t in (q, k, v)]
        local_padding = None if padding is None else dattn.shard_sequence(padding, rank, world, case["layout"])
        out = module(*local, is_causal=case["causal"], key_padding_mask=local_padding)
        out.backward(dattn.shard_sequence(grad, rank, world, case["layout"]))
        torch.save({"out": out.detach(), "grads": [t.grad for t in local]}, os.path.join(folder, f"{i}-{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_process_gloo_ring_equals_single_process():
    world = 2
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(world, _free_port(), folder), nprocs=world, join=True)
        for i, case in enumerate(CASES):
            g = torch.Generator().manual_seed(i)
            B, N, H, D = 2, 32, 3, 8
            q, k, v, grad = (torch.randn(B, N, H, D, generator=g) for _ in range(4))
            padding = torch.rand(B, N, generator=g) < 0.2 if case["padding"] else None
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
