#!/usr/bin/env python
"""One QLoRA training step, every system side by side: ours, plain transformers+peft (hf), Liger, Unsloth.

Random-weight models are built from the real public configs (embedded below, no downloads), saved once to a
local folder, and every system loads that same folder and trains on the same seeded batch, each in its own
subprocess (memory and import side effects do not leak; an OOM or any failure is a result, not a crash).

    python scripts/bench_qlora.py --model qwen2_5_vl_7b --seqs 2048 8192 --systems ours hf liger unsloth \
        --steps 6 --out /tmp/bench
    python scripts/bench_qlora.py --model tiny --systems ours hf --seqs 64 --steps 3 --out /tmp/bench  # CPU

Same for every system: nf4 + double quant, bf16 compute, lm_head and the projector/merger kept 16-bit, vision
tower quantized (the skip list comes from `hf_fastvision.quantization.build_plan` on a meta model; Unsloth
applies its own plan, whose 4-bit/16-bit linear counts the table shows), LoRA r=16 alpha=16 dropout 0 on the
attention and MLP projections of the vision and language layers (seeded), AdamW lr 1e-4 (torch defaults
otherwise), gradient checkpointing on, forward under bf16 autocast (as `Trainer(bf16=True)` does; `--autocast off`
for a plain loop), batch built
directly as tensors (one image per sample; text padded around the image tokens to exactly `seq` tokens;
labels = input_ids with the image tokens masked). Load time: model + processor + LoRA set-up (every system
loads its processor: ours and unsloth return one, the plain recipe calls AutoProcessor; before 2026-12-01 the hf
and liger rows loaded no processor). Step time: median of steps 3..N (wall clock, CUDA
synchronized). Peak memory: `torch.cuda.max_memory_allocated` over loading and the steps.
Caches (`--caches fresh`, the default since 2026-12-02): every system starts with its own empty Triton, Inductor
and CUDA JIT caches, so its first step pays its own compilations and none inherits another's (cuDNN's attention
plans land partly in the CUDA JIT cache, which the first system used to fill for the later ones). Before the first
system a warm-up process (`--warmup on`, throwaway caches) reads the CUDA libraries into the page cache, and
`os.sync()` waits out the flush of a checkpoint just written, so no system pays the machine's first cold reads or
the checkpoint's write-back for being first (before, ours always ran first).

On the GPU machine (which cannot download anything) begin with
    mkdir -p /tmp/site && tar -C /tmp/site -xzf .devkit/site.tar.gz && \
        export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1;
"""

from __future__ import annotations

# Only the standard library at module level: the unsloth worker must import unsloth before torch-side
# libraries (transformers, peft), and the parent must not import what the workers measure.
import argparse
import copy
import csv
import functools
import hashlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SYSTEMS = ("ours", "hf", "liger", "unsloth")
SEED = 0
LR = 1e-4
LORA_R = 16
LORA_ALPHA = 16
GIB = 1024**3

# --------------------------------------------------------------------------------------------------------
# Real configs (config.json of the public checkpoints, verbatim in the fields that matter). Loaded through
# the config class's `from_dict`, i.e. the same path `from_pretrained` takes for the hub file, so legacy
# fields (flat text keys, `rope_scaling`) are converted by the installed transformers as they would be.
# Parameter counts from these configs: 8,292,166,656 and 10,670,220,835 (the published totals).
# --------------------------------------------------------------------------------------------------------
QWEN2_5_VL_7B: dict[str, Any] = {  # Qwen/Qwen2.5-VL-7B-Instruct
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "model_type": "qwen2_5_vl",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 152064,
}

LLAMA32_11B_VISION: dict[str, Any] = {  # meta-llama/Llama-3.2-11B-Vision-Instruct
    "architectures": ["MllamaForConditionalGeneration"],
    "image_token_index": 128256,
    "model_type": "mllama",
    "torch_dtype": "bfloat16",
    "text_config": {
        "model_type": "mllama_text_model",
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "pad_token_id": 128004,
        "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38],
        "dropout": 0,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 131072,
        "num_attention_heads": 32,
        "num_hidden_layers": 40,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 128256,  # lm_head rows; the embedding table has vocab_size + 8 (the <|image|> token)
    },
    "vision_config": {
        "model_type": "mllama_vision_model",
        "attention_heads": 16,
        "hidden_act": "gelu",
        "hidden_size": 1280,
        "image_size": 560,
        "intermediate_layers_indices": [3, 7, 15, 23, 30],
        "intermediate_size": 5120,
        "max_num_tiles": 4,
        "norm_eps": 1e-05,
        "num_channels": 3,
        "num_global_layers": 8,
        "num_hidden_layers": 32,
        "patch_size": 14,
        "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
        "vision_output_dim": 7680,  # hidden_size * (len(intermediate_layers_indices) + 1)
    },
}

# name -> (config source, label, image side in pixels, range of ordinary text token ids [low, high))
MODELS: dict[str, dict[str, Any]] = {
    "qwen2_5_vl_7b": {"config": QWEN2_5_VL_7B, "label": "Qwen2.5-VL-7B", "image": 448, "text_ids": (1000, 151643)},
    "llama32_11b_vision": {
        "config": LLAMA32_11B_VISION, "label": "Llama-3.2-11B-Vision", "image": 560, "text_ids": (1000, 128000),
    },
    "tiny": {"tiny": "qwen2_5_vl", "label": "tiny qwen2_5_vl", "image": 56, "text_ids": (32, 360)},
    "tiny_mllama": {"tiny": "mllama", "label": "tiny mllama", "image": None, "text_ids": (32, 360)},
}

# LoRA targets for hf/liger, the regex most recipes write: attention and MLP projections inside numbered
# layers/blocks (so the Qwen merger and the mllama projector stay out). Checked against our own selection.
LORA_REGEX = (
    r".*\.(layers|blocks)\.\d+\.(self_attn|cross_attn|attn|mlp)\."
    r"(q_proj|k_proj|v_proj|o_proj|qkv|proj|gate_proj|up_proj|down_proj|fc1|fc2)"
)


# ========================================================================================================
# helpers
# ========================================================================================================
def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name, dists in (
        ("torch", ("torch",)), ("transformers", ("transformers",)), ("bitsandbytes", ("bitsandbytes",)),
        ("peft", ("peft",)), ("liger_kernel", ("liger_kernel", "liger-kernel")), ("unsloth", ("unsloth",)),
        ("unsloth_zoo", ("unsloth_zoo", "unsloth-zoo")), ("accelerate", ("accelerate",)), ("triton", ("triton",)),
    ):
        out[name] = None
        for d in dists:
            try:
                out[name] = metadata.version(d)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def _short(text: str, n: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def raw_config(model: str, layers: int | None) -> dict[str, Any] | None:
    """The hub-format config dict of a real model, with layer counts cut to `layers` for quick tests."""
    spec = MODELS[model]
    if "config" not in spec:
        return None
    d = copy.deepcopy(spec["config"])
    if not layers:
        return d
    n = int(layers)
    if d["model_type"] == "qwen2_5_vl":
        d["num_hidden_layers"] = min(n, d["num_hidden_layers"])
        d["max_window_layers"] = min(d["max_window_layers"], d["num_hidden_layers"])
        v = d["vision_config"]
        v["depth"] = min(n, v["depth"])
        v["fullatt_block_indexes"] = [i for i in v["fullatt_block_indexes"] if i < v["depth"]] or [v["depth"] - 1]
    elif d["model_type"] == "mllama":
        t, v = d["text_config"], d["vision_config"]
        t["num_hidden_layers"] = max(2, min(n, t["num_hidden_layers"]))
        t["cross_attention_layers"] = [i for i in t["cross_attention_layers"] if i < t["num_hidden_layers"]] or [
            t["num_hidden_layers"] - 1
        ]
        v["num_hidden_layers"] = min(n, v["num_hidden_layers"])
        v["num_global_layers"] = min(n, v["num_global_layers"])
        v["intermediate_layers_indices"] = [i for i in v["intermediate_layers_indices"] if i < v["num_hidden_layers"]] or [0]
        v["vision_output_dim"] = v["hidden_size"] * (len(v["intermediate_layers_indices"]) + 1)
    return d


def build_config(model: str, layers: int | None):
    spec = MODELS[model]
    if "tiny" in spec:
        from hf_fastvision.archs.tiny import tiny_config

        return tiny_config(spec["tiny"])
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    d = raw_config(model, layers)
    assert d is not None
    return CONFIG_MAPPING[d["model_type"]].from_dict(d)


def model_class_for(config):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText._model_mapping[type(config)]


# ========================================================================================================
# the batch: tensors built directly, one image per sample, exactly `seq` tokens
# ========================================================================================================
def _text_ids(g, n: int, low: int, high: int):
    import torch

    return torch.randint(low, high, (n,), generator=g, dtype=torch.long)


def build_batch(config, model: str, seq: int, batch: int, forward_params: set[str]) -> dict[str, Any]:
    import torch

    spec = MODELS[model]
    low, high = spec["text_ids"]
    g = torch.Generator().manual_seed(SEED + seq * 7919 + batch)
    mt = config.model_type
    out: dict[str, Any] = {}
    if mt in ("qwen2_5_vl", "qwen2_vl"):
        v = config.vision_config
        side = int(spec["image"])
        unit = v.patch_size * v.spatial_merge_size
        if side % unit:
            raise ValueError(f"image side {side} must be a multiple of patch*merge = {unit}")
        gh = gw = side // v.patch_size
        n_patches = gh * gw  # temporal grid 1 (one still image, duplicated over temporal_patch_size frames)
        n_img_tok = n_patches // (v.spatial_merge_size**2)
        image_id, start_id, end_id = config.image_token_id, config.vision_start_token_id, config.vision_end_token_id
        prefix = 16  # "<|im_start|>system ... <|im_start|>user" stand-in
        if seq < prefix + n_img_tok + 2 + 8:
            raise ValueError(f"seq {seq} is too short for {n_img_tok} image tokens")
        rows = []
        for _ in range(batch):
            tail = seq - prefix - n_img_tok - 2
            rows.append(torch.cat([
                _text_ids(g, prefix, low, high),
                torch.tensor([start_id]), torch.full((n_img_tok,), image_id), torch.tensor([end_id]),
                _text_ids(g, tail, low, high),
            ]))
        input_ids = torch.stack(rows)
        patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size * v.patch_size
        out["input_ids"] = input_ids
        out["attention_mask"] = torch.ones_like(input_ids)
        out["pixel_values"] = torch.randn(batch * n_patches, patch_dim, generator=g, dtype=torch.float32)
        out["image_grid_thw"] = torch.tensor([[1, gh, gw]] * batch, dtype=torch.long)
        if "mm_token_type_ids" in forward_params:
            out["mm_token_type_ids"] = (input_ids == image_id).to(torch.int32)
        masked = [image_id, start_id, end_id]
        image_desc = f"{side}x{side} px -> grid 1x{gh}x{gw}, {n_img_tok} image tokens"
    elif mt == "mllama":
        v = config.vision_config
        side, tiles = v.image_size, v.max_num_tiles
        image_id = config.image_token_index
        prefix = 8  # "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n" stand-in
        rows = []
        for _ in range(batch):
            rows.append(torch.cat([
                _text_ids(g, prefix, low, high), torch.tensor([image_id]), _text_ids(g, seq - prefix - 1, low, high),
            ]))
        input_ids = torch.stack(rows)
        pixel_values = torch.zeros(batch, 1, tiles, v.num_channels, side, side, dtype=torch.float32)
        pixel_values[:, :, 0] = torch.randn(batch, 1, v.num_channels, side, side, generator=g)  # one tile, rest pad
        aspect_ratio_mask = torch.zeros(batch, 1, tiles, dtype=torch.long)
        aspect_ratio_mask[:, :, 0] = 1
        cross = torch.zeros(batch, seq, 1, tiles, dtype=torch.long)
        cross[:, prefix:, 0, 0] = 1  # text from the image token on attends to the image's one tile
        out["input_ids"] = input_ids
        out["attention_mask"] = torch.ones_like(input_ids)
        out["pixel_values"] = pixel_values
        out["aspect_ratio_ids"] = torch.ones(batch, 1, dtype=torch.long)  # 1 = aspect ratio [1, 1]
        out["aspect_ratio_mask"] = aspect_ratio_mask
        out["cross_attention_mask"] = cross
        masked = [image_id]
        image_desc = f"one {side}x{side} tile (of {tiles}, rest padding), 1 image token"
    else:
        raise ValueError(f"no batch recipe for model_type {mt!r}")
    labels = out["input_ids"].clone()
    labels[torch.isin(labels, torch.tensor(masked))] = -100
    out["labels"] = labels
    assert out["input_ids"].shape == (batch, seq)
    out["_desc"] = image_desc
    return out


# ========================================================================================================
# parent: build the checkpoint once, then one subprocess per system
# ========================================================================================================
def _gate_value() -> float:
    """The value zero-initialised tanh gates get (`hf_fastvision.archs.tiny.open_zero_gates`: the image reaches
    the loss)."""
    from hf_fastvision.archs.tiny import ZERO_GATE_VALUE

    return ZERO_GATE_VALUE


def _fingerprint(config) -> str:
    src = json.dumps({"config": config.to_dict(), "seed": SEED, "gates": _gate_value()}, sort_keys=True, default=str)
    return hashlib.sha256(src.encode()).hexdigest()[:16]


def prepare(args, device: str) -> dict[str, Any]:
    """Checkpoint folder (reused if its fingerprint matches), the batches, the quantization plan, LoRA regex."""
    import torch

    from hf_fastvision.quantization import build_plan, meta_model
    from hf_fastvision.registry import get_arch
    from hf_fastvision.training.lora import lora_target_modules

    work = Path(args.workdir)
    folder = work / "model"
    work.mkdir(parents=True, exist_ok=True)
    config = build_config(args.model, args.layers)
    cls = model_class_for(config)
    meta = meta_model(config, cls)
    n_params = sum(p.numel() for p in meta.parameters())
    spec = get_arch(config)
    plan = build_plan(meta, spec, bits=4, compute_dtype=torch.bfloat16, quant_type="nf4", double_quant=True)
    ours_targets = set(lora_target_modules(meta))
    linear_names = [n for n, m in meta.named_modules() if isinstance(m, torch.nn.Linear)]
    regex_targets = {n for n in linear_names if re.fullmatch(LORA_REGEX, n)}
    regex_ok = regex_targets == ours_targets
    lora_target = LORA_REGEX if regex_ok else "^(" + "|".join(re.escape(t) for t in sorted(ours_targets)) + ")$"
    import inspect

    forward_params = set(inspect.signature(cls.forward).parameters)
    del meta

    fp = _fingerprint(config)
    marker = folder / "bench_fingerprint.json"
    info: dict[str, Any] = {"n_params": n_params, "fingerprint": fp, "model_class": cls.__name__}
    reuse = marker.exists() and json.loads(marker.read_text()).get("fingerprint") == fp and not args.rebuild
    t0 = time.perf_counter()
    if reuse:
        info["create_s"] = 0.0
        info["created"] = "reused"
    else:
        from transformers import AutoModelForImageTextToText

        torch.manual_seed(SEED)
        with torch.device(device):
            model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
        from hf_fastvision.archs.tiny import open_zero_gates

        info["gates_opened"] = open_zero_gates(model)
        if device == "cuda":
            torch.cuda.synchronize()
        info["init_s"] = round(time.perf_counter() - t0, 2)
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        _save_processor(args.model, config, folder)
        marker.write_text(json.dumps({"fingerprint": fp}))
        info["create_s"] = round(time.perf_counter() - t0, 2)
        info["created"] = "new"
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    info["checkpoint_gb"] = round(size / 1e9, 2)

    batches = {}
    desc = ""
    for seq in args.seqs:
        b = build_batch(config, args.model, seq, args.batch, forward_params)
        desc = b.pop("_desc")
        batches[seq] = b
    torch.save(batches, work / "batches.pt")
    info["batch_desc"] = desc
    info["batch_keys"] = sorted(next(iter(batches.values())).keys())

    bench_plan = {
        "skip_modules": plan.skip_modules,
        "n_quantized": len(plan.quantized),
        "n_kept": len(plan.kept),
        "lora_target": lora_target,
        "lora_regex_matches_ours": regex_ok,
        "n_lora_targets": len(ours_targets),
    }
    _write_json(work / "plan.json", bench_plan)
    info["plan"] = bench_plan
    return info


def _save_processor(model: str, config, folder: Path) -> None:
    """FastVisionModel-style loaders want a processor next to the weights. No tokenizer can be downloaded, so
    save the offline tiny processor of the same family (the batch is built as tensors and never touches it;
    its tokenizer is small, so no loader grows the embeddings for it)."""
    from hf_fastvision.archs.tiny import tiny_processor

    processor = tiny_processor(config.model_type)
    processor.save_pretrained(folder)


CACHE_VARS = ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "CUDA_CACHE_PATH")


def _fresh_caches(work: Path, name: str) -> dict[str, str]:
    """Empty Triton, Inductor and CUDA JIT cache folders for one process (`--caches fresh`)."""
    import shutil

    root = work / "caches" / name
    shutil.rmtree(root, ignore_errors=True)
    env = {}
    for var in CACHE_VARS:
        folder = root / var.lower()
        folder.mkdir(parents=True)
        env[var] = str(folder)
    return env


def _worker_env(caches: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(caches or {})
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(REPO) not in parts:
        parts.append(str(REPO))
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               UNSLOTH_DISABLE_STATISTICS="1")
    return env


def _oom_text(text: str) -> bool:
    return "OutOfMemoryError" in text or "CUDA out of memory" in text or "out of memory" in text.lower()


def steady_step(times: list[float], planned: int, status: str, err: str | None):
    """The step time a row reports: the median of steps 3.. (2.. when only two ran). When the budget let only
    the first step run out of several, that step is compile and warm-up, so the row is `incomplete` with no step
    time rather than a warm-up passed off as one. Returns (step_s, median_of, status, err)."""
    tail = times[2:] if len(times) >= 3 else times[1:] if len(times) >= 2 else times
    median_of = (f"steps 3..{len(times)}" if len(times) >= 3 else f"steps 2..{len(times)}" if len(times) == 2
                 else "step 1" if times else "none")
    if status == "ok" and len(times) == 1 and planned > 1:
        status, err = "incomplete", f"time budget: only step 1 of {planned} ran ({times[0]:.1f} s, warm-up)"
    step_s = statistics.median(tail) if tail and status == "ok" else None
    return step_s, median_of, status, err


WARMUP_CODE = """
import torch, torch.nn.functional as F
x = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
(x @ x).float().sum().backward()
q = torch.randn(1, 8, 1024, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
F.conv2d(torch.randn(1, 3, 64, 64, device="cuda"), torch.randn(8, 3, 14, 14, device="cuda"), stride=14)
try:
    import triton, triton.language as tl

    @triton.jit
    def _add_one(ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(ptr + offs, tl.load(ptr + offs, mask=offs < n) + 1, mask=offs < n)

    y = torch.zeros(1000, device="cuda")
    _add_one[(4,)](y, 1000, BLOCK=256)
except ImportError:
    pass
torch.cuda.synchronize()
"""


def warm_machine(work: Path) -> float | None:
    """Run a short CUDA process (a GEMM, SDPA forward and backward, a convolution, a tiny Triton kernel) with
    throwaway caches, so the CUDA, cuDNN and Triton libraries are in the page cache before the first system: that
    first read is the machine's, not the first system's. Returns its seconds (None when it failed)."""
    t0 = time.perf_counter()
    env = _worker_env(_fresh_caches(work, "warmup"))
    script = work / "caches" / "warmup.py"  # a file: Triton reads a kernel's source, which `python -c` has not
    script.write_text(WARMUP_CODE)
    try:
        proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        print("warm-up process timed out (180 s)", flush=True)
        return None
    if proc.returncode != 0:
        print(f"warm-up process failed (rc {proc.returncode}): {_short(proc.stderr, 300)}", flush=True)
        return None
    return round(time.perf_counter() - t0, 1)


def run_worker(args, system: str, deadline: float, log_path: Path) -> list[dict[str, Any]]:
    work = Path(args.workdir)
    result_path = work / f"result_{system}.json"
    if result_path.exists():
        result_path.unlink()
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--worker", system, "--model", args.model,
        "--workdir", str(work), "--seqs", *map(str, args.seqs), "--steps", str(args.steps),
        "--batch", str(args.batch), "--autocast", args.autocast, "--deadline", f"{deadline:.1f}",
        "--ours-patches", args.ours_patches, "--hf-upcast", args.hf_upcast,
        "--max-seq", str(max(args.seqs)), "--ours-device-map", args.ours_device_map,
        "--ours-lora-init", args.ours_lora_init,
    ]
    timeout = max(5.0, deadline - time.time() + args.grace)
    t0 = time.perf_counter()
    status_override = None
    with open(log_path, "w") as log:
        caches = _fresh_caches(work, system) if args.caches == "fresh" else None
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_worker_env(caches), cwd=str(REPO),
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            import signal

            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the worker's own process group (started above)
            except ProcessLookupError:
                pass
            proc.wait()
            rc = None
            status_override = f"timeout (killed after {timeout:.0f} s)"
    wall = time.perf_counter() - t0
    log_text = log_path.read_text(errors="replace")
    rows: list[dict[str, Any]] = []
    if result_path.exists():
        try:
            rows = json.loads(result_path.read_text())["rows"]
        except Exception:
            rows = []
    done = {r["seq"] for r in rows}
    tail = "\n".join(log_text.strip().splitlines()[-15:])
    for seq in args.seqs:
        if seq in done:
            continue
        if status_override:
            status, err = "timeout", status_override
        elif rc is not None and rc != 0 and _oom_text(log_text):
            status, err = "OOM", f"worker died (rc {rc}) out of memory"
        else:
            status, err = "error", f"worker exited rc {rc} without a result: {_short(tail, 300)}"
        rows.append({"system": system, "seq": seq, "status": status, "error": err})
    for r in rows:
        r["worker_wall_s"] = round(wall, 1)
        r["worker_rc"] = rc
    if rc not in (0, None) or status_override or any(r.get("status") not in ("ok", "not installed") for r in rows):
        print(f"--- {system}: last lines of its log ({log_path.name}) ---\n{tail}\n---", flush=True)
    return rows


def _fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        if math.isnan(x):
            return "n/a"
        return f"{x:,.{nd}f}"
    return str(x)


COLUMNS = ["model", "seq", "batch", "system", "status", "step_s", "tokens_per_s", "peak_gib", "peak_reserved_gib",
           "first_step_s",
           "load_s", "import_s", "steps_peak_gib", "load_peak_gib", "after_load_gib", "end_reserved_gib", "n_4bit",
           "n_16bit",
           "n_lora", "trainable_params", "grad_norm", "nonzero_grads", "n_trainable_tensors", "median_of", "steps_s",
           "losses", "autocast", "error", "worker_wall_s", "load_parts", "load_splits", "first_step_triton", "gc_s",
           "host_probe_ms"]


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| model | seq | system | step (s) | tokens/s | peak GiB | reserved GiB | first step (s) | load (s) | "
            "4-bit / 16-bit linears, LoRA | grad norm s1, s2; nonzero grads s2 | losses | status |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        ok = r.get("status") == "ok" or r.get("step_s") is not None
        status = r.get("status", "?")
        if r.get("error") and status != "ok":
            status = f"{status}: {_short(r['error'], 90)}"
        elif r.get("note"):
            status = f"{status} ({_short(r['note'], 60)})"
        linears = (f"{r.get('n_4bit')} / {r.get('n_16bit')}, {r.get('n_lora')}" if r.get("n_4bit") is not None else "")
        losses = " ".join(f"{x:.4f}" for x in (r.get("losses") or []))
        gn, nz = r.get("grad_norm") or [], r.get("nonzero_grads") or []
        grads = ", ".join(f"{x:.3g}" for x in gn) + (f"; {nz[-1]}/{r.get('n_trainable_tensors')}" if len(nz) > 1 else "")
        seq = f"{r['seq']}" + (f", batch {r['batch']}" if r.get("batch", 1) != 1 else "")
        lines.append(
            f"| {r.get('model', '')} | {seq} | {r['system']} | {_fmt(r.get('step_s')) if ok else '-'} | "
            f"{_fmt(r.get('tokens_per_s'), 0) if ok else '-'} | {_fmt(r.get('peak_gib'), 2) if ok else '-'} | "
            f"{_fmt(r.get('peak_reserved_gib'), 2) if ok else '-'} | "
            f"{_fmt(r.get('first_step_s'), 1) if ok else '-'} | {_fmt(r.get('load_s'), 1) if r.get('load_s') is not None else '-'} | "
            f"{linears} | {grads} | {losses} | {status} |"
        )
    return "\n".join(lines)


def write_outputs(out: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "results.json", {"meta": meta, "rows": rows})
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            rr = dict(r)
            for k in ("steps_s", "losses", "grad_norm", "nonzero_grads"):
                if isinstance(rr.get(k), list):
                    rr[k] = " ".join(f"{x:.6g}" for x in rr[k])
            w.writerow(rr)
    md = markdown(rows)
    (out / "results.md").write_text(_header_text(meta) + "\n\n" + md + "\n")
    return md


def _header_text(meta: dict[str, Any]) -> str:
    v = meta["versions"]
    plan = meta.get("plan", {})
    lines = [
        f"# QLoRA step benchmark: {meta['model_label']} ({meta.get('n_params', 0) / 1e9:.2f} B params"
        + (f", layers cut to {meta['layers']}" if meta.get("layers") else "") + ")",
        f"device: {meta['device_name']}",
        "versions: " + ", ".join(f"{k} {v[k] or 'not installed'}" for k in v),
        f"batch: {meta.get('batch_desc')}; batch size {meta['batch']}; steps {meta['steps']} "
        f"(step time = median of steps 3..N); seqs {meta['seqs']}",
        "quantization (same plan for ours, hf, liger): nf4 + double quant, bf16 compute, "
        f"llm_int8_skip_modules from hf_fastvision build_plan on a meta model = {plan.get('skip_modules')} "
        f"({plan.get('n_quantized')} linears 4-bit, {plan.get('n_kept')} kept 16-bit); unsloth applies its own plan "
        "(see its linear counts).",
        f"LoRA r={LORA_R} alpha={LORA_ALPHA} on {plan.get('n_lora_targets')} vision+language attention/MLP "
        f"projections (hf/liger regex {'= ours' if plan.get('lora_regex_matches_ours') else 'replaced by our exact list'}); "
        f"AdamW lr {LR}; gradient checkpointing on (ours/unsloth: 'unsloth' offload, hf/liger: non-reentrant); "
        f"bf16 autocast {meta.get('autocast', 'on')}.",
        f"checkpoint: {meta.get('checkpoint_gb')} GB bf16 ({meta.get('created')}, {meta.get('create_s')} s), seeded "
        f"random init" + (f"; {meta['gates_opened']} zero-initialised tanh gates set to {_gate_value()} so the image "
                          "reaches the loss" if meta.get("gates_opened") else ""),
        f"caches: {meta.get('caches', 'shared')} per system (Triton, Inductor, CUDA JIT); warm-up process "
        + (f"{meta['warmup_s']} s before the first system" if meta.get("warmup_s")
           else "FAILED (see the run's output)" if "warmup_s" in meta else "none"),
    ]
    return "\n".join(lines)


def parent_main(args) -> int:
    t_start = time.time()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu (no CUDA)"
    versions = _versions()
    spec = MODELS[args.model]
    print(f"device: {device_name}", flush=True)
    print("versions: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in versions.items()), flush=True)
    info = prepare(args, device)
    print(f"model: {spec['label']} {info['n_params'] / 1e9:.3f} B params ({info['model_class']}), checkpoint "
          f"{info['checkpoint_gb']} GB {info['created']} in {info['create_s']} s; batch: {info['batch_desc']}"
          + (f"; {info['gates_opened']} zero tanh gates set to {_gate_value()}" if info.get("gates_opened") else ""),
          flush=True)
    print(f"plan: {info['plan']['n_quantized']} linears 4-bit, {info['plan']['n_kept']} kept 16-bit, skip "
          f"{info['plan']['skip_modules']}; {info['plan']['n_lora_targets']} LoRA targets (regex matches ours: "
          f"{info['plan']['lora_regex_matches_ours']})", flush=True)
    meta = {
        "model": args.model, "model_label": spec["label"], "layers": args.layers, "device_name": device_name,
        "versions": versions, "batch": args.batch, "steps": args.steps, "seqs": args.seqs,
        "systems": args.systems, "autocast": args.autocast, "hf_upcast": args.hf_upcast, "caches": args.caches,
        "ours_patches": args.ours_patches, "ours_device_map": args.ours_device_map, "ours_lora_init": args.ours_lora_init,
        **info,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    all_rows: list[dict[str, Any]] = []
    logs = []
    budget_end = t_start + args.budget
    if hasattr(os, "sync"):  # the checkpoint just written is still being flushed: not the first system's I/O to wait on
        t_sync = time.perf_counter()
        os.sync()
        meta["sync_s"] = round(time.perf_counter() - t_sync, 1)
        print(f"[{time.time() - t_start:6.1f} s] os.sync() after the checkpoint: {meta['sync_s']} s", flush=True)
    if args.warmup == "on" and device == "cuda":
        meta["warmup_s"] = warm_machine(Path(args.workdir))
        print(f"[{time.time() - t_start:6.1f} s] warm-up process (throwaway caches): {meta['warmup_s']} s", flush=True)
    for i, system in enumerate(args.systems):
        remaining = budget_end - time.time()
        left = len(args.systems) - i
        if remaining < args.min_worker_s:
            rows = [{"system": system, "seq": s, "status": "skipped", "error": f"time budget ({args.budget} s) spent"}
                    for s in args.seqs]
        else:
            # each worker may use its fair share of what is left, or more if it is the last one
            share = remaining if left == 1 else max(args.min_worker_s, remaining / left * args.share_boost)
            deadline = time.time() + min(args.worker_timeout, share, remaining)
            log_path = Path(args.workdir) / f"worker_{system}.log"
            print(f"[{time.time() - t_start:6.1f} s] {system}: worker starts (deadline in "
                  f"{deadline - time.time():.0f} s)", flush=True)
            rows = run_worker(args, system, deadline, log_path)
            logs.append(log_path)
        for r in rows:
            r.setdefault("model", spec["label"])
            r.setdefault("batch", args.batch)
            r["model"] = spec["label"]
            r["batch"] = args.batch
            r["autocast"] = args.autocast
        rows.sort(key=lambda r: r["seq"])
        for r in rows:
            print(f"[{time.time() - t_start:6.1f} s] {system} seq {r['seq']}: {r.get('status')} "
                  f"step {_fmt(r.get('step_s'))} s, peak {_fmt(r.get('peak_gib'), 2)} GiB, load {_fmt(r.get('load_s'), 1)} s"
                  + (f" -- {_short(r['error'], 200)}" if r.get("error") else ""), flush=True)
        all_rows.extend(rows)
        all_rows.sort(key=lambda r: (r["seq"], args.systems.index(r["system"])))
        write_outputs(out, meta, all_rows)
        with open(out / "workers.log", "w") as fh:
            for p in logs:
                fh.write(f"===== {p.name} =====\n{p.read_text(errors='replace')}\n")
    md = write_outputs(out, meta, all_rows)
    meta["total_s"] = round(time.time() - t_start, 1)
    _write_json(out / "results.json", {"meta": meta, "rows": all_rows})
    print()
    print(_header_text(meta))
    print()
    print(md)
    print(f"\ntotal {meta['total_s']} s; results in {out}/results.{{md,csv,json}}, worker logs in {out}/workers.log")
    return 0


# ========================================================================================================
# worker: load one system, run the steps for every seq, write result_<system>.json after each seq
# ========================================================================================================
class _Result:
    def __init__(self, path: Path, system: str):
        self.path, self.system, self.rows = path, system, []
        self.extra: dict[str, Any] = {}

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append({"system": self.system, **self.extra, **row})
        _write_json(self.path, {"rows": self.rows})

    def all_seqs(self, seqs, **row) -> None:
        for s in seqs:
            self.add({"seq": s, **row})


def _count_modules(model) -> dict[str, int]:
    import torch.nn as nn

    try:
        import bitsandbytes as bnb

        l4 = (bnb.nn.Linear4bit,)
    except Exception:
        l4 = ()
    n4 = n16 = nlora = 0
    for name, m in model.named_modules():
        parts = name.split(".")
        if "lora_A" in parts or "lora_B" in parts or "lora_magnitude_vector" in parts:
            continue
        if l4 and isinstance(m, l4):
            n4 += 1
        elif type(m) is nn.Linear:
            n16 += 1
        la = getattr(m, "lora_A", None)
        if isinstance(la, nn.ModuleDict) and len(la) > 0:
            nlora += 1
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"n_4bit": n4, "n_16bit": n16, "n_lora": nlora, "trainable_params": trainable}


def _graph_stats(model) -> dict[str, int] | None:
    from hf_fastvision.training.checkpointing import _STATE_ATTR

    for m in model.modules():
        state = m.__dict__.get(_STATE_ATTR)
        if state is not None and state.manager.graphs is not None:
            return dict(state.manager.graphs.stats)
    return None


def _load_ours(folder: str, args, device: str):
    import torch

    from hf_fastvision import FastVisionModel

    device_map = json.loads(getattr(args, "ours_device_map", '"sequential"'))
    model, _processor = FastVisionModel.from_pretrained(
        folder, max_seq_length=args.max_seq, load_in_4bit=True, use_gradient_checkpointing="unsloth",
        dtype=torch.bfloat16, patches=json.loads(getattr(args, "ours_patches", "true")), device_map=device_map,
    )
    _load_part("from_pretrained")
    import peft

    import hf_fastvision.patching as patching
    import hf_fastvision.training.lora as lora
    import hf_fastvision.training.lora_init as lora_init

    # where ours' LoRA set-up goes (it took ~0.5 s longer than the recipe's on the H200, not on CPU): each part's
    # seconds, GPU-synced, in `load_splits`
    with _timed(lora, "lora_target_modules", "targets"), _timed(peft, "get_peft_model", "peft"), \
            _timed(patching, "apply_lora_patches", "lora_patches"), _timed(lora, "for_training", "for_training"), \
            _timed(lora_init, "_allocate", "lora_allocate"), _timed(lora_init, "_materialize", "lora_materialize"), \
            _timed(lora_init, "_plan", "lora_plan"), _timed(lora_init._Drawer, "join", "lora_draw_wait"), \
            _timed(lora, "get_peft_model", "lora_total"):
        model = FastVisionModel.get_peft_model(
            model, r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, finetune_vision_layers=True,
            finetune_language_layers=True, finetune_attention_modules=True, finetune_mlp_modules=True,
            random_state=SEED, fast_lora_init=getattr(args, "ours_lora_init", "fast") == "fast",
        )
    _load_part("get_peft_model")
    for key, value in getattr(lora_init, "LAST_DRAW", {}).items():  # the drawing thread's wall and CPU seconds
        _LOAD_SPLITS[f"lora_draw_{key.removesuffix('_s')}"] = round(value, 3)
    return model


_LOAD_PARTS: dict[str, float] = {}
_LOAD_SPLITS: dict[str, float] = {}
_LOAD_T0: list[float] = []


class _timed:
    """Wrap `owner.name` for the block: each call's seconds (GPU-synced) add up in `_LOAD_SPLITS[label]`."""

    def __init__(self, owner: Any, name: str, label: str) -> None:
        self.owner, self.name, self.label = owner, name, label

    def __enter__(self) -> "_timed":
        import torch

        real = self.real = getattr(self.owner, self.name)
        label = self.label

        def sync() -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()

        @functools.wraps(real)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            sync()
            t0 = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                sync()
                _LOAD_SPLITS[label] = round(_LOAD_SPLITS.get(label, 0.0) + time.perf_counter() - t0, 3)

        setattr(self.owner, self.name, wrapper)
        return self

    def __exit__(self, *exc: Any) -> None:
        setattr(self.owner, self.name, self.real)


class GcClock:
    """Seconds Python's cyclic garbage collector runs (all generations, and how many full collections) while
    active: a full collection walks every tracked object of the process, and a loaded 7B model holds ~600k."""

    def __init__(self) -> None:
        self.seconds, self.full, self._t0 = 0.0, 0, 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._t0
            self.full += info.get("generation") == 2

    def __enter__(self) -> "GcClock":
        import gc

        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: Any) -> None:
        import gc

        gc.callbacks.remove(self._callback)


def host_probe_ms(repeats: int = 3) -> float:
    """Milliseconds of a fixed pure-Python loop, best of ``repeats``: how fast this host runs the Python that
    launches kernels. Host-bound steps (the recipe's, Unsloth's at 2048) move with it from machine to machine;
    ours, replayed as CUDA graphs, barely do. Measured in each worker before its load (``load``, outside the timed
    load) and before and after its steps of each sequence length."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        acc = 0
        for i in range(200_000):
            acc += i & 7
        best = min(best, time.perf_counter() - t0)
    return round(best * 1e3, 2)


def _load_part(name: str) -> None:
    """Seconds since the load began (GPU synced) at the end of each phase: where a system's load time goes."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if _LOAD_T0:
        _LOAD_PARTS[name] = round(time.perf_counter() - _LOAD_T0[0], 2)


def _load_hf(folder: str, args, device: str, plan: dict[str, Any]):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=list(plan["skip_modules"]),
    )
    model = AutoModelForImageTextToText.from_pretrained(
        folder, quantization_config=bnb, dtype=torch.bfloat16, attn_implementation="sdpa",
        device_map={"": 0} if device == "cuda" else "cpu",
    )
    model.config.use_cache = False
    _load_part("from_pretrained")
    # the recipe loads the processor too (ours and unsloth return one): part of the timed load for every system
    from transformers import AutoProcessor

    AutoProcessor.from_pretrained(folder)
    _load_part("processor")
    # the common recipe: freeze, upcast the 16-bit weights to fp32; checkpointing enabled right below
    if getattr(args, "hf_upcast", "on") == "on":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:  # A/B: the same recipe with the 16-bit weights left in bf16
        for param in model.parameters():
            param.requires_grad_(False)
    _load_part("prepare")
    gc_kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=gc_kwargs)
        gc_api = "activation_checkpointing_enable"
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        gc_api = "gradient_checkpointing_enable"
    _load_part("checkpointing")
    torch.manual_seed(SEED)
    config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, bias="none",
                        target_modules=plan["lora_target"], task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.train()
    _load_part("peft")
    return model, gc_api


def _load_unsloth(folder: str, args, device: str):
    import torch
    from unsloth import FastVisionModel  # unsloth itself was imported first, before anything else

    model, _tok = FastVisionModel.from_pretrained(
        folder, max_seq_length=args.max_seq, load_in_4bit=True, use_gradient_checkpointing="unsloth",
        dtype=torch.bfloat16,
    )
    _load_part("from_pretrained")
    model = FastVisionModel.get_peft_model(
        model, finetune_vision_layers=True, finetune_language_layers=True, finetune_attention_modules=True,
        finetune_mlp_modules=True, r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0, bias="none",
        random_state=SEED,
    )
    if hasattr(FastVisionModel, "for_training"):
        FastVisionModel.for_training(model)
    _load_part("get_peft_model")
    return model


def worker_main(args) -> int:
    system = args.worker
    work = Path(args.workdir)
    res = _Result(work / f"result_{system}.json", system)
    t_imp = time.perf_counter()
    # ---- imports, unsloth first of all ----
    if system == "unsloth":
        try:
            import unsloth  # noqa: F401  (first, before transformers and peft, as its users do)
        except ModuleNotFoundError as exc:
            res.all_seqs(args.seqs, status="not installed", error=f"unsloth not importable: {exc}")
            return 0
        except Exception as exc:  # e.g. no GPU: unsloth refuses to import
            res.all_seqs(args.seqs, status="not installed",
                         error=f"unsloth import failed: {type(exc).__name__}: {_short(exc, 300)}")
            return 0
    if system == "ours":  # first too, before CUDA starts: its import sets up the allocator, as its users get it
        import hf_fastvision

        print(f"[ours] allocator: {hf_fastvision.ALLOCATOR_SETUP}", flush=True)
    needs = {"ours": ["bitsandbytes", "peft"], "hf": ["bitsandbytes", "peft"],
             "liger": ["bitsandbytes", "peft", "liger_kernel.transformers"], "unsloth": ["bitsandbytes", "peft"]}[system]
    import importlib
    import importlib.util

    for mod in needs:  # absent packages first, without paying for the imports
        if importlib.util.find_spec(mod.split(".")[0]) is None:
            res.all_seqs(args.seqs, status="not installed", error=f"{mod.split('.')[0]} is not installed")
            return 0
    for mod in needs:
        try:
            importlib.import_module(mod)
        except ImportError as exc:
            res.all_seqs(args.seqs, status="not installed", error=f"{mod} not importable: {_short(exc, 200)}")
            return 0
        except Exception as exc:
            res.all_seqs(args.seqs, status="error", error=f"import {mod}: {type(exc).__name__}: {_short(exc, 300)}")
            return 0
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device == "cuda"
    import_s = time.perf_counter() - t_imp
    plan = json.loads((work / "plan.json").read_text())
    batches = torch.load(work / "batches.pt")
    folder = str(work / "model")
    res.extra = {"import_s": round(import_s, 2)}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    # ---- load ----
    note = ""
    probe_load = host_probe_ms()  # the host's speed as the load starts (outside the timed load)
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        _LOAD_T0[:] = [t0]
        load_gc = GcClock().__enter__()
        if system == "ours":
            model = _load_ours(folder, args, device)
        elif system == "hf":
            model, gc_api = _load_hf(folder, args, device, plan)
            note = gc_api
        elif system == "liger":
            import liger_kernel.transformers as lk

            cfg = json.loads((Path(folder) / "config.json").read_text())
            fn = getattr(lk, f"apply_liger_kernel_to_{cfg['model_type']}", None)
            if fn is None:
                res.all_seqs(args.seqs, status="error", error=f"liger has no apply_liger_kernel_to_{cfg['model_type']}")
                return 0
            fn()  # before the model is built, as its docs say
            model, gc_api = _load_hf(folder, args, device, plan)
            note = f"{fn.__name__}(); {gc_api}"
        elif system == "unsloth":
            model = _load_unsloth(folder, args, device)
        else:
            raise ValueError(system)
        sync()
        load_s = time.perf_counter() - t0
        load_gc.__exit__()
    except Exception as exc:
        oom = isinstance(exc, torch.OutOfMemoryError) or _oom_text(str(exc))
        traceback.print_exc()
        res.all_seqs(args.seqs, status="OOM" if oom else "error",
                     error=f"load: {type(exc).__name__}: {_short(exc, 400)}")
        return 0
    load_peak = torch.cuda.max_memory_allocated() / GIB if cuda else None
    load_reserved = torch.cuda.max_memory_reserved() / GIB if cuda else None
    after_load = torch.cuda.memory_allocated() / GIB if cuda else None
    counts = _count_modules(model)
    res.extra.update({"load_s": round(load_s, 2), "load_peak_gib": load_peak, "after_load_gib": after_load,
                      **counts, "note": note, "load_parts": dict(_LOAD_PARTS), "load_splits": dict(_LOAD_SPLITS)})
    print(f"[{system}] loaded in {load_s:.1f} s (cumulative s at the end of each phase: {_LOAD_PARTS}"
          + (f"; s inside the LoRA set-up: {_LOAD_SPLITS}" if _LOAD_SPLITS else "") + f"): {counts}",
          flush=True)
    from triton_compiles import CompileTimer  # scripts/ (the worker runs from there)

    trainable = [p for p in model.parameters() if p.requires_grad]
    # kept on the host: a GPU copy would add the trainable size (0.25 GiB for Llama-11B's LoRA) to every peak
    init_state = [p.detach().to("cpu", copy=True) for p in trainable]
    import contextlib

    def autocast():
        if args.autocast == "on":
            return torch.autocast(device_type=device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- steps, per seq ----
    for k, seq in enumerate(args.seqs):
        if k:
            with torch.no_grad():  # every seq starts from the same LoRA weights and a fresh optimizer
                for p, p0 in zip(trainable, init_state):
                    p.copy_(p0.to(p.device))
        batch = {key: v.to(device) for key, v in batches[seq].items()}
        opt = torch.optim.AdamW(trainable, lr=LR)
        model.train()
        times: list[float] = []
        losses: list[float] = []
        grad_norm: list[float] = []
        nonzero: list[int] = []
        status, err = "ok", None
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        probe_before = host_probe_ms()
        try:
            for i in range(args.steps):
                # step 1 is compile and warm-up: its time says nothing about step 2's, and a row needs step 2
                est = times[-1] if len(times) >= 2 else 0.0
                if time.time() + est > args.deadline:
                    status, err = "ok", f"time budget: {len(times)} of {args.steps} steps"
                    break
                sync()
                t0 = time.perf_counter()
                # the first step of a run: how much of it is Triton compiling `triton.jit` kernels (ours', Liger's;
                # Unsloth's Inductor kernels compile another way and are not counted)
                with (CompileTimer() if k == 0 and i == 0 else contextlib.nullcontext()) as compiles, \
                        (GcClock() if k == 0 and i == 0 else contextlib.nullcontext()) as step_gc:
                    with autocast():
                        out = model(**batch)
                    loss = out.loss
                    loss.backward()
                    opt.step()
                    sync()
                times.append(time.perf_counter() - t0)
                if compiles is not None:
                    summary = compiles.summary()
                    res.extra["first_step_triton"] = {"compiles": summary["compiles"], "s": summary["seconds"]}
                    res.extra["gc_s"] = {"load": round(load_gc.seconds, 3), "load_full": load_gc.full,
                                         "step1": round(step_gc.seconds, 3), "step1_full": step_gc.full}
                losses.append(float(loss.detach().float().item()))
                if i < 2:  # correctness signal, outside the timed region: do gradients reach every LoRA tensor?
                    grads = [p.grad for p in trainable]
                    norms = [g.detach().float().norm() for g in grads if g is not None]
                    grad_norm.append(float(torch.stack(norms).norm()) if norms else 0.0)
                    nonzero.append(sum(1 for g in grads if g is not None and bool(g.detach().ne(0).any())))
                    del grads, norms  # else this step's gradients live on through the next step (+ trainable size)
                opt.zero_grad(set_to_none=True)
                del out, loss
                print(f"[{system}] seq {seq} step {i + 1}: {times[-1]:.3f} s loss {losses[-1]:.4f}", flush=True)
        except Exception as exc:
            oom = isinstance(exc, torch.OutOfMemoryError) or _oom_text(str(exc))
            if not oom:
                traceback.print_exc()
            status = "OOM" if oom else "error"
            err = f"step {len(times) + 1}: {type(exc).__name__}: {_short(exc, 400)}"
            opt.zero_grad(set_to_none=True)
        import gc

        gc.collect()  # drop what a failed step left behind before the next seq
        steps_peak = torch.cuda.max_memory_allocated() / GIB if cuda else None
        steps_reserved = torch.cuda.max_memory_reserved() / GIB if cuda else None
        # reserved once the steps are done: the steady state (graph pools and caches), not a capture round's peak
        end_reserved = torch.cuda.memory_reserved() / GIB if cuda else None
        step_s, median_of, status, err = steady_step(times, args.steps, status, err)
        row = {
            "seq": seq, "status": status, "error": err,
            "host_probe_ms": {"load": probe_load, "before": probe_before, "after": host_probe_ms()},
            "step_s": step_s, "tokens_per_s": (args.batch * seq / step_s) if step_s else None,
            "peak_gib": max(load_peak, steps_peak) if cuda else None, "steps_peak_gib": steps_peak,
            # CUDA graphs' private pools are reserved, not allocated, while they replay: compare this column too
            "peak_reserved_gib": max(load_reserved, steps_reserved) if cuda else None,
            "end_reserved_gib": end_reserved,
            "first_step_s": times[0] if times else None,
            "time_to_first_step_s": (load_s + times[0]) if times else None,
            "median_of": median_of, "steps_s": times, "losses": losses,
            "grad_norm": grad_norm, "nonzero_grads": nonzero, "n_trainable_tensors": len(trainable),
        }
        if system == "ours":
            row["graphs"] = _graph_stats(model)
            print(f"[ours] seq {seq} CUDA graphs: {row['graphs']}", flush=True)
        res.add(row)
        del batch, opt
        if cuda:
            torch.cuda.empty_cache()
    return 0


# ========================================================================================================
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=sorted(MODELS))
    p.add_argument("--seqs", type=int, nargs="+", default=[2048])
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=None, help="cut layer counts (quick tests)")
    p.add_argument("--ours-patches", default="true",
                   help='our kernel patches: "true", "false" or JSON flags, e.g. \'{"fused_loss": false}\' (A/B runs)')
    p.add_argument("--ours-device-map", default='"sequential"',
                   help='JSON device_map for ours (A/B of the load time), e.g. \'{"": 0}\'')
    p.add_argument("--ours-lora-init", choices=["fast", "peft"], default="fast",
                   help="ours' LoRA set-up: meta-device injection + drawn-ahead weights (default), or peft's own path")
    p.add_argument("--autocast", choices=["on", "off"], default="on",
                   help="forward under bf16 autocast, as Trainer(bf16=True) does (off: plain loop; the hf recipe's "
                        "fp32-upcast norms then carry fp32 activations into attention)")
    p.add_argument("--hf-upcast", choices=["on", "off"], default="on",
                   help="hf/liger: prepare_model_for_kbit_training (casts every 16-bit weight to fp32, as tutorials "
                        "do) or off (freeze only: the 16-bit weights stay bf16, as ours and unsloth keep them)")
    p.add_argument("--caches", choices=["fresh", "shared"], default="fresh",
                   help="fresh: each system starts with empty Triton, Inductor and CUDA JIT caches; shared: the "
                        "process's own (a later system inherits what an earlier one compiled)")
    p.add_argument("--warmup", choices=["on", "off"], default="on",
                   help="on CUDA, a short process with throwaway caches reads the CUDA libraries in first")
    p.add_argument("--out", default="bench_qlora_out")
    p.add_argument("--workdir", default=None, help="checkpoint + batch folder (default /tmp/bench_qlora_<model>)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the checkpoint even if the folder matches")
    p.add_argument("--budget", type=float, default=565.0, help="seconds for the whole run, creation included")
    p.add_argument("--worker-timeout", type=float, default=420.0, help="most seconds one system may take")
    p.add_argument("--min-worker-s", type=float, default=40.0, help="skip a system when less than this is left")
    p.add_argument("--share-boost", type=float, default=1.6,
                   help="a worker may take this multiple of its even share of the time left")
    p.add_argument("--grace", type=float, default=25.0, help="seconds past its deadline before a worker is killed")
    # worker-only
    p.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--max-seq", type=int, default=2048, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.workdir is None:
        args.workdir = f"/tmp/bench_qlora_{args.model}" + (f"_l{args.layers}" if args.layers else "")
    args.seqs = sorted(set(args.seqs))
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.worker:
        return worker_main(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
