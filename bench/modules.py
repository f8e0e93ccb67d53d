"""Multi-head module rows (issue: Python package): dattn's MultiheadDilatedAttention (plain) and
ImprovedMultiheadDilatedAttention (fused QKV) at docs/benchmarks.md's seed config (B=2, N=2048, E=768,
12 heads, segments [512, 1024, 2048], rates [1, 2, 4]) beside torch.nn.MultiheadAttention (dense
attention over the whole sequence: the module people would otherwise use), in one run, on the
CPU or on a GPU (--device cuda). Every dattn module is first checked against the same module in
float64 (the reference path) with the same weights.

Usage: python bench/modules.py [--device cpu|cuda] [--dtype float32|bfloat16] [--repeats 5] [--json FILE]
(needs dattn importable: pip install . first)."""

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

import dattn

B, N, E, HEADS = 2, 2048, 768, 12
SEGMENTS, RATES = [512, 1024, 2048], [1, 2, 4]


def timed(fn, device, warmup, repeats):
    samples = []
    for i in range(warmup + repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            samples.append(1e3 * (time.perf_counter() - t0))
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples}


def timed_back_to_back(fn, device, warmup, repeats, inner=20):
    """Per-call time of `inner` calls issued back to back (a training loop's steady state: the host
    queues the next call while the GPU runs this one), median over `repeats` such batches."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append(1e3 * (time.perf_counter() - t0) / inner)
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples}


def timed_graph(fn, warmup, repeats, inner=20):
    """GPU time per call of fn captured once in a CUDA graph and replayed `inner` times back to back
    (CUDA events; no host dispatch in the measure: what each module asks of the GPU)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(3, warmup)):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for i in range(warmup + repeats):
        start.record()
        for _ in range(inner):
            graph.replay()
        stop.record()
        stop.synchronize()
        if i >= warmup:
            samples.append(start.elapsed_time(stop) / inner)
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples}


def rel_err(x, ref):
    return ((x.double().cpu() - ref.double().cpu()).norm() / ref.double().cpu().norm()).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="CPU threads for torch and dattn (default: the CPUs this process may use)")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)  # also dattn's: the same OpenMP runtime in this process
    dtype = getattr(torch, a.dtype)
    torch.manual_seed(0)
    x = torch.randn(B, N, E)
    grad = torch.randn(B, N, E)

    modules = {
        "dattn MultiheadDilatedAttention (plain)": dattn.MultiheadDilatedAttention(E, HEADS, RATES, SEGMENTS),
        "dattn ImprovedMultiheadDilatedAttention (fused QKV)": dattn.ImprovedMultiheadDilatedAttention(E, HEADS, RATES,
                                                                                                      SEGMENTS),
        f"torch {torch.__version__} nn.MultiheadAttention (dense)": nn.MultiheadAttention(E, HEADS, batch_first=True),
    }
    rows = []
    for name, module in modules.items():
        dense = isinstance(module, nn.MultiheadAttention)
        error = None
        if not dense:  # the check: this module in float64 (the reference path) with the same weights
            ref64 = module.double()
            # need_weights=True: both dattn modules then return (output, None)
            ref = ref64(x.double()[:, :512], need_weights=True)[0]
            module = module.float()
            error = rel_err(module.to(a.device)(x[:, :512].to(a.device), need_weights=True)[0], ref)
        module = module.to(a.device, dtype)
        xd = x.to(a.device, dtype).requires_grad_()
        gd = grad.to(a.device, dtype)
        call = (lambda m=module: m(xd, xd, xd, need_weights=False)[0]) if dense else (lambda m=module: m(xd, need_weights=True)[0])

        def forward():
            with torch.no_grad():
                call()

        def forward_backward():
            call().backward(gd)

        def forward_backward_fresh():  # in a graph: gradients made anew each replay, as zero_grad(None) does
            xd.grad = None
            for q in module.parameters():
                q.grad = None
            call().backward(gd)

        row = {"module": name, "device": a.device, "dtype": a.dtype, "check_rel_err": error,
               "fwd_ms": timed(forward, a.device, a.warmup, a.repeats),
               "fwdbwd_ms": timed(forward_backward, a.device, a.warmup, a.repeats),
               "fwd_ms_back_to_back": timed_back_to_back(forward, a.device, a.warmup, a.repeats),
               "fwdbwd_ms_back_to_back": timed_back_to_back(forward_backward, a.device, a.warmup, a.repeats)}
        if a.device == "cuda":
            for key, fn in (("fwd_ms_graph", forward), ("fwdbwd_ms_graph", forward_backward_fresh)):
                try:
                    row[key] = timed_graph(fn, a.warmup, a.repeats)
                except Exception as e:  # noqa: BLE001 - a module that cannot be captured is reported
                    row[key] = {"failed": f"{type(e).__name__}: {str(e)[:200]}"}
        rows.append(row)
        print(f"{name}: done", file=sys.stderr)

    print(f"\n## Multi-head modules, seed config (B={B}, N={N}, E={E}, {HEADS} heads), {a.device}, {a.dtype}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)\n")
    print("| module | fwd ms, one call | fwd+bwd ms, one call | fwd ms, back to back | fwd+bwd ms, back to back | "
          "check vs float64 (N=512) |")
    print("|---|---|---|---|---|---|")

    def cell(t):
        if "failed" in t:
            return f"failed: {t['failed']}"
        return f"{t['median']:.3g} [{t['min']:.3g}–{t['max']:.3g}]"
    for r in rows:
        check = "— (a different function: dense)" if r["check_rel_err"] is None else f"{r['check_rel_err']:.1e}"
        print(f"| {r['module']} | {cell(r['fwd_ms'])} | {cell(r['fwdbwd_ms'])} | {cell(r['fwd_ms_back_to_back'])} | "
              f"{cell(r['fwdbwd_ms_back_to_back'])} | {check} |")
    if a.device == "cuda":
        print("\n| module | fwd ms, CUDA graph | fwd+bwd ms, CUDA graph |")
        print("|---|---|---|")
        for r in rows:
            print(f"| {r['module']} | {cell(r['fwd_ms_graph'])} | {cell(r['fwdbwd_ms_graph'])} |")
        print("\nCUDA graph: each module's call (forward; forward + backward with fresh gradients) captured once "
              "and replayed 20 times back to back, CUDA-event time per call: the GPU work without host dispatch.")
    print("\nms, median [min–max]. One call: synchronised before and after each call (the latency of one call, host "
          "dispatch included). Back to back: 20 calls between synchronisations, per call (a training loop's steady "
          "state). fwd+bwd: forward then out.backward(grad) of the module output, input gradient included. "
          "nn.MultiheadAttention attends densely over all 2048 tokens (6.9x the dilated FLOPs).")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
