"""Peer of dattn-bench --sparse: torch's scaled_dot_product_attention with a dense token mask
built from dattn's block mask (read from --mask: nb × nb bytes, 1 = allowed), timed on the CPU.
Checks its output against a float64 masked softmax first; prints one JSON object."""

import argparse
import json
import statistics
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    for name in ("B", "N", "H", "D", "block", "repeats", "warmup", "threads"):
        ap.add_argument(f"--{name}", type=int, required=True)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], required=True)
    ap.add_argument("--mask", required=True)
    a = ap.parse_args()
    try:
        import torch
        import torch.nn.functional as F
    except Exception as e:  # noqa: BLE001 - no torch: no peer
        print(json.dumps({"skipped": f"torch is not importable ({e})"}))
        return
    if not hasattr(F, "scaled_dot_product_attention"):
        print(json.dumps({"skipped": f"torch {torch.__version__} has no scaled_dot_product_attention"}))
        return
    torch.set_num_threads(a.threads)
    nb = (a.N + a.block - 1) // a.block
    blocks = torch.frombuffer(bytearray(open(a.mask, "rb").read()), dtype=torch.uint8).view(nb, nb).bool()
    token_mask = blocks.repeat_interleave(a.block, 0).repeat_interleave(a.block, 1)[:a.N, :a.N]
    dtype = getattr(torch, a.dtype)
    g = torch.Generator().manual_seed(1)
    q, k, v, grad = (torch.randn(a.B, a.H, a.N, a.D, generator=g) for _ in range(4))

    # Check: the masked softmax in float64.
    scores = (q.double() @ k.double().transpose(-1, -2)) / a.D ** 0.5
    ref = torch.softmax(scores.masked_fill(~token_mask, float("-inf")), -1) @ v.double()
    out = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=token_mask)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    del scores, ref

    qd, kd, vd = (x.to(dtype).requires_grad_() for x in (q, k, v))
    gd = grad.to(dtype)

    def fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(qd, kd, vd, attn_mask=token_mask)

    def fwdbwd():
        F.scaled_dot_product_attention(qd, kd, vd, attn_mask=token_mask).backward(gd)

    result = {"torch_version": torch.__version__, "max_rel_err": err}
    for name, fn in (("fwd_ms", fwd), ("fwdbwd_ms", fwdbwd)):
        samples = []
        for i in range(a.warmup + a.repeats):
            t0 = time.perf_counter()
            fn()
            if i >= a.warmup:
                samples.append(1e3 * (time.perf_counter() - t0))
        result[name] = {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
                        "samples": samples}
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
