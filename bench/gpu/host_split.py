#!/usr/bin/env python3
"""Where the host time of one dattn.dilated_attention forward from Python goes, layer by layer: the
whole call (and hilbert_dilated_attention's beside it), then its layers (attention_forward below the
checks, _forward_impl below the autograd choice) and its pieces on their own (the autograd choice,
the Python checks, torch.empty or new_empty of out and lse, the five views, the stream, the
binding's call _C.forward with every argument made beforehand, which holds the C++ core's own time,
and the arguments' dict). A call timed alone (as peers_gpu.py times them) waits for all of it
before its kernel starts, so this is what the Python row adds to the kernel's time.

Each figure: the median [min-max] of --calls spans of time.perf_counter around one call, with the
GPU synchronised before each (no queue fills; the launches return before their kernels run).

Usage: host_split.py [--config long256k] [--dtype bf16] [--calls 200]
"""
import argparse
import statistics
import time

import torch

from peers_gpu import CONFIGS, DTYPES  # the peers' configurations (this script's folder is on sys.path)


def span_us(fn, calls):
    spans = []
    for _ in range(calls):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        spans.append((time.perf_counter() - start) * 1e6)
    torch.cuda.synchronize()
    spans.sort()
    return spans[len(spans) // 2], spans[0], spans[-1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="long256k", choices=sorted(CONFIGS))
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    import dattn
    from dattn import _ops
    c, dtype = CONFIGS[args.config], DTYPES[args.dtype]
    B, N, H, D = c["B"], c["N"], c["H"], c["D"]
    q, k, v = [torch.randn((B, N, H, D), device="cuda", dtype=dtype) for _ in range(3)]
    out = torch.empty_like(q)
    lse = torch.empty((B, H, N), dtype=torch.float32, device="cuda")
    w, r = list(c["w"]), list(c["r"])
    views = [_ops._view(t) for t in (q, k, v, out, lse)]
    config = _ops._config_args(None, w, r, False, None, "grouped", 0.0, 0, False, _ops._stream(q))

    def checks():
        _ops.check_attention_inputs(q, k, v)
        _ops.check_config(w, r)
        _ops.check_mode("grouped")
        _ops.check_scale(None)
        _ops.check_dropout(0.0)
        _ops.check_key_padding_mask(None, B, N, q.device)

    pieces = [
        ("dattn.dilated_attention (the whole call)", lambda: dattn.dilated_attention(q, k, v, w, r)),
        ("dattn.hilbert_dilated_attention (the whole call, dattn's own order: no per-call check)",
         lambda: dattn.hilbert_dilated_attention(q, k, v, w, r)),
        ("_ops.attention_forward (no checks: the autograd choice, _forward_impl)",
         lambda: _ops.attention_forward(q, k, v, None, w, r, False, None, "grouped", 0.0, 0, False)),
        ("_ops._forward_impl (outputs, views, arguments, _C.forward)",
         lambda: _ops._forward_impl(q, k, v, None, w, r, False, None, "grouped", 0.0, 0, False)),
        ("the autograd choice (_use_custom_ops, _needs_function)",
         lambda: (_ops._use_custom_ops(q), _ops._needs_function(False))),
        ("Python checks", checks),
        ("q.device", lambda: q.device),
        ("torch.empty of out and lse", lambda: (torch.empty((B, N, H, D), dtype=dtype, device=q.device),
                                                torch.empty((B, H, N), dtype=torch.float32, device=q.device))),
        ("q.new_empty of out and lse", lambda: (q.new_empty((B, N, H, D)), q.new_empty((B, H, N), dtype=torch.float32))),
        ("five views (_view)", lambda: [_ops._view(t) for t in (q, k, v, out, lse)]),
        ("the stream (_stream)", lambda: _ops._stream(q)),
        ("_C.forward, arguments made beforehand", lambda: _ops._C.forward(*views, *config)),
        ("_ops._config_args", lambda: _ops._config_args(None, w, r, False, None, "grouped", 0.0, 0, False, 0)),
    ]
    print(f"host time of one forward from Python, {args.config} {args.dtype}, {torch.cuda.get_device_name()}: "
          f"us, median [min-max] of {args.calls} calls")
    with torch.no_grad():
        for name, fn in pieces:
            for _ in range(10):  # warm-up (the first calls plan and build the tensor maps' entry point)
                fn()
            median, low, high = span_us(fn, args.calls)
            print(f"  {median:8.1f} [{low:.1f}-{high:.1f}]  {name}")


if __name__ == "__main__":
    main()
