#!/usr/bin/env python
"""Where one QLoRA training step of ours spends its time (GPU only; a diagnostic, not a benchmark).

Uses bench_scaling's loader (the same checkpoint folder, batch and LoRA set-up as the benchmarks), runs
`--warmup` steps, then profiles `--steps` steps with torch.profiler and writes:

- `<out>/profile_summary.json`: wall time per step vs the GPU's busy time (sum of kernel time on the compute
  stream) — when wall >> busy the step is bound by the host (Python, launches, syncs), not by the GPU;
- `<out>/profile_cpu.txt`, `<out>/profile_cuda.txt`: the top ops by self CPU time and by CUDA time;
- `<out>/trace.json.gz` with `--trace`.

    python scripts/bench_scaling.py prepare --seq 2048 --batch 1
    python scripts/profile_step.py --seq 2048 --batch 1 --out /tmp/prof
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_scaling as bs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bs.add_checkpoint_args(p)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--trace", action="store_true")
    p.add_argument("--out", default="profile_out")
    args = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = bs._load(args)
    batch = bs._batch(args, torch.device("cuda"))
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    model.train()

    def step() -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    walls = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=False) as prof:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - t0)
    events = prof.key_averages()
    def device_us(e) -> float:
        return getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))

    # kernels (and memcpys) are the device-side events; summing every event's self device time would count a
    # kernel twice, once as itself and once under the aten op that launched it (what gpu_busy_upper_s reports)
    kernels = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")]
    cuda_us = sum(device_us(e) for e in kernels) if kernels else sum(device_us(e) for e in events)
    cuda_upper_us = sum(device_us(e) for e in events)
    cpu_us = sum(e.self_cpu_time_total for e in events)
    n_kernels = sum(e.count for e in kernels) if kernels else sum(e.count for e in events if device_us(e) > 0)
    summary = {
        "device": torch.cuda.get_device_name(), "seq": args.seq, "batch": args.batch, "gc": args.gc,
        "wall_s_per_step": [round(w, 4) for w in walls],
        "gpu_busy_s_per_step": round(cuda_us / 1e6 / args.steps, 4),
        "gpu_busy_upper_s_per_step": round(cuda_upper_us / 1e6 / args.steps, 4),
        "cpu_self_s_per_step": round(cpu_us / 1e6 / args.steps, 4),
        "device_op_events_per_step": n_kernels // max(args.steps, 1),
    }
    (out / "profile_summary.json").write_text(json.dumps(summary, indent=1))
    (out / "profile_cpu.txt").write_text(events.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70))
    sort_cuda = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    (out / "profile_cuda.txt").write_text(events.table(sort_by=sort_cuda, row_limit=40, max_name_column_width=70))
    if args.trace:
        prof.export_chrome_trace(str(out / "trace.json"))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
