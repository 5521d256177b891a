#!/usr/bin/env python
"""Where one system's load time goes, per phase (a diagnostic, not a benchmark).

Loads the prepared checkpoint (`bench_scaling.py prepare` first) the way `bench_qlora.py` loads it for `--system`
(`ours` or `hf`, imports in the bench worker's order), under cProfile, and prints the phase times and, per phase,
the functions with the most cumulative and own time. Writes `<out>/load_<system>.json`. One system per process, as
in the bench: run it once per system.

    python scripts/bench_scaling.py prepare --model qwen2_5_vl_7b --seq 2048
    python scripts/profile_load.py --model qwen2_5_vl_7b --system ours
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def _top(profile: cProfile.Profile, key: str, n: int) -> list[tuple[str, int, float, float]]:
    """(function, calls, own s, cumulative s) of the `n` entries with the most `key` ("cumulative"/"tottime")."""
    stats = pstats.Stats(profile)
    rows = []
    for (filename, line, name), (_cc, calls, tottime, cumtime, _callers) in stats.stats.items():
        where = f"{'/'.join(Path(filename).parts[-2:])}:{line}:{name}"
        rows.append((where, calls, round(tottime, 4), round(cumtime, 4)))
    rows.sort(key=lambda r: r[3] if key == "cumulative" else r[2], reverse=True)
    return rows[:n]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2_5_vl_7b")
    p.add_argument("--system", choices=["ours", "hf"], default="ours")
    p.add_argument("--workdir", default=None)
    p.add_argument("--max-seq", dest="max_seq", type=int, default=8192)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default="profile_load_out")
    args = p.parse_args(argv)
    if args.system == "ours":
        import hf_fastvision  # noqa: F401  (first, as the bench worker imports it)
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch

    import bench_qlora as bq

    work = Path(args.workdir or f"/tmp/bench_qlora_{args.model}")
    folder = str(work / "model")
    plan = json.loads((work / "plan.json").read_text())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.hf_upcast = "on"
    profiles: dict[str, cProfile.Profile] = {}
    current: list[cProfile.Profile] = []
    real_part = bq._load_part

    def part(name: str) -> None:  # close this phase's profile at each bench phase mark, start the next one's
        current[0].disable()
        real_part(name)
        profiles[name] = current[0]
        current[0] = cProfile.Profile()
        current[0].enable()

    bq._load_part = part
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    bq._LOAD_T0[:] = [t0]
    current.append(cProfile.Profile())
    current[0].enable()
    if args.system == "ours":
        bq._load_ours(folder, args, device)
    else:
        bq._load_hf(folder, args, device, plan)
    current[0].disable()
    total = time.perf_counter() - t0
    report = {"system": args.system, "model": args.model, "load_s": round(total, 3), "phases": dict(bq._LOAD_PARTS),
              "splits": dict(bq._LOAD_SPLITS),
              "top": {name: {"cumulative": _top(prof, "cumulative", args.top), "own": _top(prof, "tottime", args.top)}
                      for name, prof in profiles.items()}}
    out = Path(args.out)  # written before printing: a reader that closes stdout early must not lose it
    out.mkdir(parents=True, exist_ok=True)
    (out / f"load_{args.system}.json").write_text(json.dumps(report, indent=1))
    print(f"[{args.system}] load {total:.2f} s, cumulative s at each phase end: {bq._LOAD_PARTS}")
    for name, tops in report["top"].items():
        for kind in ("cumulative", "own"):
            print(f"-- {name}: by {kind} time (function, calls, own s, cumulative s)")
            for row in tops[kind]:
                print(f"   {row[0][:90]:90s} {row[1]:7d} {row[2]:8.3f} {row[3]:8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
