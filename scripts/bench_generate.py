#!/usr/bin/env python
"""Generation speed: transformers' `generate` vs our `fast_generate` (static KV cache + CUDA graphs), same run.

GPU only (not run on the CPU machines).  A random-weight Qwen2.5-VL-7B (the real config from bench_qlora.py) is
saved once and loaded in 4-bit through `FastVisionModel` (nf4 + double quant, bf16 compute). Every system (see
SYSTEMS below) generates from the same model instance and the same prompts: one 448x448 image (256 image tokens) +
32 text tokens per prompt, greedy, exactly N new tokens (`min_new_tokens` forces them, random weights or not).

    python scripts/bench_generate.py --batches 1 8 --new-tokens 256 --out /tmp/bench_gen
    python scripts/bench_generate.py --layers 2 --batches 1 2 --new-tokens 16 --out /tmp/bench_gen  # quick check

Per (system, batch): prefill = time for 1 new token; decode tokens/s = batch * N / (time for N+1 new tokens -
time for 1); peak memory = `torch.cuda.max_memory_allocated` over those calls (model weights included).  Times
are medians of `--repeats` after warm-up calls, the last of full length (fast_generate compiles its decode step,
Inductor + CUDA graphs, on the first calls).  Each output's matching token prefix against `generate` and the
eager static-cache `generate` is reported.  An OOM is a result.
Writes `<out>/bench_generate.md` and `<out>/bench_generate.csv`.

On the GPU machine (which cannot download anything) begin with
    mkdir -p /tmp/site && tar -C /tmp/site -xzf .devkit/site.tar.gz && \
        export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1;
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_qlora as bq  # noqa: E402  (config, checkpoint and batch helpers shared with the training benchmark)

MODEL = "qwen2_5_vl_7b"
SYSTEMS = ("generate", "generate_patched", "generate_static", "fast_generate_4bit", "fast_generate_nf4",
           "fast_generate")
# generate:           transformers' generate, dynamic cache, the stock modules (for_inference suspends our kernels)
# generate_patched:   the same with our training kernels bound (why for_inference suspends them)
# generate_static:    transformers' generate with a static cache, eager (isolates what compiling changes)
# fast_generate_4bit: fast_generate decoding from the 4-bit weights (bitsandbytes' own matmul): decode_weights="4bit"
# fast_generate_nf4:  the same with the few-row nf4 Triton kernel on decode steps (decode_kernel=True, opt-in)
# fast_generate:      ours as shipped: static cache sized from max_seq_length, decode step compiled (Inductor + CUDA
#                     graphs), decode_weights="auto" (a 16-bit decode copy of the language linears when it fits in
#                     gpu_memory_utilization; its memory is in the peak column)
# The baselines run with no decode copy and no kernel bound.
DECODE = {"fast_generate": dict(decode_weights="auto", decode_kernel=False),
          "fast_generate_nf4": dict(decode_weights="4bit", decode_kernel=True)}
GIB = 1024**3


def make_checkpoint(folder: Path, layers: int | None, rebuild: bool) -> Any:
    import torch
    from transformers import AutoModelForImageTextToText

    config = bq.build_config(MODEL, layers)
    fp = bq._fingerprint(config)
    marker = folder / "bench_fingerprint.json"
    if marker.exists() and json.loads(marker.read_text()).get("fingerprint") == fp and not rebuild:
        return config
    torch.manual_seed(bq.SEED)
    with torch.device("cuda"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    bq._save_processor(MODEL, config, folder)
    marker.write_text(json.dumps({"fingerprint": fp}))
    return config


def prompts(config, model_cls, batch: int, text_tokens: int) -> dict[str, Any]:
    """`batch` prompts: 16 text tokens, <vision_start> 256 image tokens <vision_end>, text_tokens - 16 more."""
    v = config.vision_config
    n_img_tok = (448 // v.patch_size) ** 2 // (v.spatial_merge_size**2)
    seq = text_tokens + n_img_tok + 2
    b = bq.build_batch(config, MODEL, seq, batch, set(inspect.signature(model_cls.forward).parameters))
    b.pop("_desc", None)
    b.pop("labels", None)
    return b


def timed(fn, repeats: int) -> tuple[float, Any]:
    import torch

    times, out = [], None
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def run_one(model, system: str, batch: dict[str, Any], n: int, repeats: int) -> dict[str, Any]:
    import torch

    from hf_fastvision.inference import fast_inference_state
    from hf_fastvision.inference.fast_generate import _supports_max_cache_len
    from hf_fastvision.patching import resume_patches, suspend_patches

    extra: dict[str, Any] = {}
    from hf_fastvision.inference import enable_fast_inference

    gen = model.fast_generate if system.startswith("fast_generate") else model.generate
    # the decode copy and the kernel are bound on the modules, so they would serve `generate` too: only the
    # fast_generate systems that ask for them get them
    enable_fast_inference(model, **DECODE.get(system, dict(decode_weights="4bit", decode_kernel=False)))
    torch.cuda.empty_cache()
    st = fast_inference_state(model)
    decode_from = (f"16-bit copy ({st.dense_layers} linears, {st.dense_bytes / GIB:.1f} GiB)" if st.dense_layers
                   else "4-bit, nf4 kernel" if st.decode_kernel else "4-bit (bitsandbytes)")
    torch._dynamo.reset()  # a compiled decode step must not be reused across kernel bindings
    if system == "generate_static":
        extra = {"cache_implementation": "static", "disable_compile": True}
        if _supports_max_cache_len():
            extra["max_cache_len"] = fast_inference_state(model).max_seq_length
    bsz = int(batch["input_ids"].shape[0])
    row: dict[str, Any] = {"system": system, "batch": bsz, "prompt_tokens": int(batch["input_ids"].shape[1]),
                           "decode_from": decode_from}

    def call(k: int):
        with torch.inference_mode():
            return gen(**batch, **extra, max_new_tokens=k, min_new_tokens=k, do_sample=False)

    if system == "generate_patched":
        resume_patches(model)

    try:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        warm = []
        # warm-up: compile / CUDA-graph capture (static cache shapes are fixed) and one full-length call, so that the
        # caching allocator already holds the blocks a growing dynamic cache needs: on 2026-11-27 the first system
        # timed after only short warm-ups ran at half speed (17.7 vs 33.1 decode tok/s for the same eager path)
        for k in (1, 9, 1, n + 1):
            t0 = time.perf_counter()
            call(k)
            torch.cuda.synchronize()
            warm.append(round(time.perf_counter() - t0, 2))
        row["warmup_s"] = warm
        t1, _ = timed(lambda: call(1), repeats)
        tn, out = timed(lambda: call(n + 1), repeats)
        row.update(
            prefill_s=round(t1, 4),
            total_s=round(tn, 4),
            decode_tok_s=round(bsz * n / max(tn - t1, 1e-9), 1),
            peak_gib=round(torch.cuda.max_memory_allocated() / GIB, 2),
            new_tokens=int(out.shape[1] - batch["input_ids"].shape[1]),
            status="ok",
        )
        row["_out"] = out.cpu()
    except torch.cuda.OutOfMemoryError as err:
        row.update(status="OOM", error=str(err).splitlines()[0][:160])
        torch.cuda.empty_cache()
    except Exception as err:  # noqa: BLE001 - a failure is a result
        row.update(status="error", error=f"{type(err).__name__}: {err}"[:300])
        traceback.print_exc()
    finally:
        suspend_patches(model)
    return row


def same_prefix(a, b) -> int:
    """Smallest, over the batch, number of leading generated tokens on which two outputs agree."""
    import torch

    if a.shape != b.shape:
        return 0
    eq = (a == b).all(0) if a.dim() == 1 else (a == b)
    first_diff = torch.where(~eq, torch.arange(eq.shape[-1]).expand_as(eq), eq.shape[-1]).min(-1).values
    return int(first_diff.min())


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"Qwen2.5-VL-7B (random weights, 4-bit nf4, bf16), {meta['device']}, torch {meta['torch']}, "
        f"transformers {meta['transformers']}; one 448x448 image + {meta['text_tokens']} text tokens per prompt, "
        f"{meta['new_tokens']} new tokens (greedy, forced); static cache max_seq_length={meta['max_seq']}.",
        "",
        "| system | batch | decodes from | prefill (s) | decode tok/s | peak GiB | speed-up vs generate "
        "| same tokens as generate | as generate_static | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {r["batch"]: r for r in rows if r["system"] == "generate" and r.get("status") == "ok"}
    for r in rows:
        ref = base.get(r["batch"])
        speed = (
            f"{r['decode_tok_s'] / ref['decode_tok_s']:.2f}x" if ref and r.get("status") == "ok" else ""
        )
        lines.append(
            f"| {r['system']} | {r['batch']} | {r.get('decode_from', '')} | {r.get('prefill_s', '')} | {r.get('decode_tok_s', '')} | "
            f"{r.get('peak_gib', '')} | {speed} | {r.get('same_as_generate', '')} | "
            f"{r.get('same_as_generate_static', '')} | {r.get('status')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=256, help="N: decode speed over N tokens after the first")
    p.add_argument("--text-tokens", type=int, default=32)
    p.add_argument("--max-seq", type=int, default=640, help="static KV cache length (prompt + new tokens)")
    p.add_argument("--layers", type=int, default=None, help="cut layer counts (quick checks)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    p.add_argument("--workdir", default="/tmp/bench_generate_model")
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--out", default="/tmp/bench_generate")
    args = p.parse_args(argv)

    import torch
    import transformers

    if not torch.cuda.is_available():
        print("bench_generate.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from hf_fastvision import FastVisionModel
    from hf_fastvision.inference import enable_fast_inference, fast_inference_state

    config = make_checkpoint(Path(args.workdir), args.layers, args.rebuild)
    model, _processor = FastVisionModel.from_pretrained(
        args.workdir, max_seq_length=args.max_seq, load_in_4bit=True, dtype=torch.bfloat16
    )
    FastVisionModel.for_inference(model)
    enable_fast_inference(model, max_seq_length=args.max_seq, max_batch_size=max(args.batches), decode_weights="4bit")
    cls = type(model)
    rows: list[dict[str, Any]] = []
    for bsz in args.batches:
        batch = {k: v.to("cuda") if hasattr(v, "to") else v for k, v in prompts(config, cls, bsz, args.text_tokens).items()}
        if batch["input_ids"].shape[1] + args.new_tokens + 1 > args.max_seq:
            print(f"note: prompt + new tokens exceeds --max-seq {args.max_seq}; the static cache grows to fit")
        group = [run_one(model, system, batch, args.new_tokens, args.repeats) for system in args.systems]
        outs = {r["system"]: r.pop("_out", None) for r in group}
        prompt_len = batch["input_ids"].shape[1]
        for r in group:
            for ref in ("generate", "generate_static"):
                if r["system"] != ref and outs.get(ref) is not None and outs.get(r["system"]) is not None:
                    a, b = outs[ref][:, prompt_len:], outs[r["system"]][:, prompt_len:]
                    r[f"same_as_{ref}"] = f"{same_prefix(a, b)}/{a.shape[1]}"
            print(json.dumps(r))
        rows += group
    state = fast_inference_state(model)
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "text_tokens": args.text_tokens,
        "new_tokens": args.new_tokens,
        "max_seq": args.max_seq,
        "fast_inference": state.as_dict() if state else None,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(rows, meta)
    (out / "bench_generate.md").write_text(md)
    keys = ["system", "batch", "decode_from", "prompt_tokens", "new_tokens", "prefill_s", "total_s", "decode_tok_s", "peak_gib",
            "same_as_generate", "same_as_generate_static", "warmup_s", "status", "error"]
    with open(out / "bench_generate.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (out / "bench_generate_meta.json").write_text(json.dumps(meta, indent=1, default=str))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
