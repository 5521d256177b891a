"""The CUDA caching allocator's set-up: expandable segments, unless the user chose otherwise.

Why: with CUDA graphs a QLoRA step holds two kinds of cached memory, the graphs' private pool and the eager
allocator's blocks. With fixed-size segments the eager side fragments: on Llama-3.2-11B-Vision at seq 8192 it
reserved 15.2 GiB for 11.0 GiB allocated (H200, `scripts/bench_qlora.py`). Expandable segments map
physical pages into one growing virtual range per pool and stream, so freed blocks merge and reserved memory stays
close to allocated memory. Unsloth turns the same setting on when it is imported.

How: `configure()` runs when `hf_fastvision` is imported and decides, once, when the setting takes effect;
`HF_FASTVISION_EXPANDABLE_SEGMENTS` chooses:

- ``train`` (the default): nothing at import; `enable_for_training()` switches the running allocator over when
  training starts: in `FastVisionModel.for_training` (which `get_peft_model` runs), at the end of a
  ``full_finetuning=True`` load, or else in the patched model's first training forward with labels. By then the
  weights sit in fixed-size segments, and the load's freed blocks are handed back first. Why: every expandable-segment growth maps pages, with
  some synchronisation, and the load makes thousands of allocations; on the H200, Qwen2.5-VL-7B's load took
  6.0 s with expandable segments from import and 4.9 s deferred (the recipe: 5.4 s), same peak and reserved
  memory (`scripts/results/h200_2026-12-02n_nineteenth/`);
- ``import``: it writes the environment variable torch reads when the allocator starts, so every allocation, the
  load's included, goes to expandable segments;
- ``0`` (also ``false``/``no``/``off``): never.

Either way it does nothing when any of these holds:

- an allocator variable is set (``PYTORCH_ALLOC_CONF``, ``PYTORCH_CUDA_ALLOC_CONF``; the user's choice wins);
- in ``import`` mode, CUDA has started before the import (the allocator would not read the variable any more;
  ``train`` mode switches at run time, so a late import still gets expandable segments for training);
- the platform does not support expandable segments (Windows, WSL, ROCm).

It changes no numbers, only how memory is reserved.
"""

from __future__ import annotations

import os
import sys

__all__ = ["configure", "enable_for_training", "OPT_OUT", "SETTING"]

OPT_OUT = "HF_FASTVISION_EXPANDABLE_SEGMENTS"
SETTING = "expandable_segments:True"
_USER_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
_OFF = ("0", "false", "no", "off")
_ON = ("1", "true", "yes", "on")  # the old on-switch: the default
_MODES = ("import", "train")
_pending: list[bool] = []  # [True] while `enable_for_training` still has to switch the allocator over


def _unsupported_platform() -> str | None:
    if sys.platform.startswith("win"):
        return "Windows"
    if os.environ.get("WSL_DISTRO_NAME") or os.environ.get("WSL_INTEROP"):
        return "WSL"
    try:
        with open("/proc/version", encoding="utf-8") as fh:
            if "microsoft" in fh.read().lower():
                return "WSL"
    except OSError:
        pass
    return None


def configure(environ: dict[str, str] | None = None) -> str:
    """Set expandable segments where allowed; returns what happened (``"set"`` or why not), for logs and tests."""
    env = os.environ if environ is None else environ
    _pending.clear()
    mode = env.get(OPT_OUT, "").strip().lower()
    if mode in _OFF:
        return f"off ({OPT_OUT}={mode})"
    mode = "train" if mode in _ON or not mode else mode
    if mode not in _MODES:
        raise ValueError(f"{OPT_OUT}={mode!r}: use one of import, train, 0")
    for var in _USER_VARS:
        if var in env:
            return f"left to the user ({var} is set)"
    platform = _unsupported_platform()
    if platform:
        return f"unsupported on {platform}"
    import torch  # the package imports it right after; importing it does not start CUDA

    if getattr(torch.version, "hip", None):
        return "unsupported on ROCm"
    if mode == "train":  # switched at run time: works whether or not CUDA has started
        _pending.append(True)
        return "deferred to training"
    try:
        if torch.cuda.is_initialized():
            return "too late (CUDA already started)"
    except Exception:  # pragma: no cover - a torch without CUDA support
        return "no CUDA"
    env[_variable()] = SETTING
    return "set"


def enable_for_training() -> str:
    """Switch the allocator to expandable segments now, when `configure` deferred it (``train`` mode).

    Segments reserved so far stay fixed-size; blocks the load freed are handed back first, so training's memory
    grows in expandable segments only. Idempotent; returns what happened.
    """
    if not _pending:
        return "nothing deferred"
    import torch

    _pending.clear()
    if not torch.cuda.is_available():
        return "no CUDA"
    if not torch.cuda.is_initialized():  # nothing allocated on the GPU yet: the variable still works
        os.environ[_variable()] = SETTING
        return "set"
    try:
        torch.cuda.empty_cache()
        setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)  # torch >= 2.9; the CUDA one warns
        (setter or torch.cuda.memory._set_allocator_settings)(SETTING)
    except Exception as exc:  # pragma: no cover - a torch without the runtime setter
        return f"failed ({type(exc).__name__}: {exc})"
    return "switched at training"


def _variable() -> str:
    """torch >= 2.10 reads ``PYTORCH_ALLOC_CONF`` (the CUDA-specific name is deprecated there); older ones only
    ``PYTORCH_CUDA_ALLOC_CONF``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = (int(p) for p in version("torch").split("+")[0].split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return "PYTORCH_CUDA_ALLOC_CONF"
    return "PYTORCH_ALLOC_CONF" if (major, minor) >= (2, 10) else "PYTORCH_CUDA_ALLOC_CONF"
