#!/usr/bin/env python
"""4-bit weight dequantization: `kernels.nf4_dequantize` vs bitsandbytes' `dequantize_4bit`, GPU only.

For each text-layer projection shape of Llama-3.2-11B-Vision and Qwen2.5-VL-7B and the vision MLP of Mllama
(nf4, double-quantized scales, bf16 compute, block size 64: the load plan of the benchmark), checks that the two
give the same bits, then times both (median of ``triton.testing.do_bench``; bitsandbytes' call includes its
``.to(compute dtype)``, a no-op) and reports the speed-up and the bandwidth each moves (packed + scales read,
16-bit written). Writes ``<out>/nf4_dequantize.md`` and ``.csv``.

    python scripts/bench_nf4_dequantize.py --out /tmp/deq
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

SHAPES = {  # (out, in)
    "llama q/o": (4096, 4096),
    "llama k/v": (1024, 4096),
    "llama gate/up": (14336, 4096),
    "llama down": (4096, 14336),
    "mllama vision fc1": (5120, 1280),
    "qwen gate/up": (18944, 3584),
    "qwen down": (3584, 18944),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_nf4_dequantize_out")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("bench_nf4_dequantize.py needs a CUDA GPU", file=sys.stderr)
        return 1
    import bitsandbytes.functional as bnbf
    import triton.testing

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from hf_fastvision.kernels.nf4_dequantize import nf4_dequantize, nf4_dequantize_ref, supports

    torch.manual_seed(0)
    rows = []
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
        packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        state.dtype = torch.bfloat16
        assert supports(packed, state)
        same = torch.equal(nf4_dequantize(packed, state).view(torch.int16),
                           nf4_dequantize_ref(packed, state).view(torch.int16))
        ours = triton.testing.do_bench(lambda: nf4_dequantize(packed, state), warmup=25, rep=200)
        ref = triton.testing.do_bench(lambda: nf4_dequantize_ref(packed, state), warmup=25, rep=200)
        moved = n * k * (0.5 + 2) + n * k / 64  # bytes: codes read, bf16 written, 8-bit scales read
        rows.append({"shape": name, "out": n, "in": k, "same_bits": same, "ours_us": round(ours * 1e3, 1),
                     "bnb_us": round(ref * 1e3, 1), "speedup": round(ref / ours, 2),
                     "ours_TBps": round(moved / ours / 1e9, 2), "bnb_TBps": round(moved / ref / 1e9, 2)})
        print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "nf4_dequantize.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    head = f"# nf4 dequantization, {torch.cuda.get_device_name()}, torch {torch.__version__}\n\n"
    table = "| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n"
    table += "".join("| " + " | ".join(str(v) for v in r.values()) + " |\n" for r in rows)
    (out / "nf4_dequantize.md").write_text(head + table)
    print(head + table)
    return 0 if all(r["same_bits"] for r in rows) else 2


if __name__ == "__main__":
    raise SystemExit(main())
