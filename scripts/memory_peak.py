#!/usr/bin/env python
"""What is alive on the GPU at our QLoRA step's peak of allocated memory (GPU only; a diagnostic).

Why: on Llama-3.2-11B-Vision we allocate 1.5 GiB more than Unsloth at seq 2048 (10.63 vs 9.09 GiB; ~0.9 GiB of it
goes away with ``cuda_graphs`` off), and the benchmark's peak numbers cannot say which tensors make the peak.

How: loads the benchmark checkpoint like `profile_step.py` (bench_scaling's loader: same folder, batch, LoRA),
records the CUDA caching allocator's history (`torch.cuda.memory._record_memory_history`) from before the first
step (the CUDA-graph capture steps included) through ``--steps`` steps, replays the alloc/free events to find the
moment of the highest live total, and groups the blocks alive then by the innermost frame in our code,
transformers, peft, bitsandbytes or torch.optim. Writes ``<out>/memory_peak.md`` (a table, largest first) and
``memory_peak.json``; prints the top rows.

    python scripts/bench_qlora.py --model llama32_11b_vision --systems ours --steps 2   # builds the folder
    python scripts/memory_peak.py --model llama32_11b_vision --seq 2048 --out /tmp/mem
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

OURS = ("hf_fastvision", "transformers", "peft", "bitsandbytes", "torch/optim", "torch/utils/checkpoint")


def site_of(frames: list[dict[str, Any]]) -> str:
    """The innermost frame of interest (``file:line:function``), else the innermost frame, else ``?``."""
    for f in frames:
        name = str(f.get("filename", ""))
        if any(part in name for part in OURS):
            short = name.split("site-packages/")[-1].split("/work/main/")[-1]
            return f"{short}:{f.get('line', '?')}:{f.get('name', '?')}"
    if frames:
        f = frames[0]
        return f"{str(f.get('filename', '?')).rsplit('/', 1)[-1]}:{f.get('line', '?')}:{f.get('name', '?')}"
    return "?"


def peak_composition(events: list[dict[str, Any]]) -> tuple[int, int, dict[str, list[int]], list[dict[str, Any]]]:
    """Replay ``alloc`` / ``free_requested`` events: ``(peak bytes over the trace, index of the event that reached
    it, {site: [bytes, blocks]} of the blocks alive at that moment, those blocks' alloc events)``. Blocks allocated
    before the trace began are not in it (the caller adds ``memory_allocated()`` at the start)."""
    live: dict[int, int] = {}
    total = peak = 0
    at = -1
    for i, e in enumerate(events):
        action, addr, size = e.get("action"), e.get("addr"), int(e.get("size", 0))
        if action == "alloc":
            live[addr] = size
            total += size
            if total > peak:
                peak, at = total, i
        elif action == "free_requested" and addr in live:
            total -= live.pop(addr)
    alive: dict[int, dict[str, Any]] = {}
    for e in events[: at + 1]:
        if e.get("action") == "alloc":
            alive[e["addr"]] = e
        elif e.get("action") == "free_requested":
            alive.pop(e.get("addr"), None)
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for e in alive.values():
        g = groups[site_of(e.get("frames", []))]
        g[0] += int(e.get("size", 0))
        g[1] += 1
    return peak, at, dict(groups), list(alive.values())


def reserved_by_pool(segments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The allocator snapshot's segments summed per memory pool and stream: ``[{pool, stream, reserved,
    allocated, segments, largest_free}]`` in bytes, largest first. Pool ``(0, 0)`` is the default caching pool;
    any other id is a CUDA graph's private pool (what `max_memory_allocated` does not see while the graphs
    replay). The caching allocator never lends a block cached for one stream to another, so reserved memory split
    over streams (the offload's side stream, a capture stream) is memory the compute stream cannot reuse;
    ``largest_free`` is the biggest free block of that group (fragmentation shows as many small ones)."""
    pools: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for seg in segments:
        key = (str(tuple(seg.get("segment_pool_id", (0, 0)))), int(seg.get("stream", 0)))
        group = pools[key]
        group[0] += int(seg.get("total_size", 0))
        group[1] += int(seg.get("allocated_size", 0))
        group[2] += 1
        free = [int(b.get("size", 0)) for b in seg.get("blocks", []) if b.get("state") != "active_allocated"]
        group[3] = max([group[3], *free])
    return [{"pool": pool, "stream": stream, "reserved": r, "allocated": a, "segments": n, "largest_free": f}
            for (pool, stream), (r, a, n, f) in sorted(pools.items(), key=lambda kv: -kv[1][0])]


def common_stacks(alive: list[dict[str, Any]], site: str, top: int = 2) -> list[tuple[int, int, list[str]]]:
    """The ``top`` call stacks (frames of ours / transformers / peft / torch.autograd, innermost first) that
    allocated the live blocks of ``site``, as ``(bytes, blocks, frames)``, largest first: who made them."""
    stacks: dict[tuple[str, ...], list[int]] = defaultdict(lambda: [0, 0])
    for e in alive:
        frames = e.get("frames", [])
        if site_of(frames) != site:
            continue
        key = tuple(f"{str(f.get('filename', '?')).split('site-packages/')[-1].split('/work/main/')[-1]}:"
                    f"{f.get('line', '?')}:{f.get('name', '?')}" for f in frames
                    if any(part in str(f.get("filename", "")) for part in (*OURS, "torch/autograd")))[:14]
        stacks[key][0] += int(e.get("size", 0))
        stacks[key][1] += 1
    ranked = sorted(stacks.items(), key=lambda kv: -kv[1][0])[:top]
    return [(b, n, list(k)) for k, (b, n) in ranked]


def saved_by(root: Any, ptr: int, limit: int = 200_000) -> list[str]:
    """Autograd nodes reachable from ``root`` (a ``grad_fn``) that save a tensor on storage ``ptr``: their names
    and the saved attribute (``_saved_self``, ...) or ``saved_tensors`` of custom Functions."""
    import torch

    found, seen, stack = [], set(), [root]
    while stack and len(seen) < limit:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        names = [a for a in dir(node) if a.startswith("_saved_")]
        values = [(a, getattr(node, a, None)) for a in names]
        try:
            values += [(f"saved_tensors[{i}]", t) for i, t in enumerate(getattr(node, "saved_tensors", ()) or ())]
        except RuntimeError:  # already freed
            pass
        for attr, value in values:
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() == ptr:
                found.append(f"{type(node).__name__}.{attr}")
        stack.extend(n for n, _ in getattr(node, "next_functions", ()) if n is not None)
    return found


def probe_holders(model: Any, batch: dict, module_suffix: str) -> dict[str, Any]:
    """After a forward (before backward), is the output of the module named ``*module_suffix`` still alive, and
    who holds it: Python referrers by type, and the autograd nodes that save it."""
    import gc
    import weakref

    import torch

    target = next((m for n, m in model.named_modules() if n.endswith(module_suffix)), None)
    if target is None:
        return {"module": module_suffix, "error": "no such module"}
    refs: dict[str, Any] = {}

    def hook(_m, _a, out):
        t = out if isinstance(out, torch.Tensor) else getattr(out, "last_hidden_state", None)
        if isinstance(t, torch.Tensor):
            refs["out"] = weakref.ref(t)
            refs["ptr"] = t.untyped_storage().data_ptr()
            refs["desc"] = f"{tuple(t.shape)} {t.dtype}"

    handle = target.register_forward_hook(hook)
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
    finally:
        handle.remove()
    gc.collect()
    alive = refs.get("out") is not None and refs["out"]() is not None
    report: dict[str, Any] = {"module": module_suffix, "output": refs.get("desc"), "alive_after_forward": alive}
    if alive:
        report["python_referrers"] = sorted({type(r).__name__ for r in gc.get_referrers(refs["out"]())})
    if "ptr" in refs:
        report["saved_by_autograd"] = saved_by(loss.grad_fn, refs["ptr"])
    loss.backward()
    model.zero_grad(set_to_none=True)
    return report


def main(argv: list[str] | None = None) -> int:
    import bench_scaling as bs

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bs.add_checkpoint_args(p)
    p.add_argument("--steps", type=int, default=4, help="steps recorded from the first (captures included)")
    p.add_argument("--patches", default=None, help="JSON dict of patch flags for ours (e.g. cuda_graphs off)")
    p.add_argument("--rows", type=int, default=30)
    p.add_argument("--out", default="memory_out")
    p.add_argument("--probe", nargs="*", default=[],
                   help="module name suffixes (e.g. vision_model): is their output alive after forward, and who holds it")
    args = p.parse_args(argv)

    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kw = {"patches": json.loads(args.patches)} if args.patches else {}
    model = bs._load(args, **kw)
    batch = bs._batch(args, torch.device("cuda"))
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.lr)
    model.train()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python", max_entries=2_000_000)
    step_peaks, own_peaks, max_alloc, max_reserved = [], [], 0, 0
    for i in range(args.steps):  # bench_qlora's loop: the output lives through backward and the optimizer step
        torch.cuda.reset_peak_memory_stats()  # each step's own peak (the capture step vs the steady steps)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            result = model(**batch)
        loss = result.loss
        loss.backward()
        opt.step()
        if i < 2:  # the bench's gradient check, same temporaries
            norms = [q.grad.detach().float().norm() for q in opt.param_groups[0]["params"] if q.grad is not None]
            if norms:
                torch.stack(norms).norm().item()
        opt.zero_grad(set_to_none=True)
        del result, loss
        torch.cuda.synchronize()
        own = torch.cuda.max_memory_allocated()
        max_alloc, max_reserved = max(max_alloc, own), max(max_reserved, torch.cuda.max_memory_reserved())
        own_peaks.append(round(own / 1024**3, 3))
        step_peaks.append(round(max_alloc / 1024**3, 3))
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    events = [e for trace in snapshot.get("device_traces", []) for e in trace]
    peak, at, groups, alive = peak_composition(events)
    rows = sorted(groups.items(), key=lambda kv: -kv[1][0])
    gib = 1024**3
    summary = {
        "device": torch.cuda.get_device_name(), "model": args.model, "seq": args.seq, "patches": args.patches,
        "allocated_before_steps_gib": round(base / gib, 3), "trace_peak_gib": round(peak / gib, 3),
        "peak_gib": round((base + peak) / gib, 3),
        "max_memory_allocated_gib": round(max_alloc / gib, 3),
        "max_memory_reserved_gib": round(max_reserved / gib, 3),
        "events": len(events), "peak_event": at, "max_allocated_after_each_step_gib": step_peaks,
        "peak_of_each_step_gib": own_peaks,
        "peak_stack": [f"{str(f.get('filename', '?')).split('site-packages/')[-1]}:{f.get('line', '?')}:"
                       f"{f.get('name', '?')}" for f in (events[at].get("frames", []) if at >= 0 else [])[:40]],
        "sites": [{"site": s, "gib": round(b / gib, 4), "blocks": n} for s, (b, n) in rows[: args.rows]],
    }
    summary["reserved_by_pool_gib"] = [{**p, "reserved": round(p["reserved"] / gib, 3),
                                        "allocated": round(p["allocated"] / gib, 3),
                                        "largest_free": round(p["largest_free"] / gib, 3)}
                                       for p in reserved_by_pool(snapshot.get("segments", []))]
    summary["stacks"] = {s: [{"gib": round(b / gib, 4), "blocks": n, "frames": f} for b, n, f in
                             common_stacks(alive, s)] for s, _ in rows[:2]}
    summary["probes"] = [probe_holders(model, batch, name) for name in args.probe]
    (out / "memory_peak.json").write_text(json.dumps(summary, indent=1))
    lines = [f"# live blocks at the peak: {args.model} seq {args.seq}, patches {args.patches or 'default'}", "",
             f"before the steps (weights, adapters): {summary['allocated_before_steps_gib']} GiB; peak of the trace "
             f"+{summary['trace_peak_gib']} GiB = {summary['peak_gib']} GiB (max_memory_allocated "
             f"{summary['max_memory_allocated_gib']}, reserved {summary['max_memory_reserved_gib']}; after each step "
             f"{step_peaks}; each step's own peak {own_peaks})", "",
             "| site (innermost frame of ours / transformers / peft / bnb / optim) | GiB | blocks |", "|---|---|---|"]
    lines += [f"| `{r['site']}` | {r['gib']} | {r['blocks']} |" for r in summary["sites"]]
    lines += ["", "reserved at the end, by pool and stream ((0, 0): the default cache; others: CUDA graph pools):", "",
              "| pool | stream | reserved (GiB) | allocated (GiB) | segments | largest free block (GiB) |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {p['pool']} | {p['stream']} | {p['reserved']} | {p['allocated']} | {p['segments']} | "
              f"{p['largest_free']} |"
              for p in summary["reserved_by_pool_gib"]]
    lines += ["", "the allocation that reached the peak (innermost first):", ""]
    lines += [f"- `{f}`" for f in summary["peak_stack"] if "/torch/nn/modules/module.py" not in f]
    for site, ranked in summary["stacks"].items():
        for entry in ranked:
            lines += ["", f"who allocated {entry['blocks']} live blocks ({entry['gib']} GiB) of `{site}`:", ""]
            lines += [f"- `{f}`" for f in entry["frames"]]
    for probe in summary["probes"]:
        lines += ["", f"probe `{probe['module']}`: {json.dumps({k: v for k, v in probe.items() if k != 'module'})}"]
    (out / "memory_peak.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:12 + 15]))
    print("\n".join(line for line in lines if line.startswith("| (")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
