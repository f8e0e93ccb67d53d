#!/usr/bin/env python3
"""Decoding with a cache on the GPU (docs/benchmarks.md "Decoding with a cache"): dattn's
dilated_attention_with_kvcache against its peers, all from Python in one process.

Protocol: Tn = 1, H = Hkv = 12, D = 64, bf16, `long256k`'s branches (segments 2048 .. 16384,
rates 1 .. 8), both modes. A step appends one token's k, v to every sequence's cache and attends
its query over the cache. Step time = mean of 64 consecutive steps starting at cache_seqlens =
c - 16384 + phi, for c in {16384, 65536, 262144} (the cache's rows) and phi in {0, 4096, 8192,
12288, 16320} (early, middle and late in the largest segment).
- B = 1: the 64 steps queued back to back (host work included), one CUDA-event pair around them.
- B = 64: L2 flushed before each step (--flush: by writing or by reading 256 MB), each step timed
  alone, the mean of the 64.
Each implementation's 64 steps run once untimed right before they are timed (dattn's too, for
fairness; the repeated steps write the same rows into the caches): cuDNN builds an SDPA plan for
every new key length, and timing the first pass counted those builds (30-46 ms a step for dense
decoding in the first mode's rows, 0.07 ms for the same calls in the second mode's).
Rows per implementation: dattn (validate=False, so no per-call synchronisation), per-group SDPA
over the selected keys (gather each branch's selected rows, SDPA, merge), dense decoding (SDPA of
the query row over the whole cache: a different function, for scale). Also measured: an empty
dattn call (one cached token, one segment of length 1) and the device-to-device copy rate (a
1 GiB copy, bytes read + written per second, as CUDA's bandwidthTest counts it). Bytes of a step
= the distinct K and V rows its queries select x 2 x D x 2 bytes.
Before timing, dattn's output of the first step is checked against the per-group composition.

Usage: decode_gpu.py [--batches 1,64] [--cache-lengths 16384,65536,262144] [--modes grouped,longnet]
                     [--json FILE] [--markdown FILE] [--profile B,c,mode,phi]
                     [--flush zero|read]
--profile: instead of the table, dattn's steps of that one configuration (each after an L2 flush, as
timed) under torch.profiler: the GPU time of each kernel a step launches, to see where a step's
time goes (e.g. how much of a B = 64 step is the fixed cost of its launches).
"""
import argparse
import datetime
import json
import math
import sys

import torch
import torch.nn.functional as F

H, D, DTYPE = 12, 64, torch.bfloat16
W, R = [2048, 4096, 8192, 16384], [1, 2, 4, 8]
PHIS = [0, 4096, 8192, 12288, 16320]
STEPS = 64


def branches_of_head(h, mode):
    """(branch index, offset) pairs whose keys head h attends (SPEC.md: grouped, one branch per
    head group with offset i % r; longnet, every branch with offset h % r)."""
    G = len(W)
    if mode == "longnet":
        return [(i, h % R[i]) for i in range(G)]
    sizes = [H // G + (1 if i < H % G else 0) for i in range(G)]
    i = next(g for g in range(G) if sum(sizes[:g]) <= h < sum(sizes[:g + 1]))
    return [(i, i % R[i])]


def selected_positions(t, i, offset):
    """Positions branch i (at `offset`) lets the token at position t attend: its segment's positions
    up to t with the same offset, or none when t itself is not selected."""
    w, r = W[i], R[i]
    start = t // w * w
    if (t - start) % r != offset:
        return None
    return torch.arange(start + offset, t + 1, r)


def step_bytes(t, mode):
    """Distinct K and V rows one sequence's token at position t reads, in bytes."""
    rows = 0
    for h in range(H):
        union = set()
        for i, offset in branches_of_head(h, mode):
            pos = selected_positions(t, i, offset)
            if pos is not None:
                union.update(pos.tolist())
        rows += len(union)
    return rows * 2 * D * 2


def per_group(q, k_cache, v_cache, t, mode):
    """The composition of library calls: for each branch, gather its selected rows, attend (SDPA in
    grouped mode; matmul, logsumexp and softmax in longnet mode, whose merge needs the lse), merge.
    q [B, 1, H, D], caches [B, Nmax, H, D]; returns [B, 1, H, D]."""
    out = torch.zeros_like(q)
    G = len(W)
    scale = 1.0 / math.sqrt(D)
    if mode == "grouped":
        sizes = [H // G + (1 if i < H % G else 0) for i in range(G)]
        for i in range(G):
            h0, h1 = sum(sizes[:i]), sum(sizes[:i + 1])
            pos = selected_positions(t, i, i % R[i])
            if pos is None or h1 == h0:
                continue
            pos = pos.to(q.device)
            k = k_cache[:, pos, h0:h1].transpose(1, 2)
            v = v_cache[:, pos, h0:h1].transpose(1, 2)
            o = F.scaled_dot_product_attention(q[:, :, h0:h1].transpose(1, 2), k, v)
            out[:, :, h0:h1] = o.transpose(1, 2) / G
        return out
    for h in range(H):
        parts = []
        for i, offset in branches_of_head(h, mode):
            pos = selected_positions(t, i, offset)
            if pos is None:
                continue
            pos = pos.to(q.device)
            k, v = k_cache[:, pos, h].float(), v_cache[:, pos, h].float()  # [B, n, D]
            s = torch.einsum("bd,bnd->bn", q[:, 0, h].float(), k) * scale
            lse = torch.logsumexp(s, dim=1)
            parts.append((lse, torch.einsum("bn,bnd->bd", torch.softmax(s, dim=1), v)))
        if parts:
            lse = torch.logsumexp(torch.stack([p[0] for p in parts]), dim=0)
            out[:, 0, h] = sum(torch.exp(p[0] - lse)[:, None] * p[1] for p in parts).to(q.dtype)
    return out


def dense(q, k_cache, v_cache, t):
    """Full causal decoding: the query row over the cache's first t + 1 rows."""
    k, v = k_cache[:, :t + 1].transpose(1, 2), v_cache[:, :t + 1].transpose(1, 2)
    return F.scaled_dot_product_attention(q.transpose(1, 2), k, v).transpose(1, 2)


def copy_rate(dev):
    """Device-to-device copy rate, bytes read + written per second (as bandwidthTest counts it)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    stop.record()
    stop.synchronize()
    return 2.0 * 10 * a.numel() / (start.elapsed_time(stop) / 1e3)


class Steps:
    """B sequences with caches of c rows; 64 steps from cache_seqlens = start, each appending one
    token's k, v (fresh random rows) and attending its query."""

    def __init__(self, B, c, dev):
        self.B, self.c, self.dev = B, c, dev
        self.k_cache = torch.empty(B, c, H, D, dtype=DTYPE, device=dev).normal_()
        self.v_cache = torch.empty_like(self.k_cache).normal_()
        self.q = torch.empty(STEPS, B, 1, H, D, dtype=DTYPE, device=dev).normal_()
        self.k_new = torch.empty(STEPS, B, 1, H, D, dtype=DTYPE, device=dev).normal_()
        self.v_new = torch.empty_like(self.k_new).normal_()

    def seqlens(self, start):
        return [torch.full((self.B,), start + s, dtype=torch.int32, device=self.dev) for s in range(STEPS)]

    def dattn_step(self, s, seqlens, mode):
        import dattn
        return dattn.dilated_attention_with_kvcache(self.q[s], self.k_cache, self.v_cache, seqlens[s], W, R,
                                                    k_new=self.k_new[s], v_new=self.v_new[s], mode=mode,
                                                    validate=False)

    def append(self, s, t):
        self.k_cache[:, t] = self.k_new[s, :, 0]
        self.v_cache[:, t] = self.v_new[s, :, 0]

    def per_group_step(self, s, start, mode):
        t = start + s
        self.append(s, t)
        return per_group(self.q[s], self.k_cache, self.v_cache, t, mode)

    def dense_step(self, s, start, mode):
        t = start + s
        self.append(s, t)
        return dense(self.q[s], self.k_cache, self.v_cache, t)


def warm_up(run):
    """The 64 steps once, untimed (plans, caches and lazy initialisation out of the timing)."""
    for s in range(STEPS):
        run(s)
    torch.cuda.synchronize()


class L2Flush:
    """Evicts the step's data from L2 (50 MB) with a 256 MB pass: "zero" writes the buffer (as
    Triton's do_bench does; it leaves up to 50 MB of dirty lines, whose write-back to DRAM then runs
    during the timed step), "read" reads it (leaves clean lines: nothing of the flush's own spills
    into the step)."""

    def __init__(self, dev, how):
        self.how = how
        self.buffer = torch.zeros(64 << 20, dtype=torch.int32, device=dev)

    def __call__(self):
        if self.how == "zero":
            self.buffer.zero_()
        else:
            self.buffer.amax()  # a reduction: reads every line, writes one value


def time_steps(run, flush, B):
    """Mean ms per step over STEPS steps: B = 1 back to back; else each alone after an L2 flush."""
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if B == 1:
        start.record()
        for s in range(STEPS):
            run(s)
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / STEPS
    total = 0.0
    for s in range(STEPS):
        flush()
        start.record()
        run(s)
        stop.record()
        stop.synchronize()
        total += start.elapsed_time(stop)
    return total / STEPS


def empty_call_ms(dev):
    """An empty dattn call: one sequence of one cached token, one segment of length 1."""
    import dattn
    q = torch.randn(1, 1, H, D, dtype=DTYPE, device=dev)
    cache = torch.randn(1, 2, H, D, dtype=DTYPE, device=dev)
    lengths = torch.ones(1, dtype=torch.int32, device=dev)
    call = lambda s: dattn.dilated_attention_with_kvcache(q, cache, cache, lengths, [1], [1], validate=False)  # noqa: E731
    for s in range(10):
        call(s)
    return time_steps(call, None, 1)


def first_step(c, phi):
    """cache_seqlens of the first of the 64 steps: c - 16384 + phi, or as late as the cache's rows
    allow (phi = 16320 at c = 16384 ends at the cache's last row)."""
    return min(c - 16384 + phi, c - STEPS)


def profile_steps(spec, dev, how):
    """--profile B,c,mode,phi: dattn's 64 steps of that configuration under torch.profiler."""
    B, c, mode, phi = spec.split(",")
    B, c, phi = int(B), int(c), int(phi)
    flush = L2Flush(dev, how)
    steps = Steps(B, c, dev)
    start = first_step(c, phi)
    seqlens = steps.seqlens(start)
    run = lambda s: steps.dattn_step(s, seqlens, mode)  # noqa: E731
    warm_up(run)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for s in range(STEPS):
            flush()
            run(s)
        torch.cuda.synchronize()
    print(f"dattn decode steps, B={B} c={c} {mode} phi={phi} (cache_seqlens from {start}), {STEPS} steps, "
          f"each after an L2 flush ({how}); GPU time per kernel:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
    print(f"mean step by CUDA events, same configuration: {time_steps(run, flush, B) * 1e3:.1f} us")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--cache-lengths", default="16384,65536,262144")
    ap.add_argument("--modes", default="grouped,longnet")
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    ap.add_argument("--profile", help="B,c,mode,phi: the kernels of dattn's steps there, no table")
    ap.add_argument("--flush", choices=["zero", "read"], default="zero", help="how L2 is flushed before a B > 1 step")
    args = ap.parse_args()
    dev = torch.device("cuda")
    if args.profile:
        return profile_steps(args.profile, dev, args.flush)
    rate = copy_rate(dev)
    empty = empty_call_ms(dev)
    flush = L2Flush(dev, args.flush)
    rows = []
    print(f"copy rate {rate / 1e12:.2f} TB/s (read + write); empty dattn call {empty * 1e3:.1f} us", file=sys.stderr)
    for B in [int(x) for x in args.batches.split(",")]:
        for c in [int(x) for x in args.cache_lengths.split(",")]:
            steps = Steps(B, c, dev)
            for mode in args.modes.split(","):
                for phi in PHIS:
                    start = first_step(c, phi)
                    seqlens = steps.seqlens(start)
                    # Correctness first: dattn's first step (which appends its token) against the
                    # per-group composition over the caches it left.
                    out = steps.dattn_step(0, seqlens, mode)
                    ref = per_group(steps.q[0], steps.k_cache, steps.v_cache, start, mode)
                    err = ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
                    row = dict(B=B, c=c, mode=mode, phi=phi, start=start, error_vs_per_group=err,
                               correct=err <= 3e-2, bytes=B * sum(step_bytes(start + s, mode) for s in range(STEPS)) / STEPS)
                    runs = {"dattn": lambda s: steps.dattn_step(s, seqlens, mode),
                            "per_group": lambda s: steps.per_group_step(s, start, mode),
                            "dense": lambda s: steps.dense_step(s, start, mode)}
                    for name, run in runs.items():
                        warm_up(run)
                        row[f"{name}_ms"] = time_steps(run, flush, B)
                    row["dattn_bytes_per_s"] = row["bytes"] / (row["dattn_ms"] / 1e3)
                    row["share_of_copy_rate"] = row["dattn_bytes_per_s"] / rate
                    row["b1_bound_ms"] = 2 * empty + row["bytes"] / rate * 1e3
                    rows.append(row)
                    print(f"B={B} c={c} {mode} phi={phi}: dattn {row['dattn_ms']:.3f} ms, per-group "
                          f"{row['per_group_ms']:.3f}, dense {row['dense_ms']:.3f}; {row['share_of_copy_rate']:.0%} "
                          f"of the copy rate; error {err:.1e}", file=sys.stderr, flush=True)
            steps = None  # the caches' memory back before the next c
            torch.cuda.empty_cache()
    # Flatness: per (B, mode, phi), the largest over the smallest step time across c.
    flat = {}
    for r in rows:
        flat.setdefault((r["B"], r["mode"], r["phi"]), []).append(r["dattn_ms"])
    lines = [f"GPU: {torch.cuda.get_device_name()}; PyTorch {torch.__version__}; "
             f"{datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC",
             f"copy rate {rate / 1e12:.2f} TB/s (read + write); empty dattn call {empty * 1e3:.1f} us; "
             f"L2 flush before a B > 1 step: {args.flush}", "",
             "| B | c | mode | phi | dattn ms | per-group SDPA ms | dense ms | GB/s (share of copy rate) | "
             "B = 1 bound ms | error vs per-group |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['B']} | {r['c']} | {r['mode']} | {r['phi']} | {r['dattn_ms']:.4f} | {r['per_group_ms']:.4f} | "
                     f"{r['dense_ms']:.4f} | {r['dattn_bytes_per_s'] / 1e9:.0f} ({r['share_of_copy_rate']:.0%}) | "
                     f"{r['b1_bound_ms']:.4f} | {r['error_vs_per_group']:.1e}{'' if r['correct'] else ' WRONG'} |")
    lines += ["", "Flatness (max / min dattn step time over c): " +
              ", ".join(f"B={b} {m} phi={p}: {max(v) / min(v):.2f}" for (b, m, p), v in flat.items() if len(v) > 1)]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        open(args.markdown, "w").write(text + "\n")
    if args.json:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, copy_rate=rate, l2_flush=args.flush,
                       empty_call_ms=empty, rows=rows), open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
