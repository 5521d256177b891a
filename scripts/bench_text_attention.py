#!/usr/bin/env python
"""Causal text self-attention per SDPA backend: which kernel the language layers should take (GPU diagnostic).

Why: in the Llama-3.2-11B-Vision QLoRA step at 8192 tokens the text self-attention (32 layers, 32 query heads,
8 key/value heads, head_dim 128, `is_causal`, no mask) runs on cuDNN, and its forward reaches about half the rate
of its backward: 2.0 ms per call against 2.8 ms for 2.5x the work (`scripts/results/h200_2026-12-01g_profile_8192/`;
~275 against ~490 TFLOPS counted causally). The forward runs twice per step (forward and the checkpointed
recompute), so a faster forward kernel is worth up to ~60 ms of a 1.37 s step. This script times, per backend,
the forward alone (as the recompute runs it: grad enabled) and forward + backward, with the key/value heads
passed as they are (`enable_gqa=True`, what transformers does) and repeated to the query heads, and checks each
output and input gradient against the default dispatch.

    python scripts/bench_text_attention.py --seqs 2048 8192 --out /tmp/ta            # GPU
    python scripts/bench_text_attention.py --device cpu --seqs 64 --heads 4 --kv-heads 2 --head-dim 16 --repeats 1
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

BACKENDS = ("default", "cudnn", "flash", "efficient", "math")


def _variants(device: str) -> list[tuple[str, str, bool]]:
    """(name, backend, repeat key/value heads): every GPU backend both ways; the math backend alone on CPU."""
    backends = BACKENDS if device == "cuda" else ("default", "math")
    return [(f"{b}_{'repeat' if r else 'gqa'}", b, r) for b in backends for r in (False, True)]


def attend(q, k, v, backend: str, repeat: bool):
    """One causal SDPA call on `backend` ("default": torch's own dispatch)."""
    import contextlib

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if repeat:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    names = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
    ctx = sdpa_kernel(getattr(SDPBackend, names[backend])) if backend in names else contextlib.nullcontext()
    with ctx:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=not repeat)


def causal_flops(batch: int, heads: int, seq: int, head_dim: int) -> float:
    """Forward FLOPs of causal attention (QK^T and PV over the lower triangle); the backward is 2.5x this."""
    return 4.0 * batch * heads * seq * seq * head_dim / 2


def _timed(fn, repeats: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(seq: int, args) -> list[dict]:
    import torch

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def make(heads: int):
        return torch.randn(args.batch, heads, seq, args.head_dim, generator=gen).to(device, dtype)

    q, k, v = make(args.heads), make(args.kv_heads), make(args.kv_heads)
    grad = torch.randn_like(q)

    def forward_backward(backend: str, repeat: bool):
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out = attend(*leaves, backend, repeat)
        out.backward(grad)
        return out.detach(), [t.grad for t in leaves]

    ref_out, ref_grads = forward_backward("default", False)
    flops = causal_flops(args.batch, args.heads, seq, args.head_dim)
    rows = []
    for name, backend, repeat in _variants(device.type):
        row = {"seq": seq, "variant": name}
        try:
            out, grads = forward_backward(backend, repeat)
            row["max_err_out"] = float((out.float() - ref_out.float()).abs().max())
            row["max_err_grad"] = max(float((g.float() - r.float()).abs().max()) for g, r in zip(grads, ref_grads))
            leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
            call = functools.partial(attend, *leaves, backend, repeat)
            fwd = _timed(call, args.repeats, sync)
            both = _timed(lambda call=call: call().backward(grad), args.repeats, sync)
            row.update(fwd_ms=fwd * 1e3, fwd_bwd_ms=both * 1e3, fwd_tflops=flops / fwd / 1e12,
                       fwd_bwd_tflops=3.5 * flops / both / 1e12, status="ok")
        except Exception as exc:  # a backend that refuses this shape or dtype
            row.update(status=f"unsupported: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}")
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| seq | variant | fwd (ms) | fwd TFLOPS | fwd+bwd (ms) | fwd+bwd TFLOPS | max err out / grad | status |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['seq']} | {r['variant']} | - | - | - | - | - | {r['status']} |")
            continue
        lines.append(f"| {r['seq']} | {r['variant']} | {r['fwd_ms']:.3f} | {r['fwd_tflops']:.0f} | "
                     f"{r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_tflops']:.0f} | "
                     f"{r['max_err_out']:.2e} / {r['max_err_grad']:.2e} | ok |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.heads % args.kv_heads:
        p.error("--heads must be a multiple of --kv-heads")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device: pass --device cpu for the exactness check on the math backend")
    rows = [r for seq in args.seqs for r in run(seq, args)]
    text = table(rows)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
                "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "batch": args.batch}
        (out / "text_attention.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (out / "text_attention.md").write_text(f"# causal text self-attention per SDPA backend\n\n{meta}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
