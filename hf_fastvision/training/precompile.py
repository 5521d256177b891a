"""Compile the patched model's Triton kernels before the first step needs them (``patches={"precompile": ...}``:
``"process"``, the default, or ``True``; ``False`` turns it off).

Why: with empty caches a QLoRA model's first step compiles ~11 Triton specializations (RMSNorm, SwiGLU/GeGLU,
RoPE and the loss kernel, forward and backward, per hidden width or head layout): 2.1-2.4 s of an H200 first step
(`bench_qlora.py`'s ``first_step_triton``), plus Triton's one-time start-up.

How: `job_specs` reads the bound patches (`patching.py`) into plain data, one spec per distinct specialization
(op, widths, dtypes, whether the weight trains); `kernels.warmup.run_spec` runs that op forward and backward on
16 rows of constant dummy data with dummy weights of the same dtype, so Triton compiles exactly the variants the
real step launches (the GPU test checks that the real step then compiles none of them). Specs never touch the model or a
random generator (the user's seeds keep their streams) and never raise: a failure only means the step compiles
the kernel itself, as before.

- ``True``: 4 threads, started by `get_peft_model` before peft's injection (`for_training` adds any others).
  Measured on an H200 (Qwen2.5-VL-7B at 2048, `scripts/results/h200_2026-12-02l_seventeenth/` against
  `h200_2026-12-02j_fifteenth/`): step 1 took 9.7 s instead of 13.4 s and compiled 4 kernels instead of 11, but
  peft's injection took 3.8 s instead of 1.5 s, because much of a compile holds the GIL. Load + first step 17.6 s
  against 19.0 s. `wait` joins the threads; CUDA graph captures call it first, so no background launch overlaps a
  capture.
- ``"process"``: a helper process, started by `from_pretrained` as soon as the quantization plan's meta-device
  model exists (the specs are read from it, patched, with the LoRA set-up's frozen weights), compiles the same
  specs into Triton's on-disk cache while the weights load; the first step then loads the binaries from disk.
  It shares no GIL with the load, at the price of a second CUDA context (~0.5 GiB of GPU memory) for a few
  seconds. Measured on an H200 (Qwen2.5-VL-7B at 2048, two runs, `scripts/results/h200_2026-12-02q_twentysecond/`,
  before the rotary kernel joined the specs): step 1 7.9 and 8.6 s against 12.0-12.8 s without it, but peft's
  injection 4.4 and 5.7 s against 0.9-1.2 s, so load 7.7 and 9.4 s against 3.8-4.8 s (the recipe's: 5.4 s).
  The injection's slowdown was not the GIL (a separate process) nor the CPU (the helper at niceness 10 changed
  nothing: 2.55 s, `h200_2026-12-02t_twentyfifth/`). The likely cause (not profiled): peft moves each adapter
  to the GPU in its own blocking copy (712 on Qwen, 1,040 on Llama), each waiting on a device the helper's
  context shares. Since the LoRA set-up
  injects on the meta device and copies the adapters in one transfer (`training/lora_init.py`) the helper costs
  the injection nothing (Llama-3.2-11B-Vision at 2048, `h200_2026-12-02v_twentyseventh/`: peft 0.77 s against
  0.83 s without the helper; first step 7.4 s against 11.3 s; load 4.7 s against 5.4 s), so it is the default.
  Skipped with under 2 GiB free on the device (`MIN_FREE_BYTES`).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from hf_fastvision.kernels import warmup

__all__ = ["job_specs", "precompile", "precompile_if_enabled", "start_process", "wait"]

logger = logging.getLogger(__name__)

_DONE = "_hffv_precompiled"  # per model: the specs already started
MIN_FREE_BYTES = 2 << 30  # the helper's CUDA context and its dummy tensors stay well under this
_PENDING: list[Future] = []
_PROCESSES: list[subprocess.Popen] = []
_LOCK = threading.Lock()


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _spec(module: nn.Module, kind: str | None, frozen: bool, act: torch.dtype,
          weights: torch.dtype | None) -> dict[str, Any] | None:
    """``act``: the activations' dtype (the model's); ``weights``: the 16-bit weights' dtype where the instance's
    own do not tell (a meta-device model built before the load), else None."""
    if kind == "rms_norm" and "_hffv_eps" in module.__dict__:
        w = module.weight
        return {"op": "rms_norm", "width": int(w.shape[-1]), "dtype": _name(act),
                "weight_dtype": _name(weights or w.dtype), "trains": bool(w.requires_grad and not frozen),
                "offset": float(module.__dict__["_hffv_offset"]), "eps": float(module.__dict__["_hffv_eps"])}
    if kind == "mlp" and "_hffv_act" in module.__dict__:
        return {"op": "gated_mlp", "act": module.__dict__["_hffv_act"], "dtype": _name(act)}
    if kind == "rope":  # a text attention whose forward calls the fused kernel
        heads = _text_heads(module)
        if heads is None:
            return None
        # transformers' rotary embeddings return cos/sin in the hidden states' dtype
        return {"op": "rope", "layout": "text", "q_heads": heads[0], "kv_heads": heads[1], "head_dim": heads[2],
                "dtype": _name(act), "cos_dtype": _name(act)}
    if kind == "vision_attention":  # the tower's forward says what rotary launch it makes, if any
        from hf_fastvision.archs._vision_attention import rope_warmup_spec

        return rope_warmup_spec(module, _name(act))
    if kind == "fused_loss":
        head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
        w = getattr(head, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
            return None
        return {"op": "fused_loss", "vocab": int(w.shape[0]), "dtype": _name(act),
                "weight_dtype": _name(weights or w.dtype), "trains": bool(w.requires_grad and not frozen),
                "softcap": module.__dict__.get("_hffv_softcap"), "bias": getattr(head, "bias", None) is not None}
    return None


def _text_heads(module: nn.Module) -> tuple[int, int, int] | None:
    """(q heads, k/v heads, head dim) of a text attention with separate q/k projections, else None."""
    head_dim = getattr(module, "head_dim", None)
    q, k = getattr(module, "q_proj", None), getattr(module, "k_proj", None)
    widths = [getattr(m, "out_features", None) for m in (q, k)]
    if not isinstance(head_dim, int) or head_dim <= 0 or not all(isinstance(w, int) for w in widths):
        return None
    if any(w % head_dim for w in widths):
        return None
    return widths[0] // head_dim, widths[1] // head_dim, head_dim


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The activations' dtype: the model's floating parameters' (transformers' ``model.dtype``)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.bfloat16


def _key(spec: dict[str, Any]) -> tuple:
    return tuple(sorted((k, v) for k, v in spec.items() if k != "eps"))  # eps is a runtime float, not specialized


def job_specs(model: nn.Module, frozen: bool = False, dtype: torch.dtype | None = None) -> list[dict[str, Any]]:
    """One spec per distinct kernel specialization the bound patches will launch (plain data: JSON-able).
    ``frozen``: every weight as a LoRA set-up leaves it (frozen). ``dtype``: the dtype the model will be loaded in
    (for a meta-device model built before the load; default: the model's own)."""
    from hf_fastvision.patching import _KIND

    act = dtype or _model_dtype(model)
    specs: dict[tuple, dict[str, Any]] = {}
    for module in model.modules():
        try:
            spec = _spec(module, module.__dict__.get(_KIND), frozen, act, dtype)
        except Exception as exc:  # an unexpected module layout: that kernel compiles in the step, as before
            logger.debug("precompile: skipping %s (%s)", type(module).__name__, exc)
            continue
        if spec is not None:
            specs.setdefault(_key(spec), spec)
    return list(specs.values())


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def precompile(model: nn.Module, *, background: bool = True, max_workers: int = 4, cpu: bool = False,
               frozen: bool = False) -> int:
    """Start compiling the model's kernels in threads (specs not started before for this model); returns how
    many specs. Only on CUDA (``cpu=True`` runs them on CPU too, through the torch references: for tests);
    ``background=False`` runs them here, one after another."""
    from hf_fastvision.kernels import HAS_TRITON

    device = _device(model)
    if not cpu and not (HAS_TRITON and device.type == "cuda"):
        return 0
    done: set = model.__dict__.setdefault(_DONE, set())
    specs = [s for s in job_specs(model, frozen) if _key(s) not in done]
    if not specs:
        return 0
    done.update(_key(s) for s in specs)
    if not background:
        for spec in specs:
            warmup.guarded_run(spec, device)
        return len(specs)
    pool = ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(specs))), thread_name_prefix="hffv-precompile")
    futures = [pool.submit(warmup.guarded_run, spec, device) for spec in specs]
    pool.shutdown(wait=False)
    with _LOCK:
        _PENDING[:] = [f for f in _PENDING if not f.done()] + futures
    return len(specs)


def precompile_if_enabled(model: nn.Module, frozen: bool = False) -> int:
    """`precompile` in threads where the model was loaded with ``patches={"precompile": True}`` (the ``"process"``
    mode starts at load instead); what `get_peft_model` and `for_training` call."""
    from hf_fastvision.patching import PatchOptions

    if PatchOptions.from_value(model.__dict__.get("_hffv_patch_options")).precompile is not True:
        return 0
    return precompile(model, frozen=frozen)


def start_process(meta: nn.Module, spec: Any, options: Any, device: torch.device,
                  dtype: torch.dtype) -> subprocess.Popen | None:
    """``"process"`` mode: patch the meta-device model of the quantization plan, read its specs (weights frozen,
    loaded in `dtype`) and hand them to a helper process on `device`. None where nothing is to compile or it
    cannot start."""
    from hf_fastvision.kernels import HAS_TRITON
    from hf_fastvision.patching import apply_patches

    if not (HAS_TRITON and device.type == "cuda"):
        return None
    try:  # a second CUDA context needs ~0.5 GiB: not on a nearly full device
        if torch.cuda.mem_get_info(device)[0] < MIN_FREE_BYTES:
            logger.debug("precompile: under %d bytes free on %s, no helper process", MIN_FREE_BYTES, device)
            return None
    except Exception:  # no answer (no CUDA here): try anyway, a failed start only means no helper
        pass
    try:
        apply_patches(meta, spec, options)
        specs = job_specs(meta, frozen=True, dtype=dtype)
        if not specs:
            return None
        proc = subprocess.Popen(warmup.helper_command(device.index or 0), stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(specs).encode())
        proc.stdin.close()
    except Exception as exc:
        logger.debug("precompile: no helper process (%s: %s)", type(exc).__name__, exc)
        return None
    with _LOCK:
        _PROCESSES[:] = [p for p in _PROCESSES if p.poll() is None] + [proc]
    return proc


def wait(timeout: float | None = 120.0) -> None:
    """Block until the background threads started so far have finished (or `timeout` seconds passed); reap
    finished helper processes."""
    with _LOCK:
        pending = list(_PENDING)
    for future in pending:
        try:
            future.result(timeout=timeout)
        except Exception:  # a timeout: the capture goes ahead; `_guarded` already swallows job errors
            break
    with _LOCK:
        _PENDING[:] = [f for f in _PENDING if not f.done()]
        _PROCESSES[:] = [p for p in _PROCESSES if p.poll() is None]
