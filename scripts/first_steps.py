#!/usr/bin/env python
"""Where ours' first training steps spend their host time (a diagnostic, not a benchmark).

Loads the prepared checkpoint the way the benchmarks do (`bench_scaling.py prepare` first), runs `--steps` steps and
samples every Python thread's stack (the main thread and the autograd engine's, where the checkpointed layers'
backwards run) every `--interval` seconds during each step, times its phases (forward, backward, optimizer, each
ended by a device sync) and Triton's compilations per thread. Writes `<out>/first_steps.json` and prints, per step,
its times and the frames seen most often: the innermost frame, and the innermost frame of our own code.

    python scripts/bench_scaling.py prepare --model qwen2_5_vl_7b --seq 2048
    python scripts/first_steps.py --model qwen2_5_vl_7b --seq 2048 --patches '{"cuda_graphs_capture": "second_forward"}'
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_scaling as bs  # noqa: E402
from triton_compiles import CompileTimer  # noqa: E402,F401  (re-exported: tests use fs.CompileTimer)


class StackSampler:
    """Counts, per sample and thread, the innermost frame and the innermost frame under `ours` (a path part)."""

    def __init__(self, interval: float, ours: str = "hf_fastvision") -> None:
        self.interval, self.ours = interval, ours
        self.inner: collections.Counter[str] = collections.Counter()
        self.own: collections.Counter[str] = collections.Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> StackSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.interval):
            self.samples += 1
            for ident, frame in sys._current_frames().items():
                if ident == me or frame is None:
                    continue
                self.inner[_where(frame)] += 1
                f = frame
                while f is not None and self.ours not in f.f_code.co_filename:
                    f = f.f_back
                if f is not None:
                    self.own[_where(f)] += 1

    def top(self, n: int) -> dict[str, list[tuple[str, float]]]:
        scale = self.interval  # seconds per sample
        return {"innermost": [(k, round(v * scale, 3)) for k, v in self.inner.most_common(n)],
                "innermost_of_ours": [(k, round(v * scale, 3)) for k, v in self.own.most_common(n)]}


def _where(frame) -> str:
    code = frame.f_code
    parts = Path(code.co_filename).parts
    return f"{'/'.join(parts[-2:])}:{frame.f_lineno}:{code.co_name}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bs.add_checkpoint_args(p)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--patches", default="true", help="JSON for from_pretrained(patches=...)")
    p.add_argument("--interval", type=float, default=0.005)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default="first_steps_out")
    args = p.parse_args(argv)

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    model = bs._load(args, patches=json.loads(args.patches))
    load_s = time.perf_counter() - t0
    batch = bs._batch(args, device)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    model.train()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    steps = []
    for i in range(args.steps):
        sync()
        with StackSampler(args.interval) as sampler, CompileTimer() as compiles:
            marks = [time.perf_counter()]
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = model(**batch).loss
            sync()
            marks.append(time.perf_counter())
            loss.backward()
            sync()
            marks.append(time.perf_counter())
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            marks.append(time.perf_counter())
        phases = {name: round(b - a, 3) for name, a, b in zip(("forward", "backward", "optimizer"), marks, marks[1:])}
        step_s = marks[-1] - marks[0]
        steps.append({"step": i + 1, "seconds": round(step_s, 3), "phases": phases, "triton": compiles.summary(),
                      "samples": sampler.samples, **sampler.top(args.top)})
        triton_s = steps[-1]["triton"]
        print(f"step {i + 1}: {step_s:.3f} s {phases}; Triton compiles {triton_s['compiles']} in "
              f"{triton_s['seconds']} s {triton_s['seconds_by_thread']}", flush=True)
        for kind in ("innermost_of_ours", "innermost"):
            for where, secs in steps[-1][kind][:12]:
                print(f"  {kind:17s} {secs:8.3f} s  {where}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "first_steps.json").write_text(json.dumps({"load_s": round(load_s, 2), "patches": args.patches,
                                                      "steps": steps}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
