#!/usr/bin/env python3
"""dattn.dilated_attention's forward at long256k, long64k and seed (bf16), timed twice: with its host
work counted (each call on an idle GPU, as peers_gpu.py times it) and hidden (torch.cuda._sleep keeps
the GPU busy ~200 us while the host prepares the call, so the events time the GPU's work only). Their
difference is what the host adds to a call timed alone; the hidden time is the kernels'.

Each figure: median [min-max] of 15 calls after 3 untimed, ms.

Usage: host_hidden.py (run from the repository root or bench/gpu)
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peers_gpu import CONFIGS  # noqa: E402

import dattn  # noqa: E402


def times(fn, hide, calls=15, warmup=3):
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    spans = []
    for i in range(calls + warmup):
        torch.cuda.synchronize()
        if hide:
            torch.cuda._sleep(400000)  # ~200 us at 1.98 GHz
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        if i >= warmup:
            spans.append(start.elapsed_time(stop))
    spans.sort()
    return f"{spans[len(spans) // 2]:.4f} [{spans[0]:.4f}-{spans[-1]:.4f}]"


def main():
    for name in ("long256k", "long64k", "seed"):
        c = CONFIGS[name]
        q, k, v = [torch.randn((c["B"], c["N"], c["H"], c["D"]), device="cuda", dtype=torch.bfloat16)
                   for _ in range(3)]
        with torch.no_grad():
            def call():
                dattn.dilated_attention(q, k, v, c["w"], c["r"])
            print(name, "fwd ms counted", times(call, False), "hidden", times(call, True), flush=True)
        del q, k, v


if __name__ == "__main__":
    main()
