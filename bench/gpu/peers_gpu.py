#!/usr/bin/env python3
"""docs/benchmarks.md's PyTorch peers on the GPU, timed in the same run as dattn-bench-gpu, and the combined
table: the peers' rows with dattn's rows (from dattn-bench-gpu --json) added, and the ratios.

Peers (docs/benchmarks.md "GPU anchors" and "Kernel-only bound"):
  per-group SDPA   slice each head group's dilated rows, SDPA, scatter back, divide by G
  kernel-only      the selected rows gathered once outside the timing; only SDPA is timed,
                   summed over branches, with each SDPA backend (cuDNN, flash, mem-efficient)
  dense SDPA       full attention over the whole sequence (a different function, more FLOPs)
  FlexAttention    flex_attention (compiled) with a dilated mask_mod

Times: medians of CUDA-event timings after warm-up (min and max too); fwd+bwd is
out.sum().backward() including the forward, into gradients set to None before each step (as
optimizer.zero_grad() leaves them; accumulating into the previous step's .grad would add a
read-modify-write of every gradient to every row); peak MB is the allocator's peak above what was
allocated before the inputs. Inputs rotate among sets larger than L2. Before timing, the
per-group composition and FlexAttention are checked against each other (they compute the same
function) and a peer that disagrees is marked wrong.

Usage: peers_gpu.py [--configs seed,long256k] [--dtypes bf16,fp32] [--dattn-json FILE]
                    [--json FILE] [--markdown FILE] [--long-flex] [--peer-timeout S] [--python-dattn]
--python-dattn adds dattn.dilated_attention called from Python (the installed package) as a row of
its own, timed like the peers in this process (host work included).
"""
import argparse
import datetime
import json
import math
import signal
import sys

import torch
import torch.nn.functional as F

CONFIGS = {
    "seed": dict(B=2, N=2048, H=12, D=64, w=[512, 1024, 2048], r=[1, 2, 4]),
    "long64k": dict(B=1, N=65536, H=12, D=64, w=[2048, 4096, 8192, 16384], r=[1, 2, 4, 8]),
    "long256k": dict(B=1, N=262144, H=12, D=64, w=[2048, 4096, 8192, 16384], r=[1, 2, 4, 8]),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def head_groups(H, G):
    sizes = [H // G + (1 if i < H % G else 0) for i in range(G)]
    starts = [sum(sizes[:i]) for i in range(G)]
    return list(zip(starts, sizes))


def forward_flops(c):
    G, total = len(c["w"]), 0.0
    for i, ((_, h), w, r) in enumerate(zip(head_groups(c["H"], G), c["w"], c["r"])):
        o = i % r
        for start in range(0, c["N"], w):
            length = min(w, c["N"] - start)
            sel = (length - o + r - 1) // r if o < length else 0
            total += 4.0 * c["B"] * h * sel * sel * c["D"]
    return total


def per_group(q, k, v, c):
    """Slice, SDPA, scatter: the composition of library calls ([B, N, H, D] in and out)."""
    B, N, H, D = q.shape
    G = len(c["w"])
    outs = []
    for i, ((h0, h), w, r) in enumerate(zip(head_groups(H, G), c["w"], c["r"])):
        if h == 0:
            continue
        o, S = i % r, N // w

        def gather(x):
            x = x[:, :, h0:h0 + h].reshape(B, S, w, h, D)[:, :, o::r]
            return x.reshape(B * S, -1, h, D).transpose(1, 2)

        a = F.scaled_dot_product_attention(gather(q), gather(k), gather(v))
        L = a.shape[2]
        a = a.transpose(1, 2).reshape(B, S, L, h, D)
        full = torch.zeros(B, S, w, h, D, dtype=q.dtype, device=q.device)
        full[:, :, o::r] = a
        outs.append(full.reshape(B, N, h, D))
    return torch.cat(outs, dim=2) / G


def gathered_inputs(q, k, v, c):
    """Each branch's selected rows, contiguous [B·segments, heads, L, D] (made outside timing)."""
    B, N, H, D = q.shape
    G = len(c["w"])
    per_branch = []
    for i, ((h0, h), w, r) in enumerate(zip(head_groups(H, G), c["w"], c["r"])):
        if h == 0:
            continue
        o, S = i % r, N // w
        per_branch.append([x[:, :, h0:h0 + h].reshape(B, S, w, h, D)[:, :, o::r].reshape(B * S, -1, h, D)
                           .transpose(1, 2).contiguous() for x in (q, k, v)])
    return per_branch


def make_flex(c, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    H, N, G = c["H"], c["N"], len(c["w"])
    branch = torch.tensor([i for i, (_, h) in enumerate(head_groups(H, G)) for _ in range(h)], device=device)
    w_t = torch.tensor(c["w"], device=device)
    r_t = torch.tensor(c["r"], device=device)
    o_t = torch.tensor([i % r for i, r in enumerate(c["r"])], device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        i = branch[h]
        w, r, o = w_t[i], r_t[i], o_t[i]
        return (q_idx // w == kv_idx // w) & ((q_idx % w) % r == o) & ((kv_idx % w) % r == o)

    block_mask = create_block_mask(mask_mod, B=None, H=H, Q_LEN=N, KV_LEN=N, device=device, _compile=True)
    compiled = torch.compile(flex_attention)

    def run(q, k, v):  # [B, H, N, D]
        return compiled(q, k, v, block_mask=block_mask) / G

    return run


def cuda_time(fn, warmup, repeats):
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(warmup + repeats):
        start.record()
        fn(i)
        stop.record()
        stop.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(stop))
    times.sort()
    return dict(ms=times[len(times) // 2], min=times[0], max=times[-1])


def rel_err(x, ref):
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return math.inf
    return ((x - ref).norm() / ref.norm()).item()


def clear_grads(inputs):
    """Drops the inputs' .grad, so that a timed backward writes fresh gradients instead of adding
    into the previous step's (a read-modify-write of every gradient that training, whose
    optimizer.zero_grad() sets them to None, does not pay)."""
    for x in inputs:
        if isinstance(x, torch.Tensor):
            x.grad = None


class Runner:
    def __init__(self, c, dtype, args):
        self.c, self.dtype, self.args = c, dtype, args
        self.dev = torch.device("cuda")
        B, N, H, D = c["B"], c["N"], c["H"], c["D"]
        bytes_per = B * N * H * D * dtype.itemsize
        self.sets = max(1, min(8, (200 << 20) // (3 * bytes_per) + 1))
        self.long = N * B > 8192
        self.warmup, self.repeats = (3, 10) if self.long else (10, 50)

    def inputs(self, layout="bnhd", grad=False, seed=0):
        c = self.c
        g = torch.Generator(device=self.dev).manual_seed(seed)
        shape = (c["B"], c["N"], c["H"], c["D"])
        xs = [torch.randn(shape, generator=g, device=self.dev, dtype=torch.float32).to(self.dtype) for _ in range(3)]
        if layout == "bhnd":
            xs = [x.transpose(1, 2).contiguous() for x in xs]
        if grad:
            xs = [x.requires_grad_() for x in xs]
        return xs

    def measure(self, name, make_sets, fn, flops, fwd_only=False, repeats=None, warmup=None):
        """make_sets() -> list of input tuples; fn(*inputs) -> tensor or list of tensors."""
        repeats = repeats or self.repeats
        warmup = warmup or self.warmup
        row = dict(impl=name, flops=flops)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        sets = make_sets()
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            row["fwd"] = cuda_time(lambda i: fn(*sets[i % len(sets)]), warmup, repeats)
        if not fwd_only:
            def step(i):
                inputs = sets[i % len(sets)]
                clear_grads(inputs)  # each step's gradients made anew, as zero_grad() (set_to_none) leaves them
                out = fn(*inputs)
                outs = out if isinstance(out, (list, tuple)) else [out]
                sum(o.sum() for o in outs).backward()
            row["fwdbwd"] = cuda_time(step, max(2, warmup // 2), repeats)
            for s in sets:
                clear_grads(s)
        torch.cuda.synchronize()
        row["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        del sets
        torch.cuda.empty_cache()
        return row


def run_config(cname, dname, args):
    c, dtype = CONFIGS[cname], DTYPES[dname]
    R = Runner(c, dtype, args)
    flops = forward_flops(c)
    B, N, H, D = c["B"], c["N"], c["H"], c["D"]
    rows = []

    def add(row, **extra):
        row.update(config=cname, dtype=dname, **extra)
        rows.append(row)
        f = row.get("fwd", {}).get("ms")
        fb = row.get("fwdbwd", {}).get("ms")
        print(f"  {row['impl']}: fwd {f} ms, fwd+bwd {fb} ms, peak {row.get('peak_mb', 0):.0f} MB", file=sys.stderr, flush=True)

    def on_alarm(signum, frame):
        raise TimeoutError(f"over {args.peer_timeout} s")

    def attempt(label, body):
        signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(args.peer_timeout)
        try:
            body()
        except Exception as e:  # a peer that cannot run (or runs too long) is reported, not fatal
            rows.append(dict(impl=label, config=cname, dtype=dname, failed=f"{type(e).__name__}: {str(e)[:160]}"))
            print(f"  {label}: failed: {e}", file=sys.stderr, flush=True)
            torch.cuda.empty_cache()
        finally:
            signal.alarm(0)

    # Agreement check: per-group composition vs FlexAttention on the same inputs.
    check = {}
    q, k, v = R.inputs(seed=123)
    with torch.no_grad():
        ref = per_group(q, k, v, c)
    flex_ok = None
    if not (R.long and not args.long_flex):
        def flex_check():
            nonlocal flex_ok
            run = make_flex(c, R.dev)
            with torch.no_grad():
                out = run(q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous())
            err = rel_err(out.transpose(1, 2), ref)
            check["flex_vs_per_group"] = err
            tol = 1e-5 if dtype == torch.float32 else 1.5e-2 if dtype == torch.bfloat16 else 3e-3
            flex_ok = err <= 2 * tol
        attempt("FlexAttention (check)", flex_check)
    del q, k, v, ref
    torch.cuda.empty_cache()

    if args.python_dattn:  # dattn from Python, in this process, with the same timing as the peers
        def dattn_python():
            import dattn
            q, k, v = R.inputs(seed=123)
            with torch.no_grad():
                err = rel_err(dattn.dilated_attention(q, k, v, c["w"], c["r"]), per_group(q, k, v, c))
            del q, k, v
            tol = 1e-5 if dtype == torch.float32 else 1.5e-2 if dtype == torch.bfloat16 else 3e-3
            add(R.measure("**dattn.dilated_attention (Python)**", lambda: [tuple(R.inputs(grad=True, seed=s))
                                                                    for s in range(R.sets)],
                          lambda q, k, v: dattn.dilated_attention(q, k, v, c["w"], c["r"]), flops),
                correct=err <= 2 * tol, error_vs_per_group=err)
        attempt("dattn.dilated_attention (Python)", dattn_python)

    attempt("per-group SDPA (slice, SDPA, scatter)", lambda: add(R.measure(
        "per-group SDPA (slice, SDPA, scatter)",
        lambda: [tuple(R.inputs(grad=True, seed=s)) for s in range(R.sets)],
        lambda q, k, v: per_group(q, k, v, c), flops), agrees_with_flex=flex_ok))

    backends = [("cuDNN", "CUDNN_ATTENTION"), ("flash (FA2)", "FLASH_ATTENTION"), ("mem-efficient", "EFFICIENT_ATTENTION")]
    if dtype == torch.float32:
        backends = [("mem-efficient", "EFFICIENT_ATTENTION")]
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for label, backend in backends:
        def kernel_only(label=label, backend=backend):
            def make():
                sets = []
                for s in range(R.sets):
                    q, k, v = R.inputs(seed=s)
                    sets.append(tuple(t.requires_grad_() for br in gathered_inputs(q, k, v, c) for t in br))
                return sets

            def fn(*flat):
                with sdpa_kernel([getattr(SDPBackend, backend)]):
                    return [F.scaled_dot_product_attention(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3)]
            add(R.measure(f"kernel-only bound, SDPA {label}", make, fn, flops))
        attempt(f"kernel-only bound, SDPA {label}", kernel_only)

    if not (R.long and dtype == torch.float32):
        dense_flops = 4.0 * B * H * N * N * D
        attempt("dense SDPA (whole sequence)", lambda: add(R.measure(
            "dense SDPA (whole sequence)", lambda: [tuple(R.inputs("bhnd", grad=True, seed=s)) for s in range(R.sets)],
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v), dense_flops,
            repeats=5 if R.long else None, warmup=2 if R.long else None), computes="a different function"))

    if flex_ok is not None and not (R.long and dtype == torch.float32):
        def flex_time():
            run = make_flex(c, R.dev)
            add(R.measure("FlexAttention, dilated mask_mod (compiled)",
                          lambda: [tuple(R.inputs("bhnd", grad=True, seed=s)) for s in range(R.sets)], run, flops,
                          repeats=5 if R.long else None, warmup=2 if R.long else None), agrees_with_per_group=flex_ok)
        attempt("FlexAttention, dilated mask_mod (compiled)", flex_time)
    for r in rows:
        r.setdefault("check", check)
    return rows


def tflops(flops, ms, factor=1.0):
    return factor * flops / (ms * 1e-3) / 1e12


def table(rows):
    lines = ["| implementation | config | dtype | fwd ms [min-max] | fwd TFLOP/s | fwd+bwd ms [min-max] | fwd+bwd TFLOP/s | peak MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['impl']} | {r['config']} | {r['dtype']} | failed: {r['failed'][:60]} | | | | |")
            continue
        if r.get("correct") is False or r.get("agrees_with_flex") is False or r.get("agrees_with_per_group") is False:
            lines.append(f"| {r['impl']} | {r['config']} | {r['dtype']} | WRONG | | | | |")
            continue
        f, fb = r.get("fwd"), r.get("fwdbwd")
        fcell = f"{f['ms']:.3f} [{f['min']:.3f}-{f['max']:.3f}]" if f else "—"
        fbcell = f"{fb['ms']:.3f} [{fb['min']:.3f}-{fb['max']:.3f}]" if fb else "—"
        ft = f"{tflops(r['flops'], f['ms']):.1f}" if f else "—"
        fbt = f"{tflops(r['flops'], fb['ms'], 3.5):.1f}" if fb else "—"
        lines.append(f"| {r['impl']} | {r['config']} | {r['dtype']} | {fcell} | {ft} | {fbcell} | {fbt} | {r.get('peak_mb', 0):.0f} |")
    return "\n".join(lines)


def dattn_rows(path):
    data = json.load(open(path))
    rows = []
    for r in data["rows"]:
        dtype = {"fp32 (use_tf32)": "fp32 (use_tf32)"}.get(r["dtype"], r["dtype"])
        impl = r["impl"] + (", use_tf32" if "tf32" in dtype else "")
        rows.append(dict(impl=f"**{impl}**", config=r["config"],
                         dtype="fp32" if "tf32" in dtype else dtype, correct=r["correct"], flops=r["flops"],
                         fwd=dict(ms=r["fwd_ms"], min=r["fwd_min"], max=r["fwd_max"]),
                         fwdbwd=dict(ms=r["fwdbwd_ms"], min=r["fwdbwd_min"], max=r["fwdbwd_max"]),
                         peak_mb=r["peak_mb"], errors=[r["err_out"], r["err_lse"], r["err_grad"]]))
    return data.get("device", ""), rows


def ratios(rows):
    lines = []
    for r in rows:
        if not r["impl"].startswith("**dattn") or r.get("correct") is False:
            continue
        for p in rows:
            if p is r or p["impl"].startswith("**dattn") or p["config"] != r["config"] or p["dtype"] != r["dtype"]:
                continue
            if "failed" in p or "fwd" not in p:
                continue
            parts = [f"fwd {p['fwd']['ms'] / r['fwd']['ms']:.2f}x"]
            if "fwdbwd" in p and "fwdbwd" in r:
                parts.append(f"fwd+bwd {p['fwdbwd']['ms'] / r['fwdbwd']['ms']:.2f}x")
            if p.get("peak_mb"):
                parts.append(f"peak {r['peak_mb'] / p['peak_mb']:.2f} of theirs")
            lines.append(f"- {r['config']} {r['dtype']} {r['impl'].strip('*')} vs {p['impl']}: faster by " + ", ".join(parts))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="seed,long256k")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--dattn-json")
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    ap.add_argument("--long-flex", action="store_true",
                    help="also FlexAttention at long configs (its block mask and compile take minutes there)")
    ap.add_argument("--peer-timeout", type=int, default=150, help="seconds allowed to one peer")
    ap.add_argument("--python-dattn", action="store_true",
                    help="also time dattn.dilated_attention from Python in this process (the installed package)")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    for cname in args.configs.split(","):
        for dname in args.dtypes.split(","):
            print(f"peers {cname} {dname} ...", file=sys.stderr, flush=True)
            rows += run_config(cname, dname, args)
    device = torch.cuda.get_device_name()
    if args.dattn_json:
        dev2, drows = dattn_rows(args.dattn_json)
        merged = []
        for cname in args.configs.split(","):
            for dname in ["bf16", "fp16", "fp32"]:
                merged += [r for r in rows if r["config"] == cname and r["dtype"] == dname]
                merged += [r for r in drows if r["config"] == cname and r["dtype"] == dname]
        rows_out = merged
    else:
        rows_out = rows
    head = (f"GPU: {device}; PyTorch {torch.__version__}, CUDA {torch.version.cuda}; "
            f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    text = head + "\n\n" + table(rows_out) + "\n\nRatios (peer time / dattn time; >1 means dattn is faster):\n" + ratios(rows_out) + "\n"
    print(text)
    if args.markdown:
        open(args.markdown, "w").write(text)
    if args.json:
        json.dump(dict(device=device, torch=torch.__version__, rows=rows_out), open(args.json, "w"), indent=1, default=str)


if __name__ == "__main__":
    main()
