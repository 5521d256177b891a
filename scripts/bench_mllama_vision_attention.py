#!/usr/bin/env python
"""Mllama's vision attention: the masked SDPA call as transformers makes it, against an exact split without a mask.

Why: on an H200 the Llama-3.2-11B-Vision QLoRA step is GPU-bound after CUDA graphs, and cuDNN's masked SDPA
kernels (forward, recompute and backward of 40 vision layers over 4 tiles x 1608 patches, head_dim 80) take 36% of
its GPU time (`scripts/results/h200_2026-12-01b_profile_llama/`). Mllama's mask has a special form:
``mask[i, j] = min`` exactly when patch i *and* patch j are padding (`_prepare_aspect_ratio_attention_mask`), so

- a real patch's query attends to every key, with no mask;
- a padding patch's query attends to the real keys only, with no mask.

Two maskless calls (which may take the flash kernels) on gathered rows compute the same function; on an image
using 1 of 4 tiles they also do 44% of the work. This script times, forward + backward, per variant:
`sdpa_masked` (what the model does), `sdpa_masked_efficient` (the same call forced onto the mem-efficient
backend), `split` (the two maskless calls on gathered rows: a host sync for the counts), `varlen_split` (the same
split as one static-shape flash varlen call: `archs/_mllama_vision_attention.split_attention`, what the
`vision_attention_split` patch runs), and
checks each against an fp32 reference. Results decide whether
the split becomes a patch (`archs/`), which also has to live with CUDA graphs (the gathered sizes depend on the
image's tiles, known when the batch is built).

    python scripts/bench_mllama_vision_attention.py --tiles 1 4 --out /tmp/mva      # GPU
    python scripts/bench_mllama_vision_attention.py --patches 40 --heads 2 --repeats 1   # CPU: exactness only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def gather_split_attention(q, k, v, real, scale):
    """Exact Mllama vision attention without a mask: real queries over all keys, padding queries over real keys."""
    import torch
    import torch.nn.functional as F

    out = torch.empty_like(q)
    out[:, :, real] = F.scaled_dot_product_attention(q[:, :, real], k, v, scale=scale)
    if (~real).any():
        out[:, :, ~real] = F.scaled_dot_product_attention(q[:, :, ~real], k[:, :, real], v[:, :, real], scale=scale)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiles", type=int, nargs="+", default=[1, 4], help="valid tiles of 4")
    p.add_argument("--patches", type=int, default=1601)
    p.add_argument("--padded", type=int, default=7)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=80)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from hf_fastvision.archs._mllama_vision_attention import split_attention, vision_mask

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    scale = args.head_dim**-0.5
    rows = []
    for tiles in args.tiles:
        mask, real = vision_mask([tiles], 4, args.patches, args.padded, dtype, device)
        length = real.numel()
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(1, args.heads, length, args.head_dim, device=device, dtype=dtype, generator=g)
                   for _ in range(3))
        grad = torch.randn(q.shape, device=device, dtype=dtype, generator=g)
        with torch.no_grad():
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.float(), scale=scale)

        def masked():
            return F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale)

        def masked_efficient():
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                return F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale)

        def split():
            return gather_split_attention(qq, kk, vv, real[0], scale)

        def varlen_split():  # what the patch runs
            return split_attention(qq, kk, vv, real, scale)

        variants = {"sdpa_masked": masked, "split": split, "varlen_split": varlen_split}  # CPU: a torch varlen
        if cuda:
            variants["sdpa_masked_efficient"] = masked_efficient
        for name, fn in variants.items():
            qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
            row = {"tiles": tiles, "tokens": length, "variant": name}
            try:
                out = fn()
                row["max_abs_err_vs_fp32"] = float((out.float() - ref).abs().max())
                times = []
                for _ in range(args.repeats):
                    if cuda:
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    out = fn()
                    out.backward(grad)
                    if cuda:
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                row["fwd_bwd_ms"] = round(1000 * statistics.median(times), 3)
                row["status"] = "ok"
            except Exception as exc:  # noqa: BLE001 - a backend that refuses the call is a result
                row["status"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            print(json.dumps(row), flush=True)
            rows.append(row)
    head = f"{torch.cuda.get_device_name() if cuda else 'CPU'}, torch {torch.__version__}, {dtype}"
    lines = [head, "", "| valid tiles | tokens | variant | fwd+bwd (ms) | max abs err vs fp32 | status |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['tiles']} | {r['tokens']} | {r['variant']} | {r.get('fwd_bwd_ms', '')} | "
              f"{r.get('max_abs_err_vs_fp32', '')} | {r['status']} |" for r in rows]
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "mllama_vision_attention.md").write_text("\n".join(lines) + "\n")
    bad = [r for r in rows if r["status"] == "ok" and r["max_abs_err_vs_fp32"] > (5e-2 if cuda else 1e-4)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
