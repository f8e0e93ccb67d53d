#!/usr/bin/env python3
"""Packed variable-length batches (dattn.dilated_attention_varlen) against an equal-length batch of
the same total tokens, same run, from Python: `long256k`'s branches (segments 2048 .. 16384,
rates 1 .. 8), H = 12, D = 64, bf16, not causal.

- varlen: sequence lengths drawn with random.Random(seed) uniformly in [1, N] until they reach T
  tokens (the last one cut to land on T exactly), one packed call;
- equal: B = T / N sequences of N tokens, dattn.dilated_attention.
TFLOP/s by docs/benchmarks.md's count (each sequence's own segments, a partial last segment
counting its own length); forward and forward+backward (out.sum().backward(), the forward
included), CUDA-event medians with min and max. Before timing, the packed call's output is checked
against running each sequence alone.

Usage: varlen_gpu.py [--tokens 262144] [--n 65536] [--seed 0] [--repeats 10] [--json FILE]
                     [--device cuda]   (--device cpu with small --tokens/--n: a smoke run)
"""
import argparse
import itertools
import json
import random
import sys
import time

import torch

import dattn

W, R, H, D = [2048, 4096, 8192, 16384], [1, 2, 4, 8], 12, 64


def forward_flops(lengths):
    """docs/benchmarks.md's count, each sequence over its own segments (dattn.forward_flops)."""
    return sum(dattn.forward_flops(W, R, 1, n, H, D) for n in lengths)


def draw_lengths(tokens, n, seed):
    rng, lengths = random.Random(seed), []
    while sum(lengths) < tokens:
        lengths.append(min(rng.randint(1, n), tokens - sum(lengths)))
    return lengths


def timed(fn, warmup, repeats, device):
    """Median, min, max milliseconds of fn()."""
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            ms = start.elapsed_time(stop)
        else:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(ms)
    times.sort()
    return dict(ms=times[len(times) // 2], min=times[0], max=times[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=262144)
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16
    lengths = draw_lengths(args.tokens, args.n, args.seed)
    T = args.tokens
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(T, H, D, device=device, dtype=dtype).requires_grad_() for _ in range(3))
    max_seqlen = max(lengths)

    def varlen():
        return dattn.dilated_attention_varlen(q, k, v, cu, max_seqlen, W, R)

    # Correctness first: the packed call against each sequence alone.
    with torch.no_grad():
        packed = varlen()
        worst = 0.0
        for b, n in enumerate(lengths):
            s, e = int(cu[b]), int(cu[b + 1])
            alone = dattn.dilated_attention(q[None, s:e], k[None, s:e], v[None, s:e], W, R)[0]
            worst = max(worst, ((packed[s:e].double() - alone.double()).norm() / alone.double().norm()).item())
    B = T // args.n
    qe, ke, ve = (x.detach().reshape(B, args.n, H, D).clone().requires_grad_() for x in (q, k, v))

    def equal():
        return dattn.dilated_attention(qe, ke, ve, W, R)

    rows = []
    for name, fn, flops in (("varlen", varlen, forward_flops(lengths)), ("equal", equal, forward_flops([args.n] * B))):
        with torch.no_grad():
            fwd = timed(fn, 3, args.repeats, device)
        fwdbwd = timed(lambda: fn().sum().backward(), 2, args.repeats, device)
        rows.append(dict(impl=name, fwd=fwd, fwdbwd=fwdbwd, flops=flops, fwd_tflops=flops / fwd["ms"] / 1e9,
                         fwdbwd_tflops=3.5 * flops / fwdbwd["ms"] / 1e9))
        print(f"{name}: fwd {fwd['ms']:.3f} ms [{fwd['min']:.3f}-{fwd['max']:.3f}] {rows[-1]['fwd_tflops']:.1f} TFLOP/s, "
              f"fwd+bwd {fwdbwd['ms']:.3f} ms [{fwdbwd['min']:.3f}-{fwdbwd['max']:.3f}] "
              f"{rows[-1]['fwdbwd_tflops']:.1f} TFLOP/s", file=sys.stderr)
    ratio_fwd = rows[0]["fwd_tflops"] / rows[1]["fwd_tflops"]
    ratio_bwd = rows[0]["fwdbwd_tflops"] / rows[1]["fwdbwd_tflops"]
    print(f"{len(lengths)} sequences, lengths {lengths}; packed vs alone worst relative error {worst:.1e}")
    print(f"varlen / equal TFLOP/s: forward {ratio_fwd:.3f}, forward+backward {ratio_bwd:.3f}")
    if args.json:
        json.dump(dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", lengths=lengths,
                       error_vs_alone=worst, rows=rows, ratio_fwd=ratio_fwd, ratio_fwdbwd=ratio_bwd),
                  open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
