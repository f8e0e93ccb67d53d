#!/usr/bin/env python3
"""Block-sparse attention on the GPU: dattn beside FlexAttention with the same block mask and SDPA
with a dense token mask (N = 2048 only), docs/benchmarks.md's block-sparse shapes, in one run.

Before timing, every implementation's output is compared with a float64 masked softmax on a
slice of the heads (N = 2048: all of them); one that disagrees is marked wrong. Times are CUDA-event
medians after warm-up (min, max too) over input sets rotated past L2, as in peers_gpu.py; FLOPs
count the allowed token pairs (4·B·H·pairs·D; fwd+bwd 3.5×); peak MB is the allocator's peak
above what was allocated before the inputs.

Then Hilbert-ordered dilated attention (the index map inside the kernels) beside the same call in
row-major order, with the locality each order gives (mean grid extent of a segment's tokens), and
the row-major order walked through an index map (the identity: the walk's own cost).

Usage: sparse_gpu.py [--shapes n2048,n65536] [--no-hilbert] [--json FILE] [--markdown FILE]
"""
import argparse
import datetime
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peers_gpu import Runner, rel_err  # noqa: E402

import dattn  # noqa: E402
from dattn.sparse import dilated_sparse_mask, local_window_mask  # noqa: E402

SHAPES = {  # name: (B, N, H, D, block, [(pattern label, mask builder)], dtypes)
    "n2048": (2, 2048, 12, 64, 64, [("local_window 256", lambda nb, bs: local_window_mask(nb, 256, bs))],
              [torch.float32, torch.bfloat16]),
    "n65536": (1, 65536, 12, 64, 128,
               [("local_window 2048", lambda nb, bs: local_window_mask(nb, 2048, bs)),
                ("dilated_sparse [1, 2, 4, 8, 16, 32]", lambda nb, bs: dilated_sparse_mask(nb, [1, 2, 4, 8, 16, 32]))],
               [torch.bfloat16]),
}
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}


def allowed_pairs(blocks, N, bs):
    sizes = torch.tensor([min(bs, N - i * bs) for i in range(blocks.size(0))], dtype=torch.float64)
    return float(sizes @ blocks.double() @ sizes)


def token_mask(blocks, N, bs, device, rows=None):
    """The [len(rows), N] token mask of the block mask (rows: all by default)."""
    rows = torch.arange(N, device=device) if rows is None else rows
    return blocks.to(device)[rows // bs][:, torch.arange(N, device=device) // bs]


def reference(q, k, v, tokens, rows):
    """float64 masked softmax of the query rows `rows`, [B, N, H, D] in, [B, len(rows), H, D] out."""
    q, k, v = (x.double().transpose(1, 2) for x in (q[:, rows], k, v))
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.size(-1))
    return (torch.softmax(s.masked_fill(~tokens, float("-inf")), -1) @ v).transpose(1, 2)


def make_flex(blocks, N, bs, device):
    """flex_attention with dattn's block mask: the allowed blocks themselves as its BlockMask where
    the block is flex's own (128), else a mask_mod over token positions."""
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
    token_blocks = blocks.to(device)
    if bs == 128:
        counts = token_blocks.sum(-1, dtype=torch.int32)
        order = torch.argsort((~token_blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        try:
            block_mask = BlockMask.from_kv_blocks(counts[None, None], order[None, None], BLOCK_SIZE=bs,
                                                  seq_lengths=(N, N))
        except TypeError:  # a torch without seq_lengths: N is a multiple of the block here
            block_mask = BlockMask.from_kv_blocks(counts[None, None], order[None, None], BLOCK_SIZE=bs)
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            return token_blocks[q_idx // bs, kv_idx // bs]

        block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=N, KV_LEN=N, device=device, _compile=True)
    compiled = torch.compile(flex_attention)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)  # [B, H, N, D]


def run_shape(name, args):
    B, N, H, D, bs, patterns, dtypes = SHAPES[name]
    nb = math.ceil(N / bs)
    rows = []
    for label, build in patterns:
        blocks = build(nb, bs)
        mask = dattn.block_sparse_mask(blocks, "cuda:0")
        flops = 4.0 * B * H * allowed_pairs(blocks, N, bs) * D
        density = blocks.double().mean().item()
        for dtype in dtypes:
            c = dict(B=B, N=N, H=H, D=D)
            R = Runner(c, dtype, args)
            impls = {"dattn block_sparse_attention": ("bnhd", lambda q, k, v: dattn.block_sparse_attention(q, k, v, mask, bs))}
            try:
                flex = make_flex(blocks, N, bs, R.dev)
                impls["FlexAttention, same block mask"] = ("bhnd", flex)
            except Exception as e:  # noqa: BLE001 - reported, not fatal
                rows.append(dict(impl="FlexAttention, same block mask", failed=str(e)[:160]))
            if N <= 4096:
                tokens = token_mask(blocks, N, bs, R.dev)
                impls["SDPA with a dense token mask"] = (
                    "bhnd", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=tokens))
            # Check on a slice (N = 2048: everything): the masked softmax in float64 of the first and
            # last 1024 query rows of one head.
            heads = H if N <= 4096 else 1
            check_rows = torch.arange(N, device=R.dev) if N <= 4096 else torch.cat(
                [torch.arange(1024, device=R.dev), torch.arange(N - 1024, N, device=R.dev)])
            q, k, v = R.inputs(seed=123)
            with torch.no_grad():
                ref = reference(q[:, :, :heads], k[:, :, :heads], v[:, :, :heads],
                                token_mask(blocks, N, bs, R.dev, check_rows), check_rows)
            errors = {}
            for impl, (layout, fn) in impls.items():
                try:
                    with torch.no_grad():
                        if layout == "bnhd":
                            out = fn(q, k, v)
                        else:
                            out = fn(*(x.transpose(1, 2).contiguous() for x in (q, k, v))).transpose(1, 2)
                    errors[impl] = rel_err(out[:, check_rows, :heads], ref)
                except Exception as e:  # noqa: BLE001
                    errors[impl] = f"{type(e).__name__}: {str(e)[:120]}"
            del q, k, v, ref
            torch.cuda.empty_cache()
            for impl, (layout, fn) in impls.items():
                row = dict(impl=impl, shape=name, pattern=label, density=density, dtype=str(dtype).split(".")[-1],
                           B=B, N=N, H=H, D=D, block=bs, check_rel_err=errors[impl])
                ok = isinstance(errors[impl], float) and errors[impl] <= 2 * TOLERANCE[dtype]
                if not ok:
                    row["wrong"] = True
                    rows.append(row)
                    print(f"  {impl} {label} {row['dtype']}: WRONG ({errors[impl]})", file=sys.stderr, flush=True)
                    continue
                try:
                    row.update(R.measure(impl, lambda: [tuple(R.inputs(layout, grad=True, seed=s)) for s in range(R.sets)],
                                         fn, flops))
                except Exception as e:  # noqa: BLE001
                    row["failed"] = f"{type(e).__name__}: {str(e)[:160]}"
                rows.append(row)
                print(f"  {impl} {label} {row['dtype']}: fwd {row.get('fwd', {}).get('ms')} ms, fwd+bwd "
                      f"{row.get('fwdbwd', {}).get('ms')} ms, peak {row.get('peak_mb', 0):.0f} MB", file=sys.stderr,
                      flush=True)
            torch.cuda.empty_cache()
    return rows


HILBERT = {  # name: (B, grid, H, D, segment_lengths, dilation_rates)
    "seed": (2, (32, 64), 12, 64, [512, 1024, 2048], [1, 2, 4]),
    "long64k": (1, (256, 256), 12, 64, [2048, 4096, 8192, 16384], [1, 2, 4, 8]),
}


def mean_extent(order, width, w, r):
    """Mean bounding box (grid rows, grid columns) of the tokens one segment of a branch selects,
    over the branches (branch i: offset i mod r_i), visiting the tokens in `order`."""
    N = order.numel()
    rows, cols, count = 0.0, 0.0, 0
    for i, (wi, ri) in enumerate(zip(w, r)):
        wi = min(wi, N)
        sel = order.view(-1, wi)[:, i % ri::ri] if N % wi == 0 else None
        if sel is None:
            continue
        y, x = sel // width, sel % width
        rows += (y.max(1).values - y.min(1).values + 1).double().sum().item()
        cols += (x.max(1).values - x.min(1).values + 1).double().sum().item()
        count += sel.size(0)
    return rows / count, cols / count


def run_hilbert(args):
    """Hilbert order (the index map inside the kernels) beside plain dilated attention, bf16."""
    from dattn.hilbert import hilbert_order
    rows = []
    for name, (B, grid, H, D, w, r) in HILBERT.items():
        N = grid[0] * grid[1]
        order = hilbert_order(N, grid)
        locality = dict(row_major=mean_extent(torch.arange(N), grid[1], w, r), hilbert=mean_extent(order, grid[1], w, r))
        R = Runner(dict(B=B, N=N, H=H, D=D), torch.bfloat16, args)
        flops = dattn._C.forward_flops(w, r, "grouped", False, B, N, H, D)
        # The identity index map (the Hilbert order of a 1 × N grid, dattn's own, so unchecked per call
        # like the Hilbert one) walks the row-major order through the index-map kernels: its cost over
        # row-major is the walk's own (lookups, one-row copies), the rest of Hilbert's is the order's.
        assert torch.equal(hilbert_order(N, (1, N)), torch.arange(N))
        impls = [("row_major", "dattn dilated_attention (row-major order)",
                  lambda q, k, v: dattn.dilated_attention(q, k, v, w, r)),
                 ("hilbert", "dattn hilbert_dilated_attention (index map)",
                  lambda q, k, v: dattn.hilbert_dilated_attention(q, k, v, w, r, grid_shape=grid)),
                 ("identity", "dattn hilbert_dilated_attention (identity index map)",
                  lambda q, k, v: dattn.hilbert_dilated_attention(q, k, v, w, r, grid_shape=(1, N)))]
        # Check: the index map equals attention over permuted copies, put back in place.
        q, k, v = R.inputs(seed=7)
        idx = order.to(R.dev)
        with torch.no_grad():
            got = next(fn for order_name, _, fn in impls if order_name == "hilbert")(q, k, v)
            ref = torch.empty_like(got)
            ref[:, idx] = dattn.dilated_attention(q[:, idx], k[:, idx], v[:, idx], w, r)
        err = rel_err(got, ref)
        del q, k, v, got, ref
        for order_name, impl, fn in impls:
            row = dict(impl=impl, shape=name, grid=list(grid), B=B, N=N, H=H, D=D, w=w, r=r, dtype="bfloat16",
                       check_rel_err=err if order_name == "hilbert" else None, order=order_name,
                       extent=locality["row_major" if order_name == "identity" else order_name])
            row.update(R.measure(impl, lambda: [tuple(R.inputs(grad=True, seed=s)) for s in range(R.sets)], fn, flops))
            rows.append(row)
            print(f"  {impl} {name}: fwd {row['fwd']['ms']:.3f} ms, fwd+bwd {row['fwdbwd']['ms']:.3f} ms",
                  file=sys.stderr, flush=True)
        torch.cuda.empty_cache()
    return rows


def hilbert_markdown(rows):
    lines = ["", "## Hilbert order beside row-major order (dilated attention, bf16, grouped mode)", "",
             "| config | order | check | fwd ms (min–max) | fwd+bwd ms (min–max) | fwd cost | fwd+bwd cost | "
             "segment extent (grid rows × cols) |", "|---|---|---|---|---|---|---|---|"]
    plain = None
    for r in rows:
        plain = r if r["order"] == "row_major" else plain
        f, fb = r["fwd"], r["fwdbwd"]
        h, wdt = r["extent"]
        check = "" if r["check_rel_err"] is None else f"{r['check_rel_err']:.1e}"
        cost = ("", "") if r is plain else (f"{100 * (f['ms'] / plain['fwd']['ms'] - 1):+.1f}%",
                                           f"{100 * (fb['ms'] / plain['fwdbwd']['ms'] - 1):+.1f}%")
        lines.append(f"| {r['shape']} B{r['B']} grid {r['grid'][0]}×{r['grid'][1]} H{r['H']} D{r['D']} w={r['w']} "
                     f"r={r['r']} | {r['order'].replace('_', '-')} | {check} | {f['ms']:.3f} ({f['min']:.3f}–{f['max']:.3f}) | "
                     f"{fb['ms']:.3f} ({fb['min']:.3f}–{fb['max']:.3f}) | {cost[0]} | {cost[1]} | {h:.1f} × {wdt:.1f} |")
    return "\n".join(lines) + "\n"


def markdown(rows, device):
    lines = [f"# Block-sparse attention on {device}, {datetime.date.today()} (bench/gpu/sparse_gpu.py)", "",
             "Medians of CUDA-event timings (min–max); TFLOP/s over allowed pairs (fwd+bwd 3.5× fwd); "
             "check = relative error against a float64 masked softmax.", "",
             "| impl | shape | pattern (density) | dtype | check | fwd ms (min–max) | fwd TFLOP/s | "
             "fwd+bwd ms (min–max) | fwd+bwd TFLOP/s | peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shape = f"B{r.get('B')} N{r.get('N')} H{r.get('H')} D{r.get('D')} block {r.get('block')}"
        err = r.get("check_rel_err")
        check = f"{err:.1e}" if isinstance(err, float) else str(err)
        head = f"| {r['impl']} | {shape} | {r.get('pattern')} ({100 * r.get('density', 0):.1f}%) | {r.get('dtype')} | {check}"
        if r.get("wrong") or r.get("failed"):
            lines.append(head + f" | {'wrong' if r.get('wrong') else r['failed']} | | | | |")
            continue
        f, fb = r["fwd"], r["fwdbwd"]
        lines.append(head + f" | {f['ms']:.3f} ({f['min']:.3f}–{f['max']:.3f}) | {r['flops'] / f['ms'] / 1e9:.0f} | "
                     f"{fb['ms']:.3f} ({fb['min']:.3f}–{fb['max']:.3f}) | {3.5 * r['flops'] / fb['ms'] / 1e9:.0f} | "
                     f"{r['peak_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main():
    # Every shape, dtype and grad mode is a recompile of flex_attention; past dynamo's default limit
    # (8) it falls back to the unfused path that materialises N² scores.
    torch._dynamo.config.recompile_limit = 64
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="n2048,n65536")
    ap.add_argument("--no-hilbert", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    args = ap.parse_args()
    rows = []
    for name in filter(None, args.shapes.split(",")):  # --shapes "": the Hilbert rows only
        rows += run_shape(name, args)
    hilbert = [] if args.no_hilbert else run_hilbert(args)
    device = torch.cuda.get_device_name()
    text = markdown(rows, device) + (hilbert_markdown(hilbert) if hilbert else "")
    print(text)
    if args.markdown:
        open(args.markdown, "w").write(text)
    if args.json:
        json.dump(dict(device=device, date=str(datetime.date.today()), torch=torch.__version__, rows=rows,
                       hilbert=hilbert),
                  open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
