#!/usr/bin/env python
"""Few-row 4-bit matmul (decode steps): `kernels.nf4_matmul` vs what bitsandbytes' Linear4bit runs, GPU only.

For each Qwen2.5-VL-7B text projection shape and each row count (the decode batch), times ``nf4_matmul`` and
``bitsandbytes.matmul_4bit`` (median of ``triton.testing.do_bench``), reports the speed-up, the effective weight
bandwidth of ours (packed bytes / time) and the largest error of each against a dequantize + fp32 matmul.
Writes ``<out>/nf4_matmul.md`` and ``.csv``.

    python scripts/bench_nf4_matmul.py --rows 1 8 16 --out /tmp/nf4
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

SHAPES = {  # (out, in) of Qwen2.5-VL-7B's text layers
    "q_proj/o_proj": (3584, 3584),
    "k_proj/v_proj": (512, 3584),
    "gate_proj/up_proj": (18944, 3584),
    "down_proj": (3584, 18944),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--out", default="bench_nf4_out")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("bench_nf4_matmul.py needs a CUDA GPU", file=sys.stderr)
        return 1
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    import triton
    import triton.testing

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from hf_fastvision.kernels.nf4_matmul import nf4_matmul

    torch.manual_seed(0)
    rows_out = []
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
        packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        w_deq = bnbf.dequantize_4bit(packed, state).float()
        for m in args.rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ w_deq.t()
            ours = lambda: nf4_matmul(x, packed, state)  # noqa: E731
            theirs = lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state)  # noqa: E731 - as Linear4bit calls it
            errs = [float(((f().float() - ref).abs().max() / ref.abs().max())) for f in (ours, theirs)]
            t_ours = triton.testing.do_bench(ours, warmup=25, rep=100, return_mode="median")
            t_bnb = triton.testing.do_bench(theirs, warmup=25, rep=100, return_mode="median")
            gbs = (n * k / 2) / (t_ours * 1e-3) / 1e9
            rows_out.append(dict(shape=f"{name} [{n}x{k}]", rows=m, ours_us=round(t_ours * 1e3, 1),
                                 bnb_us=round(t_bnb * 1e3, 1), speedup=round(t_bnb / t_ours, 2),
                                 ours_weight_GBps=round(gbs, 0), ours_rel_err=f"{errs[0]:.2e}",
                                 bnb_rel_err=f"{errs[1]:.2e}"))
            print(rows_out[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    head = list(rows_out[0])
    lines = [f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
             f"bitsandbytes {bnb.__version__}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r[h]) for h in head) + " |" for r in rows_out]
    (out / "nf4_matmul.md").write_text("\n".join(lines) + "\n")
    with open(out / "nf4_matmul.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=head)
        writer.writeheader()
        writer.writerows(rows_out)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
