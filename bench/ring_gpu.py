"""Ring attention on GPUs over NCCL (dattn.RingDilatedAttention), one process per GPU, started by
torchrun. Rank 0 prints the results as markdown and writes --json.

  torchrun --nproc-per-node P bench/ring_gpu.py check   correctness: on random configurations
      (both modes, causal with both layouts, key padding, segments shorter and longer than N/P,
      grouped-query heads: k, v with Hkv heads, a divisor of H, which travel as they are),
      the gathered ring output and gradients against the single-GPU dattn result at docs/semantics.md's bars;
      then block-sparse masks (random density, shared or per head, and the named patterns through
      BlockSparseRingDilatedAttention) on the same ring against single-GPU block_sparse_attention
  torchrun --nproc-per-node P bench/ring_gpu.py scale   docs/benchmarks.md's geo(N), bf16, grouped mode: for
      every P' in 1, 2, 4, .. P (sub-groups of the first P' GPUs), per-GPU length fixed
      (--rows-per-gpu, 262144) and N fixed (--fixed-length, 1048576; P' >= 2), contiguous and
      zigzag, causal and not: per-GPU forward and forward+backward time (median [min-max] of CUDA
      event timings), TFLOP/s per GPU, peak memory per GPU above the inputs, bytes each GPU sends,
      and an all-gather of k, v with one attention call over the gathered keys beside it.

NCCL_NVLS_ENABLE=0 (and the other multicast switches of scripts/multigpu-check) must stay set."""

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

import dattn
from dattn import _C, _ops

OUT_BAR = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2}  # docs/semantics.md, relative L2


def geo(N):
    w = []
    x = 2048
    while x < N:
        w.append(x)
        x *= 4
    w.append(N)
    return w, [s // 2048 for s in w]


def log(*args):
    if dist.get_rank() == 0:
        print(*args, flush=True)


def gather(local, layout, group=None):
    local = local.float().contiguous()  # gloo gathers no bf16
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    return dattn.unshard_sequence(parts, layout)


def rel_err(x, ref):
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("inf")
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def kv_heads(H, gen):
    """Key/value heads of a case: H (half the cases) or a smaller divisor of H (grouped-query heads)."""
    smaller = [d for d in range(1, H) if H % d == 0]
    if not smaller or float(torch.rand(1, generator=gen)) < 0.5:
        return H
    return smaller[int(torch.randint(0, len(smaller), (1,), generator=gen))]


def device_name(device):
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def check(args):
    P, rank = dist.get_world_size(), dist.get_rank()
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    failures = 0
    for i in range(args.cases):
        layout = ["contiguous", "zigzag"][i % 2]
        causal = i % 4 >= 2
        mode = ["grouped", "longnet"][(i // 4) % 2]
        dtype = [torch.bfloat16, torch.float32][(i // 8) % 2]
        unit = 2 * P if layout == "zigzag" else P
        N = unit * int(torch.randint(1, 4096 // unit + 1, (1,), generator=gen))
        B, H, D = int(torch.randint(1, 3, (1,), generator=gen)), int(torch.randint(2, 9, (1,), generator=gen)), 64
        G = int(torch.randint(1, 4, (1,), generator=gen))
        # log-uniform in [1, 2N]: segments shorter than, equal to and longer than N/P
        w = sorted(max(1, int((2.0 * N) ** float(torch.rand(1, generator=gen)))) for _ in range(G))
        r = [int(torch.randint(1, min(x, 8) + 1, (1,), generator=gen)) for x in w]
        padding = torch.rand(B, N, generator=gen) < 0.1 if i % 3 == 0 else None
        Hkv = kv_heads(H, gen)
        q, k, v, grad = (torch.randn(B, N, h, D, generator=gen).to(args.device, dtype) for h in (H, Hkv, Hkv, H))
        # the single-GPU result (every rank computes it; rank 0 compares)
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        pad_cuda = None if padding is None else padding.to(args.device)
        ref = dattn.dilated_attention(*full, w, r, is_causal=causal, mode=mode, key_padding_mask=pad_cuda)
        ref.backward(grad)
        # the ring
        local = [dattn.shard_sequence(t, rank, P, layout).detach().requires_grad_() for t in (q, k, v)]
        local_pad = None if pad_cuda is None else dattn.shard_sequence(pad_cuda, rank, P, layout)
        module = dattn.RingDilatedAttention(w, r, group=dist.group.WORLD, layout=layout, mode=mode)
        out = module(*local, is_causal=causal, key_padding_mask=local_pad)
        out.backward(dattn.shard_sequence(grad, rank, P, layout))
        got = [gather(out.detach(), layout)] + [gather(t.grad, layout) for t in local]
        errors = [rel_err(a, b) for a, b in zip(got, [ref.detach()] + [t.grad for t in full])]
        ok = all(e <= OUT_BAR[dtype] for e in errors)
        failures += not ok
        rows.append(dict(case=i, P=P, N=N, B=B, H=H, Hkv=Hkv, w=w, r=r, mode=mode, causal=causal, layout=layout,
                         dtype=str(dtype).replace("torch.", ""), padding=padding is not None,
                         errors=dict(zip(["out", "dq", "dk", "dv"], errors)), ok=ok))
        log(f"{'ok' if ok else 'FAIL'} case {i}: P={P} N={N} B={B} H={H} Hkv={Hkv} w={w} r={r} {mode} causal={causal} "
            f"{layout} {rows[-1]['dtype']} padding={padding is not None}: rel. L2 vs single GPU out {errors[0]:.2e} "
            f"dq {errors[1]:.2e} dk {errors[2]:.2e} dv {errors[3]:.2e}")
    for i in range(args.sparse_cases):
        ok, row = check_sparse(i, gen, args)
        failures += not ok
        rows.append(row)
    total = args.cases + args.sparse_cases
    log(f"\n{total - failures} passed, {failures} failed (P = {P}, {device_name(args.device)})")
    return rows, failures


def check_sparse(i, gen, args):
    """One block-sparse case on the ring: a random mask (even i) or a named pattern through the module."""
    P, rank = dist.get_world_size(), dist.get_rank()
    layout = ["contiguous", "zigzag"][i % 2]
    causal = i % 4 >= 2
    dtype = [torch.bfloat16, torch.float32][(i // 4) % 2]
    unit = 2 * P if layout == "zigzag" else P
    block = [16, 32, 64, 128][int(torch.randint(0, 4, (1,), generator=gen))]
    N = unit * block * int(torch.randint(1, max(2, 4096 // (unit * block)) + 1, (1,), generator=gen))
    B, H, D = int(torch.randint(1, 3, (1,), generator=gen)), int(torch.randint(2, 9, (1,), generator=gen)), 64
    nb = N // block
    padding = torch.rand(B, N, generator=gen) < 0.1 if i % 3 == 0 else None
    Hkv = kv_heads(H, gen)
    q, k, v, grad = (torch.randn(B, N, h, D, generator=gen).to(args.device, dtype) for h in (H, Hkv, Hkv, H))
    pad_dev = None if padding is None else padding.to(args.device)
    local = [dattn.shard_sequence(t, rank, P, layout).detach().requires_grad_() for t in (q, k, v)]
    local_pad = None if pad_dev is None else dattn.shard_sequence(pad_dev, rank, P, layout)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    if i % 2 == 0:
        density = [0.05, 0.2, 0.5, 1.0][(i // 2) % 4]
        shape = (H, nb, nb) if i % 4 == 0 else (nb, nb)
        dense = torch.rand(shape, generator=gen) < density
        what = f"random mask density={density} heads={dense.size(0) if dense.dim() == 3 else 1}"
        ref = dattn.block_sparse_attention(*full, dense, block, is_causal=causal, key_padding_mask=pad_dev)
        from dattn.ring import ring_block_sparse_attention
        mask = dattn.block_sparse_mask(dense)
        out = ring_block_sparse_attention(*local, mask, block, dist.group.WORLD, layout, causal,
                                          key_padding_mask=local_pad)
    else:
        pattern = ["local_window", "dilated_sparse", "global_local"][(i // 2) % 3]
        what = f"pattern {pattern}"
        config = dattn.SparsePatternConfig(pattern, block_size=block, window_size=4 * block)
        ref = dattn.BlockSparseRingDilatedAttention([N], [1], config)(*full, is_causal=causal, key_padding_mask=pad_dev)
        module = dattn.BlockSparseRingDilatedAttention([N], [1], config, group=dist.group.WORLD, layout=layout)
        out = module(*local, is_causal=causal, key_padding_mask=local_pad)
    ref.backward(grad)
    out.backward(dattn.shard_sequence(grad, rank, P, layout))
    got = [gather(out.detach(), layout)] + [gather(t.grad, layout) for t in local]
    errors = [rel_err(a, b) for a, b in zip(got, [ref.detach()] + [t.grad for t in full])]
    ok = all(e <= OUT_BAR[dtype] for e in errors)
    row = dict(case=f"sparse {i}", P=P, N=N, B=B, H=H, Hkv=Hkv, block=block, mask=what, causal=causal, layout=layout,
               dtype=str(dtype).replace("torch.", ""), padding=padding is not None,
               errors=dict(zip(["out", "dq", "dk", "dv"], errors)), ok=ok)
    log(f"{'ok' if ok else 'FAIL'} block-sparse case {i}: P={P} N={N} B={B} H={H} Hkv={Hkv} block={block} {what} "
        f"causal={causal} {layout} {row['dtype']} padding={padding is not None}: rel. L2 vs single GPU out "
        f"{errors[0]:.2e} dq {errors[1]:.2e} dk {errors[2]:.2e} dv {errors[3]:.2e}")
    return ok, row


def timed(fn, warmup, repeats, group, device):
    times = []
    for i in range(warmup + repeats):
        dist.barrier(group=group)
        if device == "cpu":  # the dry run
            t0 = time.perf_counter()
            fn()
            elapsed = 1e3 * (time.perf_counter() - t0)
        else:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end)
        if i >= warmup:
            times.append(elapsed)
    return dict(median=statistics.median(times), min=min(times), max=max(times))


def scale_run(P, N, layout, causal, args, group):
    """One configuration on the first P GPUs (the others wait). Returns rank 0's row."""
    rank = dist.get_rank()
    row = None
    if rank < P:
        w, r = geo(N)
        n, H, D = N // P, 12, 64
        torch.manual_seed(1000 + rank)
        dev = args.device
        dtype = torch.bfloat16 if dev == "cuda" else torch.float32  # torch 1.13's gloo gathers no bf16
        q, k, v, grad = (torch.randn(1, n, H, D, device=dev, dtype=dtype) for _ in range(4))
        q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
        module = dattn.RingDilatedAttention(w, r, group=group, layout=layout)
        flops = _C.forward_flops(w, r, "grouped", causal, 1, N, H, D) / P
        cuda = dev == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else 0
        fwd = timed(lambda: module(q, k, v, is_causal=causal), args.warmup, args.repeats, group, args.device)

        def step():
            module(q, k, v, is_causal=causal).backward(grad)
        both = timed(step, args.warmup, args.repeats, group, args.device)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else 0.0
        sent = _ring_bytes(w, r, causal, layout, N, P, H, D, rank)

        # baseline: all-gather k and v, then one attention call of the local queries over all keys
        def allgather():
            parts = [torch.empty_like(k) for _ in range(P)], [torch.empty_like(v) for _ in range(P)]
            dist.all_gather(parts[0], k.detach(), group=group)
            dist.all_gather(parts[1], v.detach(), group=group)
            keys, values = (torch.cat(x, dim=1) for x in parts)
            merged = torch.zeros(1, n, H, D, device=dev)
            lse = torch.full((1, H, n), float("-inf"), device=dev)
            _C.ring_forward_step((rank * n, N, 0, N), _ops._view(q.detach()), _ops._view(keys), _ops._view(values),
                                 _ops._view(merged), _ops._view(lse), w, r, "grouped", causal, None, None, 0.0, 0,
                                 _ops._stream(q))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        gathered = timed(allgather, args.warmup, args.repeats, group, args.device) if layout == "contiguous" else None
        gathered_peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if gathered and cuda else None
        row = dict(P=P, N=N, rows_per_gpu=n, layout=layout, causal=causal, segments=w, rates=r,
                   fwd_ms=fwd, fwd_bwd_ms=both, fwd_tflops=flops / fwd["median"] / 1e9,
                   fwd_bwd_tflops=3.5 * flops / both["median"] / 1e9, peak_mib=peak, bytes_sent_fwd=sent,
                   allgather_fwd_ms=gathered, allgather_peak_mib=gathered_peak)
        del q, k, v, grad
        if cuda:
            torch.cuda.empty_cache()
    dist.barrier()
    return row


def _ring_bytes(w, r, causal, layout, N, P, H, D, rank):
    """Bytes this rank sends in one forward: the selected k, v entries (bf16) and the padding row mask."""
    total = 0
    for t in range(1, P):
        entries = len(_C.ring_transfer_entries(w, r, "grouped", causal, layout, N, P, H, rank, (rank + t) % P))
        total += (2 * entries * D * 2 + N // P) if entries else 0
    return total


def scale(args):
    W = dist.get_world_size()
    rows = []
    counts = [p for p in (1, 2, 4, 8) if p <= W]
    groups = {p: dist.new_group(list(range(p))) for p in counts}
    plans = [(p, p * args.rows_per_gpu) for p in counts] + [(p, args.fixed_length) for p in counts if p >= 2]
    for P, N in plans:
        for layout in ("contiguous", "zigzag"):
            for causal in (False, True):
                row = scale_run(P, N, layout, causal, args, groups[P])
                if row:
                    rows.append(row)
                    log(f"P={P} N={N} {layout} causal={causal}: fwd {row['fwd_ms']['median']:.2f} ms "
                        f"({row['fwd_tflops']:.0f} TFLOP/s/GPU), fwd+bwd {row['fwd_bwd_ms']['median']:.2f} ms "
                        f"({row['fwd_bwd_tflops']:.0f}), peak {row['peak_mib']:.0f} MiB, sent {row['bytes_sent_fwd'] / 2**20:.1f} MiB")
    if dist.get_rank() == 0:
        print_scale(rows, args)
    return rows


def print_scale(rows, args):
    def ms(t):
        return f"{t['median']:.2f} [{t['min']:.2f}–{t['max']:.2f}]"

    base = {(r["layout"], r["causal"]): r for r in rows if r["P"] == 1}
    print(f"\n## Ring attention over NCCL, geo(N), bf16, grouped, B=1 H=12 D=64 ({device_name(args.device)})\n")
    print("| P | N | N/P | layout | causal | fwd ms | fwd TFLOP/s/GPU | fwd+bwd ms | fwd+bwd TFLOP/s/GPU | "
          "vs P=1 (fwd / fwd+bwd) | peak MiB/GPU | sent MiB/GPU (fwd) | all-gather fwd ms | all-gather peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = base.get((r["layout"], r["causal"]))
        same = b is not None and b["rows_per_gpu"] == r["rows_per_gpu"]
        ratio = f"{r['fwd_tflops'] / b['fwd_tflops']:.2f} / {r['fwd_bwd_tflops'] / b['fwd_bwd_tflops']:.2f}" if same else "–"
        ag = ms(r["allgather_fwd_ms"]) if r["allgather_fwd_ms"] else "–"
        agp = f"{r['allgather_peak_mib']:.0f}" if r["allgather_peak_mib"] else "–"
        print(f"| {r['P']} | {r['N']} | {r['rows_per_gpu']} | {r['layout']} | {r['causal']} | {ms(r['fwd_ms'])} | "
              f"{r['fwd_tflops']:.0f} | {ms(r['fwd_bwd_ms'])} | {r['fwd_bwd_tflops']:.0f} | {ratio} | {r['peak_mib']:.0f} | "
              f"{r['bytes_sent_fwd'] / 2**20:.1f} | {ag} | {agp} |")
    print(f"\nmedian [min–max] of {args.repeats} CUDA-event timings after {args.warmup} warm-up, each GPU timed, rank 0's shown; "
          "TFLOP/s per GPU = forward FLOPs of geo(N) / P / time (fwd+bwd counts 3.5×); peak = allocator peak above the "
          "inputs; the all-gather baseline gathers k, v (contiguous layout) and runs one attention call, forward only.")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["check", "scale"])
    ap.add_argument("--cases", type=int, default=16)
    ap.add_argument("--sparse-cases", type=int, default=12)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--rows-per-gpu", type=int, default=262144)
    ap.add_argument("--fixed-length", type=int, default=1048576)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: over gloo, a dry run of this script on a machine without GPUs (small --rows-per-gpu)")
    args = ap.parse_args()
    if args.device == "cpu":
        dist.init_process_group("gloo")
    else:
        if os.environ.get("NCCL_NVLS_ENABLE") != "0":
            sys.exit("NCCL_NVLS_ENABLE=0 must be set (NVLink multicast stays off on shared machines)")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    if args.what == "check":
        rows, failures = check(args)
    else:
        rows, failures = scale(args), 0
    if args.json and dist.get_rank() == 0:
        with open(args.json, "w") as f:
            json.dump(dict(device=device_name(args.device), world=dist.get_world_size(), rows=rows), f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
