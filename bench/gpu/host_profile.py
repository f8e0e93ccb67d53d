#!/usr/bin/env python3
"""Where a small call's time goes from Python: dattn.dilated_attention forward and forward+backward
(out.sum().backward(), as peers_gpu.py times them) at a small configuration, under torch.profiler
with CPU and CUDA activities. Prints, for the median step, each GPU kernel's start and end relative
to the step's start and the GPU's idle gaps between them (host work the GPU waited for), then the
profiler's table of host operations.

--forward profiles the forward alone (under torch.no_grad, as peers_gpu.py times the forward).

Usage: host_profile.py [--config seed] [--dtype bf16] [--steps 50] [--forward]
"""
import argparse
import statistics

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from peers_gpu import CONFIGS, DTYPES, clear_grads  # the peers' configurations (this script's folder is on sys.path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="seed", choices=sorted(CONFIGS))
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--forward", action="store_true", help="the forward alone, under torch.no_grad")
    args = ap.parse_args()
    import dattn
    c, dtype = CONFIGS[args.config], DTYPES[args.dtype]
    shape = (c["B"], c["N"], c["H"], c["D"])
    q, k, v = [torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3)]

    def step():
        if args.forward:
            with torch.no_grad():
                dattn.dilated_attention(q, k, v, c["w"], c["r"])
            return
        clear_grads((q, k, v))  # fresh gradients each step, as peers_gpu.py times them
        dattn.dilated_attention(q, k, v, c["w"], c["r"]).sum().backward()

    for _ in range(10):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(args.steps):
            with record_function(f"step{i}"):
                step()
                torch.cuda.synchronize()
    events = prof.events()
    # The steps' host ranges (the profiler may also mirror an annotation on the GPU's timeline) and
    # the GPU's own activities (kernels, copies, memsets).
    cpu, gpu = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    steps = sorted((e for e in events if e.device_type == cpu and e.name.startswith("step")),
                   key=lambda e: e.time_range.start)
    kernels = sorted((e for e in events if e.device_type == gpu and not e.name.startswith("step")),
                     key=lambda e: e.time_range.start)
    spans = []
    for s in steps:
        inside = [e for e in kernels if s.time_range.start <= e.time_range.start < s.time_range.end]
        spans.append((s.time_range.end - s.time_range.start, s, inside))
    spans.sort(key=lambda x: x[0])
    total, s, inside = spans[len(spans) // 2]
    what = "forward" if args.forward else "fwd+bwd"
    print(f"dattn.dilated_attention {what}, {args.config} {args.dtype}: step (host to synchronised) "
          f"median {total:.0f} us [min {spans[0][0]:.0f}, max {spans[-1][0]:.0f}] over {args.steps} steps")
    print(f"GPU busy in the median step: {sum(e.time_range.end - e.time_range.start for e in inside):.0f} us "
          f"in {len(inside)} kernels; idle before each (host work it waited for), start, duration:")
    previous = s.time_range.start
    for e in inside:
        print(f"  idle {e.time_range.start - previous:7.1f} us | at {e.time_range.start - s.time_range.start:7.1f} | "
              f"{e.time_range.end - e.time_range.start:7.1f} us  {e.name[:90]}")
        previous = max(previous, e.time_range.end)
    print(f"  idle {s.time_range.end - previous:7.1f} us to the step's end (the synchronisation's return)")
    print(f"median of the GPU-busy time over the steps: "
          f"{statistics.median(sum(e.time_range.end - e.time_range.start for e in x[2]) for x in spans):.0f} us")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
