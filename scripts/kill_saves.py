#!/usr/bin/env python
"""SIGKILL every writer at random instants of its whole duration and check that no save is ever half-lost.

    python scripts/kill_saves.py [--kills 40] [--seed 0] [--writers adapter,merged_16bit,...] [--csv out.csv]

Each writer (LoRA adapter, merged 16-bit, merged 4-bit, `quantize --local-dir`) is measured once unkilled, then
run in a forked child that is killed after a delay drawn uniformly over 1.2x that duration. Scenarios cycle
through a fresh destination, replacing an earlier save of ours (folder swap), and replacing it in a folder that
also holds the user's files (files written beside theirs). After each kill the script checks, in order:

* **half-written**: the destination holds something that is neither the earlier save nor the new one, complete
  (a missing destination between the two renames of a swap is not half-written: the next save or load finishes
  the swap, which the next check exercises);
* **lost**: after `writer.recover` (what the next save or load runs first) the destination is neither the earlier
  save nor the new one, complete, or the user's own file changed;
* **leftovers**: after one more (unkilled) save, temporary entries of ours remain beside or inside it.

It prints one row per writer and exits 1 if any count is non-zero. Tiny random models on the CPU; no Hub.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_FASTVISION_DISABLE_TRITON", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

try:
    import hf_fastvision  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from hf_fastvision import writer  # noqa: E402

WRITERS = ("adapter", "merged_16bit", "merged_4bit", "quantize_local_dir")
SCENARIOS = ("fresh", "replace", "replace_beside_user_files")
USER_FILE = "train.jsonl"


def fingerprint(folder: Path) -> dict[str, str] | None:
    """sha256 of every file of a save (our manifest excluded), or None when the folder is absent."""
    if not folder.is_dir():
        return None
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel != writer.MANIFEST and rel != USER_FILE:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def leftovers(dest: Path) -> list[str]:
    siblings, inside = writer._pending(dest)
    lock = writer._lock_path(dest)
    return sorted(p.name for p in [*siblings, *inside, *([lock] if lock.exists() else [])])


@dataclass
class Case:
    """One writer: `save(dest, version)` writes version "old" or "new" of the model's save into `dest`."""

    name: str
    save: Callable[[Path, str], Any]
    duration: float = 0.0
    references: dict[str, dict[str, str] | None] = field(default_factory=dict)


def build_cases(root: Path, names: list[str]) -> list[Case]:
    from hf_fastvision import FastVisionModel
    from hf_fastvision.archs.tiny import tiny_model_and_processor
    from hf_fastvision.quantize import quantize_and_publish
    from hf_fastvision.training.saving import save_adapter, save_merged_4bit, save_merged_16bit

    source = root / "tiny-source"
    tiny, processor = tiny_model_and_processor("qwen2_5_vl", seed=0)
    tiny.save_pretrained(source)
    processor.save_pretrained(source)
    model, processor = FastVisionModel.from_pretrained(str(source))
    model = FastVisionModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]

    def set_version(version: str) -> None:
        gen = torch.Generator().manual_seed(1 if version == "old" else 2)
        with torch.no_grad():
            for p in lora_b:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)

    def adapter(dest: Path, version: str) -> None:
        set_version(version)
        save_adapter(model, dest, processor)

    def merged16(dest: Path, version: str) -> None:
        set_version(version)
        save_merged_16bit(model, dest, processor, dtype=torch.float32)

    def merged4(dest: Path, version: str) -> None:
        set_version(version)
        save_merged_4bit(model, dest, processor, dtype=torch.float32)

    versions = {"old": root / "src-old", "new": root / "src-new"}
    if "quantize_local_dir" in names:  # two different 16-bit sources: old and new quantize to different folders
        for version, folder in versions.items():
            set_version(version)
            save_merged_16bit(model, folder, processor, dtype=torch.float32)

    def quantize(dest: Path, version: str) -> None:
        quantize_and_publish(str(versions[version]), local_dir=dest, compute_dtype="float32", progress=False,
                             base_model="tiny-org/qwen2_5_vl")

    table = {"adapter": adapter, "merged_16bit": merged16, "merged_4bit": merged4, "quantize_local_dir": quantize}
    return [Case(n, table[n]) for n in names]


def calibrate(case: Case, root: Path) -> None:
    for version in ("old", "new"):
        ref = root / f"ref-{case.name}-{version}" / "out"  # the same name as the destination (cards name it)
        start = time.perf_counter()
        case.save(ref, version)
        case.duration = max(case.duration, time.perf_counter() - start)
        case.references[version] = fingerprint(ref)
    # The kills hit forked children, which run slower than the parent (copy-on-write faults): time one of them.
    again = root / f"ref-{case.name}-again" / "out"
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        case.save(again, "new")
        os._exit(0)
    os.waitpid(pid, 0)
    case.duration = max(case.duration, time.perf_counter() - start)
    if fingerprint(again) != case.references["new"]:
        raise SystemExit(f"{case.name}: two saves of the same model differ; the check needs deterministic saves")


def prepare(case: Case, scenario: str, dest: Path, root: Path) -> None:
    if dest.parent.exists():
        shutil.rmtree(dest.parent)
    dest.parent.mkdir(parents=True)
    if scenario != "fresh":
        shutil.copytree(root / f"ref-{case.name}-old" / "out", dest)
    if scenario == "replace_beside_user_files":
        (dest / USER_FILE).write_text('{"messages": []}\n')


def kill_once(case: Case, scenario: str, dest: Path, delay: float) -> None:
    pid = os.fork()
    if pid == 0:  # child: save, then leave without running the parent's atexit handlers
        code = 0
        try:
            case.save(dest, "new")
        except BaseException:
            code = 1
        os._exit(code)
    time.sleep(delay)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


def run(names: list[str], kills: int, seed: int, root: Path, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    torch.set_num_threads(1)  # forked children must not inherit a busy intra-op pool
    rng = random.Random(seed)
    cases = build_cases(root, names)
    rows = []
    for case in cases:
        calibrate(case, root)
        old, new = case.references["old"], case.references["new"]
        counts = {"kills": 0, "half_written": 0, "earlier_lost": 0, "leftovers": 0, "user_file_changed": 0,
                  "ended_old": 0, "ended_new": 0, "ended_absent": 0}
        for i in range(kills):
            scenario = SCENARIOS[i % len(SCENARIOS)]
            dest = root / "kill" / "out"
            prepare(case, scenario, dest, root)
            kill_once(case, scenario, dest, rng.uniform(0, 1.2 * case.duration))
            counts["kills"] += 1
            now = fingerprint(dest)
            if now is not None and now not in (old, new):
                if scenario != "replace_beside_user_files":  # beside mode finishes its per-file moves on recover
                    counts["half_written"] += 1
            writer.recover(dest)
            after = fingerprint(dest)
            allowed = (new, None) if scenario == "fresh" else (old, new)
            if after not in allowed:
                counts["half_written" if scenario == "fresh" else "earlier_lost"] += 1
                log(f"  {case.name} kill {i} ({scenario}): after recovery the destination is "
                    f"{'absent' if after is None else sorted(after)}; around it: {leftovers(dest)}; "
                    f"beside: {sorted(p.name for p in dest.parent.iterdir())}")
            if scenario == "replace_beside_user_files" and (dest / USER_FILE).read_text() != '{"messages": []}\n':
                counts["user_file_changed"] += 1
            counts["ended_" + ("absent" if after is None else "old" if after == old else "new")] += 1
            case.save(dest, "new")
            if leftovers(dest) or fingerprint(dest) != new:
                counts["leftovers"] += 1
        row = {"writer": case.name, "duration_s": round(case.duration, 3), **counts}
        log(" ".join(f"{k}={v}" for k, v in row.items()))
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=50, help="kills per writer (default 50: 200 over the four writers)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--writers", default=",".join(WRITERS), help=f"comma-separated subset of {', '.join(WRITERS)}")
    p.add_argument("--csv", default=None, help="also write the table as CSV here")
    args = p.parse_args(argv)
    names = [n for n in args.writers.split(",") if n]
    unknown = sorted(set(names) - set(WRITERS))
    if unknown or args.kills < 1:
        p.error(f"unknown writers {unknown}; choose from {', '.join(WRITERS)}" if unknown else "--kills must be >= 1")
    with tempfile.TemporaryDirectory(prefix="kill_saves_") as tmp:
        rows = run(names, args.kills, args.seed, Path(tmp), log=lambda s: print(s, flush=True))
    cols = list(rows[0])
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
    bad = sum(r["half_written"] + r["earlier_lost"] + r["leftovers"] + r["user_file_changed"] for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
