#!/usr/bin/env python3
"""PyTorch peers of dattn-bench (docs/benchmarks.md "CPU"): dilated attention in grouped mode composed
from library calls, group by group -- slice the rows each branch selects in each segment, run
attention on them, scatter the result back and divide by G.

Variants:
  matmul  per-group matmul + softmax + matmul (works on torch 1.x; docs/benchmarks.md's torch 1.13 anchor)
  sdpa    per-group torch.nn.functional.scaled_dot_product_attention (torch >= 2.0)

Run by dattn-bench as `python peers.py --spec SPEC.json`; prints one JSON object on stdout,
progress on stderr. Before a variant is timed on a problem and dtype it is checked against
float64 torch computations of the same function: on the scaled-down problem of the spec over
whole tensors (a dense masked softmax, written independently of the composition), and at full
size on one random (batch, head, segment) per branch (the segment's attention in float64, with
autograd for the gradients). A variant over docs/semantics.md's bars is reported as wrong and not timed.

Extra memory is read from libdattn_memhook.so when dattn-bench preloads it (LD_PRELOAD): the
heap high-water mark during the call above the heap before it, minus the bytes of what the
call returns (out; for forward+backward also q.grad, k.grad, v.grad).
"""

import argparse
import ctypes
import gc
import json
import math
import random
import sys
import time

L2_BAR = {"float32": 1e-5, "bfloat16": 1.5e-2, "float16": 3e-3}


START = None  # dattn-bench's start (epoch seconds), to stamp lines like its own


def log(msg):
    stamp = f"{time.time() - START:6.1f} s  " if START else ""
    print(f"{stamp}[peers] {msg}", file=sys.stderr, flush=True)


class MemHook:
    """The counters of libdattn_memhook.so, if it is the malloc of this process."""

    def __init__(self):
        self.ok = False
        try:
            lib = ctypes.CDLL(None)
            self._live = lib.dattn_memhook_live
            self._peak = lib.dattn_memhook_peak
            self._reset = lib.dattn_memhook_reset_peak
            self._live.restype = ctypes.c_int64
            self._peak.restype = ctypes.c_int64
            self.ok = True
        except (AttributeError, OSError):
            pass

    def start(self):
        if not self.ok:
            return None
        live = self._live()
        self._reset()
        return live

    def extra(self, live_before):
        if not self.ok or live_before is None:
            return None
        return self._peak() - live_before


def cpu_snapshot():
    """(machine busy s, machine total s, this process s) to tell what other processes took."""
    import os
    import resource
    with open("/proc/stat") as f:
        v = [float(x) for x in f.readline().split()[1:9]]
    hz = os.sysconf("SC_CLK_TCK")
    total = sum(v) / hz
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return total - (v[3] + v[4]) / hz, total, ru.ru_utime + ru.ru_stime


def others_since(before):
    busy, total, own = cpu_snapshot()
    capacity = total - before[1]
    if capacity <= 0:
        return 0.0
    return min(1.0, max(0.0, (busy - before[0] - (own - before[2])) / capacity))


def summarize(samples):
    s = sorted(samples)
    n = len(s)
    median = s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
    return {"median": median, "min": s[0], "max": s[-1], "samples": samples}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", required=True, help="JSON written by dattn-bench")
    args = ap.parse_args()
    with open(args.spec) as f:
        spec = json.load(f)
    global START
    START = spec.get("start_time")

    try:
        import torch
        import torch.nn.functional as F
    except Exception as e:  # noqa: BLE001 - any import failure means: no peer here
        print(json.dumps({"skipped": f"torch is not importable ({type(e).__name__}: {e})",
                          "python": sys.executable}))
        return 0

    version = torch.__version__.split("+")[0]
    major = int(version.split(".")[0])
    has_sdpa = hasattr(F, "scaled_dot_product_attention")
    wanted = spec.get("variants", "auto")
    if wanted == "auto":
        variants = ["sdpa"] if (major >= 2 and has_sdpa) else ["matmul"]
    elif wanted == "all":
        variants = ["matmul"] + (["sdpa"] if has_sdpa else [])
    elif wanted == "sdpa" and not has_sdpa:
        print(json.dumps({"skipped": f"torch {version} has no scaled_dot_product_attention",
                          "python": sys.executable, "torch_version": version}))
        return 0
    else:
        variants = [wanted]

    threads = int(spec["threads"])
    torch.set_num_threads(threads)
    repeats, warmup = int(spec["repeats"]), int(spec["warmup"])
    seed = int(spec.get("seed", 1))
    mem = MemHook()
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    log(f"torch {version} ({sys.executable}), {threads} thread(s), variants {variants}, "
        f"memory {'measured' if mem.ok else 'not measured (libdattn_memhook.so not preloaded)'}")

    # ----------------------------------------------------------------------------------------
    def groups(H, G):
        """(branch, first head, head count) of grouped mode."""
        first = 0
        for i in range(G):
            count = H // G + (1 if i < H % G else 0)
            yield i, first, count
            first += count

    def composition(q, k, v, segs, rates, attn):
        """Grouped dilated attention composed per group; q, k, v [B, N, H, D]."""
        B, N, H, D = q.shape
        G = len(segs)
        out = torch.zeros_like(q)
        for i, h0, hc in groups(H, G):
            if hc == 0:
                continue
            w, r = segs[i], rates[i]
            o = i % r
            hs = slice(h0, h0 + hc)
            full = N // w
            if full:
                def sel(x):
                    return x[:, :full * w, hs].reshape(B, full, w, hc, D)[:, :, o::r]
                L = sel(q).shape[2]
                if L:
                    qs, ks, vs = (sel(x).permute(0, 1, 3, 2, 4).reshape(B * full, hc, L, D) for x in (q, k, v))
                    res = attn(qs, ks, vs).reshape(B, full, hc, L, D).permute(0, 1, 3, 2, 4)
                    out[:, :full * w, hs].view(B, full, w, hc, D)[:, :, o::r] = res / G
            start = full * w
            if start + o < N:  # the last, partial segment (or the whole sequence when w >= N)
                qs, ks, vs = (x[:, start + o::r, hs].permute(0, 2, 1, 3) for x in (q, k, v))
                res = attn(qs, ks, vs)
                out[:, start + o::r, hs] = res.permute(0, 2, 1, 3) / G
        return out

    def make_attn(variant, D):
        scale = 1.0 / math.sqrt(D)
        if variant == "matmul":
            def attn(qs, ks, vs):
                s = torch.matmul(qs, ks.transpose(-2, -1)) * scale
                return torch.matmul(torch.softmax(s, dim=-1), vs)
        else:
            def attn(qs, ks, vs):
                return F.scaled_dot_product_attention(qs, ks, vs)
        return attn

    def dense_reference(q, k, v, dout, segs, rates):
        """Float64, whole tensors, written as one masked softmax per head (no slicing)."""
        B, N, H, D = q.shape
        G = len(segs)
        scale = 1.0 / math.sqrt(D)
        q, k, v = (x.detach().double().requires_grad_(True) for x in (q, k, v))
        pos = torch.arange(N)
        heads = []
        for i, h0, hc in groups(H, G):
            w, r = segs[i], rates[i]
            seg = pos // w
            selected = ((pos - seg * w) % r) == (i % r)
            allowed = (seg[:, None] == seg[None, :]) & selected[:, None] & selected[None, :]
            allowed = allowed | ~selected[:, None]  # unselected rows: any softmax, zeroed below
            for h in range(h0, h0 + hc):
                s = torch.einsum("bnd,bmd->bnm", q[:, :, h], k[:, :, h]) * scale
                p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
                heads.append((h, torch.einsum("bnm,bmd->bnd", p, v[:, :, h]) * selected[:, None] / G))
        out = torch.stack([o for _, o in sorted(heads, key=lambda t: t[0])], dim=2)
        (out * dout.double()).sum().backward()
        return out.detach(), q.grad, k.grad, v.grad

    class L2:
        def __init__(self):
            self.err2 = 0.0
            self.ref2 = 0.0

        def add(self, x, ref):
            x, ref = x.double(), ref.double()
            self.err2 += float(((x - ref) ** 2).sum())
            self.ref2 += float((ref ** 2).sum())

        def rel(self):
            if math.isnan(self.err2):
                return math.inf
            if self.ref2 == 0:
                return 0.0 if self.err2 == 0 else math.inf
            return math.sqrt(self.err2 / self.ref2)

    def rel_l2(x, ref):
        acc = L2()
        acc.add(x, ref)
        return acc.rel()

    def spot_check(q, k, v, dout, out, dq, dk, dv, segs, rates, rng):
        """Float64 attention of one random (batch, head, segment) per branch, full size."""
        B, N, H, D = q.shape
        G = len(segs)
        scale = 1.0 / math.sqrt(D)
        acc = {name: L2() for name in ("out", "dq", "dk", "dv")}
        rows = 0
        for i, h0, hc in groups(H, G):
            if hc == 0:
                continue
            w, r = segs[i], rates[i]
            o = i % r
            b, h = rng.randrange(B), h0 + rng.randrange(hc)
            segments = (N + w - 1) // w
            s = segments - 1 if i == 0 else rng.randrange(segments)
            start, end = s * w, min(s * w + w, N)
            idx = torch.arange(start + o, end, r)
            others = torch.tensor([p for p in range(start, end) if (p - start) % r != o], dtype=torch.long)
            if len(idx):
                qs, ks, vs = (x[b, idx, h].double().requires_grad_(True) for x in (q, k, v))
                o_ref = torch.softmax(qs @ ks.T * scale, dim=-1) @ vs / G
                (o_ref * dout[b, idx, h].double()).sum().backward()
                for name, x, ref in (("out", out, o_ref.detach()), ("dq", dq, qs.grad), ("dk", dk, ks.grad),
                                     ("dv", dv, vs.grad)):
                    acc[name].add(x[b, idx, h], ref)
                rows += len(idx)
            if len(others):  # rows the branch does not select: exactly zero
                for name, x in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
                    acc[name].add(x[b, others, h], torch.zeros(len(others), D, dtype=torch.float64))
                rows += len(others)
        result = {name: a.rel() for name, a in acc.items()}
        result["rows_checked"] = rows
        return result

    def inputs(p, dtype, salt):
        g = torch.Generator().manual_seed(seed * 1000 + salt)
        shape = (p["B"], p["N"], p["H"], p["D"])
        return [torch.randn(shape, generator=g).to(dtype) for _ in range(4)]

    perturb = float(spec.get("perturb", 0) or 0)  # self-test of the checks (dattn-bench --perturb)

    def fwd_bwd(q, k, v, dout, segs, rates, attn):
        q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
        out = composition(q, k, v, segs, rates, attn)
        out.backward(dout)
        if perturb:
            return out.detach() * (1 + perturb), q.grad, k.grad * (1 + perturb), v.grad
        return out.detach(), q.grad, k.grad, v.grad

    def passes(errors, dtype_name):
        bar = L2_BAR[dtype_name]
        bad = [f"{n} rel. L2 error {errors[n]:.3g} > {bar:g}" for n in ("out", "dq", "dk", "dv")
               if not errors[n] <= bar]
        return bad[0] if bad else None

    # ----------------------------------------------------------------------------------------
    rows = []
    rng = random.Random(seed)
    for variant in variants:
        label = (f"torch {version} per-group matmul+softmax" if variant == "matmul"
                 else f"torch {version} per-group SDPA")
        for p in spec["problems"]:
            if p.get("mode", "grouped") != "grouped" or p.get("causal", False):
                continue
            segs, rates = p["segment_lengths"], p["dilation_rates"]
            attn = make_attn(variant, p["D"])
            for dtype_name in spec["dtypes"]:
                tag = f"[{p['config']} N={p['N']} {dtype_name} {label}]"
                row = {"implementation": label, "config": p["config"], "N": p["N"], "dtype": dtype_name,
                       "status": "ok", "checks": {}}
                rows.append(row)
                dtype = dtypes[dtype_name]
                try:
                    # 1. Scaled-down problem, whole tensors, against a dense masked float64 softmax.
                    red = p["reduced"]
                    rq, rk, rv, rd = inputs(red, dtype, 1)
                    got = fwd_bwd(rq, rk, rv, rd, red["segment_lengths"], red["dilation_rates"], attn)
                    ref = dense_reference(rq, rk, rv, rd, red["segment_lengths"], red["dilation_rates"])
                    errors = {n: rel_l2(x, y) for n, x, y in zip(("out", "dq", "dk", "dv"), got, ref)}
                    errors["finite"] = all(bool(torch.isfinite(x).all()) for x in got)
                    row["checks"]["reduced"] = errors
                    row["max_rel_err"] = max(errors[n] for n in ("out", "dq", "dk", "dv"))
                    why = passes(errors, dtype_name) or (None if errors["finite"] else "NaN or Inf")
                    log(f"{tag} reduced check (N={red['N']}): " +
                        " ".join(f"{n} {errors[n]:.1e}" for n in ("out", "dq", "dk", "dv")))
                    if why:
                        row.update(status="wrong", message="reduced check: " + why)
                        log(f"{tag} WRONG ({why}): not timed")
                        continue

                    # 2. Full size: one random (batch, head, segment) per branch in float64.
                    q, k, v, dout = inputs(p, dtype, 2)
                    t0 = time.perf_counter()
                    got = fwd_bwd(q, k, v, dout, segs, rates, attn)
                    first_call = time.perf_counter() - t0
                    errors = spot_check(q, k, v, dout, *got, segs, rates, rng)
                    errors["finite"] = all(bool(torch.isfinite(x).all()) for x in got)
                    del got
                    row["checks"]["full_size_spot"] = errors
                    row["max_rel_err"] = max(row["max_rel_err"], *(errors[n] for n in ("out", "dq", "dk", "dv")))
                    why = passes(errors, dtype_name) or (None if errors["finite"] else "NaN or Inf")
                    log(f"{tag} full-size spot check ({errors['rows_checked']} rows): " +
                        " ".join(f"{n} {errors[n]:.1e}" for n in ("out", "dq", "dk", "dv")))
                    if why:
                        row.update(status="wrong", message="full-size spot check: " + why)
                        log(f"{tag} WRONG ({why}): not timed")
                        continue

                    budget = float(spec.get("max_call_seconds", 0) or 0)
                    if budget and first_call > budget:
                        row.update(status="skipped",
                                   message=f"checked, not timed: one forward+backward took {first_call:.1f} s "
                                           f"(> --peer-max-seconds {budget:g})")
                        log(f"{tag} {row['message']}")
                        continue

                    # 3. Timing. forward+backward = forward, then out.backward(dout); the checked call
                    # above was its first warm-up run. Forward alone runs under no_grad.
                    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
                    snapshot = cpu_snapshot()
                    fb, extra = [], 0
                    for it in range(warmup - 1 + repeats):
                        q.grad = k.grad = v.grad = None
                        gc.collect()
                        live = mem.start()
                        t0 = time.perf_counter()
                        out = composition(q, k, v, segs, rates, attn)
                        out.backward(dout)
                        t1 = time.perf_counter()
                        e = mem.extra(live)
                        if e is not None:
                            returned = sum(x.numel() * x.element_size() for x in (out, q.grad, k.grad, v.grad))
                            extra = max(extra, e - returned)
                        del out
                        if it >= warmup - 1:
                            fb.append((t1 - t0) * 1e3)
                    q.grad = k.grad = v.grad = None
                    row["fwdbwd_ms"] = summarize(fb)
                    row["fwdbwd_extra_bytes"] = extra if mem.ok else None
                    fwd, extra = [], 0
                    for it in range(warmup + repeats):
                        gc.collect()
                        live = mem.start()
                        t0 = time.perf_counter()
                        with torch.no_grad():
                            out = composition(q, k, v, segs, rates, attn)
                        t1 = time.perf_counter()
                        e = mem.extra(live)
                        if e is not None:
                            extra = max(extra, e - out.numel() * out.element_size())
                        del out
                        if it >= warmup:
                            fwd.append((t1 - t0) * 1e3)
                    row["fwd_ms"] = summarize(fwd)
                    row["fwd_extra_bytes"] = extra if mem.ok else None
                    row["contention"] = others_since(snapshot)
                    flops = p["forward_flops"]
                    log(f"{tag} forward {row['fwd_ms']['median']:.2f} ms "
                        f"({flops / row['fwd_ms']['median'] * 1e-6:.1f} GFLOP/s), forward+backward "
                        f"{row['fwdbwd_ms']['median']:.2f} ms "
                        f"({3.5 * flops / row['fwdbwd_ms']['median'] * 1e-6:.1f} GFLOP/s); other processes "
                        f"took {100 * row['contention']:.0f}% of the CPUs meanwhile")
                except Exception as e:  # noqa: BLE001 - a peer that cannot run is listed as an error
                    row.update(status="error", message=f"{type(e).__name__}: {e}".splitlines()[0])
                    log(f"{tag} ERROR: {row['message']}")
                finally:
                    gc.collect()

    print(json.dumps({"torch_version": version, "python": sys.executable, "threads": threads,
                      "memory_measured": mem.ok, "variants": variants, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
