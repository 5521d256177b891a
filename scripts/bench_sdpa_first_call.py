#!/usr/bin/env python
"""What each SDPA backend costs on its first call and after, at the attention shapes of the benchmark models.

cuDNN attention builds an execution plan on the first call per shape, and part of that lands in the CUDA JIT cache
(``CUDA_CACHE_PATH``): on a machine's first run it is slow, later runs read the cache. FlashAttention and the
memory-efficient kernels ship compiled. Per backend this runs one process with an empty CUDA JIT cache ("cold"),
then a second one on that cache ("warm"); each times, per shape, its first forward+backward (host-synced) and the
median of the next `--repeats`. Prints a Markdown table and writes `<out>/sdpa_first_call.{md,json}`.

    python scripts/bench_sdpa_first_call.py --out /tmp/sdpa
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name: (batch, heads, kv_heads, tokens, head_dim, causal)
SHAPES = {
    "qwen_vision_window": (16, 16, 16, 64, 80, False),  # Qwen2.5-VL-7B windowed layers, 448x448 image
    "qwen_vision_full": (1, 16, 16, 1024, 80, False),  # its full-attention layers
    "qwen_vision_full_6400": (1, 16, 16, 6400, 80, False),  # a 1120x1120 image
    "mllama_vision_4_tiles": (1, 16, 16, 6432, 80, False),  # Llama-3.2-11B-Vision, 4 tiles
    "qwen_text_2048": (1, 28, 4, 2048, 128, True),  # Qwen2.5-VL-7B text, GQA
}
BACKENDS = ("default", "cudnn", "flash", "efficient")


def _child(backend: str, repeats: int) -> dict[str, dict[str, float | str]]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"cudnn": [SDPBackend.CUDNN_ATTENTION], "flash": [SDPBackend.FLASH_ATTENTION],
              "efficient": [SDPBackend.EFFICIENT_ATTENTION]}.get(backend)
    torch.ones(64, 64, device="cuda") @ torch.ones(64, 64, device="cuda")  # context and cuBLAS up first
    torch.cuda.synchronize()
    out: dict[str, dict[str, float | str]] = {}
    for name, (b, h, kvh, n, d, causal) in SHAPES.items():
        q = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(b, kvh, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(b, kvh, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        if kvh != h and backend in ("flash", "efficient"):  # no GQA there: expand, as the stock path does
            k, v = (t.detach().repeat_interleave(h // kvh, dim=1).requires_grad_() for t in (k, v))
        kw = {"enable_gqa": True} if kvh != h and k.shape[1] != h else {}

        def step() -> None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, **kw)
            o.backward(torch.ones_like(o))

        try:
            times = []
            for _ in range(repeats + 1):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                if chosen is None:
                    step()
                else:
                    with sdpa_kernel(chosen):
                        step()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            out[name] = {"first_ms": round(times[0] * 1e3, 2), "steady_ms": round(statistics.median(times[1:]) * 1e3, 3)}
        except RuntimeError as exc:
            out[name] = {"error": str(exc).splitlines()[0][:120]}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default="sdpa_first_call_out")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.repeats)))
        return 0
    results: dict[str, dict[str, dict]] = {}
    for backend in args.backends:
        cache = tempfile.mkdtemp(prefix=f"nvcache_{backend}_")
        for run in ("cold", "warm"):
            env = dict(os.environ, CUDA_CACHE_PATH=cache)
            proc = subprocess.run([sys.executable, __file__, "--child", backend, "--repeats", str(args.repeats)],
                                  env=env, capture_output=True, text=True, timeout=300)
            last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "{}"
            results[f"{backend}_{run}"] = json.loads(last) if proc.returncode == 0 else {"error": proc.stderr[-300:]}
    lines = ["| backend | run | " + " | ".join(SHAPES) + " |", "|---|---|" + "---|" * len(SHAPES)]
    for key, per_shape in results.items():
        backend, run = key.rsplit("_", 1)
        cells = []
        for name in SHAPES:
            r = per_shape.get(name, {})
            cells.append(f"{r['first_ms']} / {r['steady_ms']}" if "first_ms" in r else str(r.get("error", "-"))[:40])
        lines.append(f"| {backend} | {run} | " + " | ".join(cells) + " |")
    md = ("first fwd+bwd ms / steady fwd+bwd ms (median of the next repeats), bf16; cold = empty CUDA JIT cache\n\n"
          + "\n".join(lines))
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sdpa_first_call.md").write_text(md + "\n")
    (out / "sdpa_first_call.json").write_text(json.dumps({"shapes": SHAPES, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
