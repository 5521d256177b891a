#!/usr/bin/env python
"""Benchmark activation checkpointing variants on CUDA (not a test; needs a GPU).

A random-weight, Qwen2.5-7B-shaped ``LlamaForCausalLM`` (hidden 3584, MLP 18944, 28 heads / 4 KV heads, bf16,
built from a config - no download) with fewer layers runs forward + backward at a long sequence length under:

* ``none``          - no checkpointing
* ``hf_plain``      - transformers' own checkpointing (``gradient_checkpointing_enable``, non-reentrant)
* ``hf_offload``    - transformers' built-in offload (``gradient_checkpointing_enable(offload=True)``, i.e.
                      checkpoint under ``torch.autograd.graph.save_on_cpu(pin_memory=True)``)
* ``ours_plain``    - ``enable_checkpointing(model, True)``
* ``ours_unsloth``  - ``enable_checkpointing(model, "unsloth")`` (inputs offloaded on a side stream, prefetched)

It prints a Markdown table and CSV: median step time and peak allocated memory (absolute and above the static
weights). By default only the RMSNorm weights are trainable, so - as in LoRA / QLoRA fine-tuning -
activations rather than gradients dominate memory; ``--train all`` makes every weight trainable.

    python scripts/bench_checkpointing.py                       # 8 layers, seq 8192
    python scripts/bench_checkpointing.py --layers 16 --seq 16384 --modes none,ours_plain,ours_unsloth
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import io
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

ALL_MODES = ["none", "hf_plain", "hf_offload", "ours_plain", "ours_unsloth"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--hidden", type=int, default=3584)
    p.add_argument("--intermediate", type=int, default=18944)
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, flash_attention_2, eager)")
    p.add_argument("--train", choices=["norms", "all"], default="norms",
                   help="which weights require grad (norms: activation-dominated, like LoRA)")
    p.add_argument("--lm-head", action="store_true",
                   help="include lm_head + cross-entropy (its logits dominate memory at large vocab)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--modes", default=",".join(ALL_MODES))
    p.add_argument("--csv", default=None, help="also write the CSV to this path")
    return p.parse_args(argv)


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, 32768),
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attn_implementation=args.attn,
        use_cache=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.train()
    for name, param in model.named_parameters():
        param.requires_grad_(args.train == "all" or "norm" in name)
    return model


@contextlib.contextmanager
def configured(model, mode):
    from hf_fastvision.training.checkpointing import disable_checkpointing, enable_checkpointing

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if mode == "hf_plain":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif mode == "hf_offload":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}, offload=True)
        elif mode == "ours_plain":
            enable_checkpointing(model, True)
        elif mode == "ours_unsloth":
            enable_checkpointing(model, "unsloth")
        elif mode != "none":
            raise ValueError(mode)
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            if mode.startswith("hf_"):
                model.gradient_checkpointing_disable()
                if hasattr(model, "disable_input_require_grads"):
                    model.disable_input_require_grads()
            elif mode.startswith("ours_"):
                disable_checkpointing(model)


def run_mode(model, mode, ids, args):
    from hf_fastvision.training.checkpointing import offload_stats

    def step():
        model.zero_grad(set_to_none=True)
        if args.lm_head:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        else:
            hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
            loss = hidden.float().pow(2).mean()
        loss.backward()
        return loss.detach()

    with configured(model, mode):
        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize()
        model.zero_grad(set_to_none=True)
        static = torch.cuda.memory_allocated()  # weights + inputs
        times, peaks = [], []
        loss = None
        for _ in range(args.steps):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            loss = step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            peaks.append(torch.cuda.max_memory_allocated())
        stats = offload_stats(model) if mode.startswith("ours_") else {}
    return {
        "mode": mode,
        "step_ms": statistics.median(times) * 1e3,
        "step_ms_min": min(times) * 1e3,
        "peak_gib": max(peaks) / 2**30,
        "peak_above_static_gib": (max(peaks) - static) / 2**30,
        "loss": float(loss),
        "offloaded_mib_per_step": stats.get("offloaded_bytes", 0) / max(1, args.warmup + args.steps) / 2**20,
    }


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_checkpointing.py needs CUDA.")
    import transformers

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ALL_MODES]
    if bad:
        sys.exit(f"unknown modes {bad}; choose from {ALL_MODES}")

    model = build_model(args)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).cuda()

    rows = []
    for mode in modes:
        gc.collect()
        torch.cuda.empty_cache()
        try:
            rows.append(run_mode(model, mode, ids, args))
        except torch.OutOfMemoryError:
            rows.append({"mode": mode, "step_ms": float("nan"), "step_ms_min": float("nan"),
                         "peak_gib": float("nan"), "peak_above_static_gib": float("nan"), "loss": float("nan"),
                         "offloaded_mib_per_step": 0.0, "note": "OOM"})
            model.zero_grad(set_to_none=True)
        print(f"done {mode}: {rows[-1]}", file=sys.stderr, flush=True)

    base = next((r for r in rows if r["mode"] == "none" and r["step_ms"] == r["step_ms"]), None)
    header = (
        f"GPU: {torch.cuda.get_device_name()} | torch {torch.__version__} | transformers {transformers.__version__}\n"
        f"layers={args.layers} seq={args.seq} batch={args.batch} hidden={args.hidden} "
        f"intermediate={args.intermediate} heads={args.heads}/{args.kv_heads} attn={args.attn} bf16 "
        f"train={args.train} lm_head={args.lm_head} steps={args.steps}"
    )
    print(header)
    print()
    print("| mode | step ms (median) | vs none | peak GiB | peak above static GiB | offloaded MiB/step | loss |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        rel = f"{r['step_ms'] / base['step_ms']:.2f}x" if base else "-"
        note = f" ({r['note']})" if r.get("note") else ""
        print(f"| {r['mode']}{note} | {r['step_ms']:.1f} | {rel} | {r['peak_gib']:.2f} | "
              f"{r['peak_above_static_gib']:.2f} | {r['offloaded_mib_per_step']:.0f} | {r['loss']:.5f} |")
    print()

    fields = ["mode", "step_ms", "step_ms_min", "peak_gib", "peak_above_static_gib", "offloaded_mib_per_step",
              "loss", "layers", "seq", "batch", "gpu", "torch", "transformers"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({**r, "layers": args.layers, "seq": args.seq, "batch": args.batch,
                         "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                         "transformers": transformers.__version__})
    print("CSV:")
    print(buf.getvalue())
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            fh.write(buf.getvalue())


if __name__ == "__main__":
    main()
