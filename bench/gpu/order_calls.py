#!/usr/bin/env python3
"""A few forward+backward calls of dilated attention at one of sparse_gpu.py's Hilbert
configurations, in one order: row-major (`dattn.dilated_attention`), the Hilbert order or the
identity index map (`dattn.hilbert_dilated_attention`, the index-map kernels), for a profiler to
pick a launch from: `scripts/gpu-check order-profile` runs it under ncu, so that the index-map
walk's kernels can be compared with the row-major ones launch for launch.

Usage: order_calls.py [--config long64k] [--order row_major|hilbert|identity] [--calls 4] [--device cuda]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peers_gpu import clear_grads  # noqa: E402
from sparse_gpu import HILBERT  # noqa: E402

import dattn  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="long64k", choices=sorted(HILBERT))
    ap.add_argument("--order", default="row_major", choices=["row_major", "hilbert", "identity"])
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    B, grid, H, D, w, r = HILBERT[args.config]
    N = grid[0] * grid[1]
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    q, k, v = [torch.randn((B, N, H, D), device=args.device, dtype=dtype, requires_grad=True) for _ in range(3)]
    calls = {"row_major": lambda: dattn.dilated_attention(q, k, v, w, r),
             "hilbert": lambda: dattn.hilbert_dilated_attention(q, k, v, w, r, grid_shape=grid),
             "identity": lambda: dattn.hilbert_dilated_attention(q, k, v, w, r, grid_shape=(1, N))}
    for _ in range(args.calls):
        clear_grads((q, k, v))  # fresh gradients each call, as the benchmarks time them
        calls[args.order]().sum().backward()
    if args.device == "cuda":
        torch.cuda.synchronize()
    print(f"{args.calls} fwd+bwd calls, {args.config} {args.order}, B={B} N={N} H={H} D={D} w={w} r={r}")


if __name__ == "__main__":
    main()
