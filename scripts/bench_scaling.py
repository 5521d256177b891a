#!/usr/bin/env python
"""Multi-GPU QLoRA: DDP throughput scaling (1 vs 2 GPUs), model split over 2 GPUs (`max_memory`), FSDP + QLoRA.

Random-weight Qwen2.5-VL-7B built from the real config embedded in `bench_qlora.py` (same checkpoint folder, same
seeded batch builder, same LoRA settings: r=16, alpha=16, attention + MLP of vision and language layers, bf16,
"unsloth" checkpointing). GPU only; never run as a test.

    # one command: prepare, 1-GPU, 2-GPU DDP (torchrun), max-memory split, FSDP; prints a table, writes CSV/JSON
    python scripts/bench_scaling.py all --seq 2048 --batch 1 --steps 8 --out /tmp/scaling

    # or the pieces by hand
    python scripts/bench_scaling.py prepare --seq 2048 --batch 1
    python scripts/bench_scaling.py ddp --seq 2048 --batch 1                         # 1 GPU baseline
    torchrun --standalone --nproc_per_node 2 scripts/bench_scaling.py ddp --seq 2048 --batch 1
    python scripts/bench_scaling.py max-memory --max-memory 0=3GiB 1=70GiB --steps 6
    torchrun --standalone --nproc_per_node 2 scripts/bench_scaling.py fsdp --seq 2048 --batch 1

ddp: every rank trains on its own copy with the same per-GPU batch; tokens/s counts all ranks' tokens; scaling
efficiency = tokens/s(2 GPUs) / (2 x tokens/s(1 GPU)). Step time: median of steps 3..N (CUDA synchronized, after a
barrier). max-memory: one process, `device_map="auto"` with a small budget on GPU 0 so the layers spill onto GPU 1;
passes when every loss is finite and the last is below the first. fsdp: 4-bit weights stored as bf16
(`quant_storage="bfloat16"`, checked by `hf_fastvision.distributed.check_fsdp_qlora`), torch FSDP (FULL_SHARD,
`use_orig_params=False`, peft's `fsdp_auto_wrap_policy`: LoRA linears and decoder/vision blocks are units);
reports every rank's local bytes of 4-bit weights before and after sharding.

On the GPU machine (which cannot download anything) begin with
    mkdir -p /tmp/site && tar -C /tmp/site -xzf .devkit/site.tar.gz && \
        export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1;
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(HERE), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import bench_qlora as bq  # noqa: E402  (stdlib-only at import time: configs, batch builder, checkpoint prep)

GIB = bq.GIB


# ----------------------------------------------------------------------------------------------------------
def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """The arguments `_load` / `_batch` read (shared by profile_step.py and memory_peak.py)."""
    p.add_argument("--model", default="qwen2_5_vl_7b")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--gc", default="unsloth")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--workdir", default=None)


def _workdir(args) -> Path:
    return Path(args.workdir or f"/tmp/bench_qlora_{args.model}" + (f"_l{args.layers}" if args.layers else ""))


def _prep_namespace(args) -> argparse.Namespace:
    return argparse.Namespace(model=args.model, layers=args.layers, workdir=str(_workdir(args)), rebuild=args.rebuild,
                              seqs=[args.seq], batch=args.batch)


def cmd_prepare(args) -> int:
    """The seeded random-weight checkpoint and batch (bench_qlora's; reused when its fingerprint matches)."""
    import torch

    info = bq.prepare(_prep_namespace(args), "cuda" if torch.cuda.is_available() else "cpu")
    print(json.dumps({k: v for k, v in info.items() if k != "plan"}, default=str))
    return 0


def _batch(args, device: Any) -> dict[str, Any]:
    import torch

    batches = torch.load(_workdir(args) / "batches.pt")
    if args.seq not in batches or next(iter(batches[args.seq].values())).shape[0] != args.batch:
        raise SystemExit(f"no prepared batch for seq={args.seq} batch={args.batch}: run `prepare` with the same flags")
    return {k: v.to(device) for k, v in batches[args.seq].items()}


def _load(args, **kw: Any):
    import torch

    from hf_fastvision import FastVisionModel

    model, _ = FastVisionModel.from_pretrained(
        str(_workdir(args) / "model"), max_seq_length=max(args.seq, 2048), load_in_4bit=True, dtype=torch.bfloat16,
        use_gradient_checkpointing={"true": True, "false": False}.get(args.gc, args.gc), **kw,
    )
    return FastVisionModel.get_peft_model(
        model, r=bq.LORA_R, lora_alpha=bq.LORA_ALPHA, lora_dropout=0.0, random_state=bq.SEED,
        finetune_vision_layers=True, finetune_language_layers=True,
        finetune_attention_modules=True, finetune_mlp_modules=True,
    )


def _steps(model, batch, args, *, sync, barrier=lambda: None) -> tuple[list[float], list[float]]:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    model.train()
    times, losses = [], []
    for i in range(args.steps):
        barrier()
        sync()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach().float()))
        print(f"[rank {os.environ.get('RANK', '0')}] step {i + 1}: {times[-1]:.3f} s loss {losses[-1]:.4f}", flush=True)
    return times, losses


def _median_tail(times: list[float]) -> float:
    tail = times[2:] if len(times) >= 3 else times
    return statistics.median(tail)


def _mean_tail(times: list[float]) -> float:
    """Mean of steps 3..N: total tokens over total time, the throughput a long run sees (steps vary +-20%)."""
    tail = times[2:] if len(times) >= 3 else times
    return statistics.fmean(tail)


def _write(args, name: str, row: dict[str, Any]) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(row, indent=1, default=str))
    print(json.dumps(row, default=str), flush=True)


# ----------------------------------------------------------------------------------------------------------
def cmd_ddp(args) -> int:
    """1 process: plain QLoRA step. Under torchrun (WORLD_SIZE>1): DistributedDataParallel over NCCL."""
    import torch
    import torch.distributed as dist

    from hf_fastvision.distributed import barrier, on_main_process, world_info

    info = world_info()
    if info.distributed:
        dist.init_process_group("nccl", device_id=torch.device("cuda", info.local_rank))
    torch.cuda.set_device(info.local_rank)
    torch.cuda.reset_peak_memory_stats()
    model = _load(args)  # default device map: {"": LOCAL_RANK} under torchrun
    batch = _batch(args, torch.device("cuda", info.local_rank))
    train = model
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # static_graph: checkpointed layers re-run their forward in backward; with a fixed graph DDP handles that
        # (and the frozen 4-bit weights) without find_unused_parameters' extra traversal.
        train = DDP(model, device_ids=[info.local_rank], static_graph=args.static_graph,
                    find_unused_parameters=not args.static_graph, broadcast_buffers=False)
    times, losses = _steps(train, batch, args, sync=torch.cuda.synchronize, barrier=barrier)
    peak = torch.cuda.max_memory_allocated() / GIB
    peaks = [peak]
    if info.distributed:
        peaks = [None] * info.world_size
        dist.all_gather_object(peaks, peak)
    step_s = _median_tail(times)
    tokens = args.batch * args.seq * info.world_size
    row = {"mode": f"ddp_{info.world_size}gpu", "gpus": info.world_size, "seq": args.seq, "per_gpu_batch": args.batch,
           "step_s": step_s, "tokens_per_s": tokens / step_s, "step_mean_s": _mean_tail(times),
           "tokens_per_s_mean": tokens / _mean_tail(times), "peak_gib_per_rank": peaks, "losses": losses,
           "steps_s": times, "device": torch.cuda.get_device_name(info.local_rank)}
    on_main_process(_write, args, row["mode"], row)
    if info.distributed:
        dist.destroy_process_group()
    return 0


def _parse_max_memory(items: list[str]) -> dict[Any, str]:
    out: dict[Any, str] = {}
    for item in items:
        key, _, value = item.partition("=")
        out[int(key) if key.isdigit() else key] = value
    return out


def cmd_max_memory(args) -> int:
    """One process, the model split over GPUs 0 and 1 by accelerate's `device_map="auto"` + `max_memory`."""
    import torch

    max_memory = _parse_max_memory(args.max_memory)
    model = _load(args, device_map="auto", max_memory=max_memory)
    base = model.get_base_model()
    device_map = getattr(base, "hf_device_map", {}) or {}
    devices = sorted({str(d) for d in device_map.values()})
    first = base.get_input_embeddings().weight.device
    batch = _batch(args, first)
    for i in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(i)

    def sync():
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)

    times, losses = _steps(model, batch, args, sync=sync)
    ok = all(math.isfinite(x) for x in losses) and len(losses) >= 2 and losses[-1] < losses[0]
    row = {"mode": "max_memory", "max_memory": max_memory, "devices_used": devices,
           "modules_per_device": {d: sum(1 for v in device_map.values() if str(v) == d) for d in devices},
           "peak_gib_per_gpu": [torch.cuda.max_memory_allocated(i) / GIB for i in range(torch.cuda.device_count())],
           "step_s": _median_tail(times), "tokens_per_s": args.batch * args.seq / _median_tail(times),
           "losses": losses, "finite_and_decreasing": ok, "spans_two_gpus": len(devices) >= 2}
    _write(args, "max_memory", row)
    return 0 if ok and row["spans_two_gpus"] else 1


def _four_bit_bytes(model) -> int:
    """Local bytes of 4-bit weights (Params4bit, or FSDP flat-parameter shards holding them) on this rank."""
    import bitsandbytes as bnb

    total = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and type(module.weight).__name__ == "Params4bit":
            total += module.weight.numel() * module.weight.element_size()
    return total


def _sharded_four_bit_bytes(fsdp_model) -> int:
    """Bytes of this rank's FlatParameter shards that belong to Linear4bit weights (FSDP1, use_orig_params=False)."""
    import bitsandbytes as bnb
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    total = 0
    for unit in fsdp_model.modules():
        if not isinstance(unit, FSDP):
            continue
        handle = getattr(unit, "_handle", None)
        flat = getattr(handle, "flat_param", None) if handle is not None else None
        if flat is None:
            continue
        for fqn, info in zip(flat._fqns, flat._shard_param_infos):
            owner_path, _, pname = fqn.rpartition(".")
            try:
                owner = unit.module.get_submodule(owner_path) if owner_path else unit.module
            except AttributeError:
                continue
            if pname == "weight" and isinstance(owner, bnb.nn.Linear4bit) and info.in_shard:
                total += int(info.numel_in_shard) * flat.element_size()
    return total


def cmd_fsdp(args) -> int:
    """FSDP + QLoRA under torchrun: 4-bit weights in bf16 storage, sharded across ranks."""
    import functools

    import torch
    import torch.distributed as dist
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    from hf_fastvision.distributed import barrier, check_fsdp_qlora, on_main_process, world_info

    info = world_info()
    if not info.distributed:
        raise SystemExit("fsdp mode runs under torchrun --nproc_per_node 2 (or more)")
    dist.init_process_group("nccl", device_id=torch.device("cuda", info.local_rank))
    torch.cuda.set_device(info.local_rank)
    model = _load(args, quant_storage="bfloat16")
    check_fsdp_qlora(model)  # raises, naming the fix, if the 4-bit storage differs from bf16
    before = _four_bit_bytes(model)
    mem_before = torch.cuda.memory_allocated() / GIB
    wrapped = FSDP(
        model, auto_wrap_policy=fsdp_auto_wrap_policy(model), sharding_strategy=ShardingStrategy.FULL_SHARD,
        device_id=torch.cuda.current_device(), use_orig_params=False, limit_all_gathers=True, sync_module_states=False,
    )
    torch.cuda.empty_cache()
    after = _sharded_four_bit_bytes(wrapped)
    mem_after = torch.cuda.memory_allocated() / GIB
    torch.cuda.reset_peak_memory_stats()
    batch = _batch(args, torch.device("cuda", info.local_rank))
    times, losses = _steps(wrapped, batch, args, sync=torch.cuda.synchronize, barrier=barrier)
    local = {"rank": info.rank, "four_bit_bytes_unsharded": before, "four_bit_bytes_shard": after,
             "allocated_gib_before_wrap": mem_before, "allocated_gib_after_wrap": mem_after,
             "peak_gib_steps": torch.cuda.max_memory_allocated() / GIB}
    per_rank: list[Any] = [None] * info.world_size
    dist.all_gather_object(per_rank, local)
    step_s = _median_tail(times)
    ok = all(math.isfinite(x) for x in losses)
    row = {"mode": f"fsdp_{info.world_size}gpu", "gpus": info.world_size, "seq": args.seq, "per_gpu_batch": args.batch,
           "step_s": step_s, "tokens_per_s": args.batch * args.seq * info.world_size / step_s, "per_rank": per_rank,
           "losses": losses, "finite": ok, "quant_storage": "bfloat16"}
    on_main_process(functools.partial(_write, args, row["mode"], row))
    dist.destroy_process_group()
    return 0 if ok else 1


# ----------------------------------------------------------------------------------------------------------
def _common_flags(args) -> list[str]:
    flags = ["--model", args.model, "--seq", str(args.seq), "--batch", str(args.batch), "--steps", str(args.steps),
             "--lr", str(args.lr), "--gc", args.gc, "--out", args.out, "--workdir", str(_workdir(args))]
    if args.layers:
        flags += ["--layers", str(args.layers)]
    if not args.static_graph:
        flags.append("--no-static-graph")
    return flags


def cmd_all(args) -> int:
    """Every mode in its own process (an OOM or crash is a row, not the end of the run); then the table."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    me = [sys.executable, str(Path(__file__).resolve())]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    flags = _common_flags(args)
    runs = [("prepare", me + ["prepare"] + flags), ("ddp_1gpu", me + ["ddp"] + flags),
            ("ddp_2gpu", torchrun + [str(Path(__file__).resolve()), "ddp"] + flags),
            ("max_memory", me + ["max-memory", "--max-memory", *args.max_memory] + flags),
            ("fsdp_2gpu", torchrun + [str(Path(__file__).resolve()), "fsdp"] + flags)]
    status: dict[str, str] = {}
    for name, cmd in runs:
        if args.only and name != "prepare" and name not in args.only:
            continue
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        env_run = dict(env, CUDA_VISIBLE_DEVICES="0") if name == "ddp_1gpu" else env
        try:
            rc = subprocess.run(cmd, env=env_run, timeout=args.timeout).returncode
            status[name] = "ok" if rc == 0 else f"exit {rc}"
        except subprocess.TimeoutExpired:
            status[name] = f"timeout {args.timeout:.0f}s"
        if name == "prepare" and status[name] != "ok":
            print("prepare failed", flush=True)
            return 1
    return report(args, status)


def report(args, status: dict[str, str] | None = None) -> int:
    out = Path(args.out)
    rows = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.stem != "summary"}
    one = rows.get("ddp_1gpu", {}).get("tokens_per_s")
    one_mean = rows.get("ddp_1gpu", {}).get("tokens_per_s_mean")
    lines = ["| mode | GPUs | step s (median) | tokens/s | scaling eff. | eff. from mean step | peak GiB per GPU "
             "| 4-bit bytes per rank | losses | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    csv_rows = []
    for name in ("ddp_1gpu", "ddp_2gpu", "max_memory", "fsdp_2gpu"):
        r = rows.get(name)
        st = (status or {}).get(name, "ok" if r else "missing")
        if not r:
            lines.append(f"| {name} | | | | | | | | | {st} |")
            continue
        gpus = r.get("gpus", len(r.get("devices_used", [])))
        eff = r["tokens_per_s"] / (gpus * one) if one and name == "ddp_2gpu" else None
        eff_mean = (r["tokens_per_s_mean"] / (gpus * one_mean)
                    if one_mean and name == "ddp_2gpu" and r.get("tokens_per_s_mean") else None)
        peaks = r.get("peak_gib_per_rank") or r.get("peak_gib_per_gpu") or [p["peak_gib_steps"] for p in r.get("per_rank", [])]
        fourbit = [f"{p['four_bit_bytes_unsharded'] / 1e9:.2f}->{p['four_bit_bytes_shard'] / 1e9:.2f} GB" for p in r.get("per_rank", [])]
        losses = r.get("losses", [])
        lines.append(f"| {name} | {gpus} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {f'{eff:.2f}' if eff else ''} | "
                     f"{f'{eff_mean:.2f}' if eff_mean else ''} | "
                     f"{', '.join(f'{p:.1f}' for p in peaks)} | {', '.join(fourbit)} | "
                     f"{losses[0]:.3f} -> {losses[-1]:.3f} | {st} |")
        csv_rows.append({"mode": name, "gpus": gpus, "step_s": r["step_s"], "tokens_per_s": r["tokens_per_s"],
                         "scaling_efficiency": eff, "scaling_efficiency_mean": eff_mean, "peak_gib": json.dumps(peaks), "four_bit": json.dumps(fourbit),
                         "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                         "status": st})
    table = "\n".join(lines)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.md").write_text(f"{args.model}, seq {args.seq}, per-GPU batch {args.batch}\n\n{table}\n")
    if csv_rows:
        with open(out / "scaling.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(csv_rows[0]))
            w.writeheader()
            w.writerows(csv_rows)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["all", "prepare", "ddp", "max-memory", "fsdp", "report"])
    p.add_argument("--model", default="qwen2_5_vl_7b", choices=sorted(bq.MODELS))
    p.add_argument("--layers", type=int, default=None, help="cut layer counts (quick checks)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1, help="per-GPU batch")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--gc", default="unsloth", help='use_gradient_checkpointing: "unsloth", "true" or "false"')
    p.add_argument("--no-static-graph", dest="static_graph", action="store_false",
                   help="DDP with find_unused_parameters=True instead of static_graph=True")
    p.add_argument("--max-memory", nargs="+", default=["0=3GiB", "1=70GiB"],
                   help="device=budget pairs for the max-memory mode (GPU 0 small so layers spill onto GPU 1)")
    p.add_argument("--only", nargs="+", default=None, help="all: run only these of ddp_1gpu ddp_2gpu max_memory fsdp_2gpu")
    p.add_argument("--timeout", type=float, default=540.0, help="all: seconds per sub-run")
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default="bench_scaling_out")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    return {"all": cmd_all, "prepare": cmd_prepare, "ddp": cmd_ddp, "max-memory": cmd_max_memory, "fsdp": cmd_fsdp,
            "report": lambda a: report(a)}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
