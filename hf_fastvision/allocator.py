"""The CUDA caching allocator's set-up: expandable segments, unless the user chose otherwise.

Why: with CUDA graphs a QLoRA step holds two kinds of cached memory, the graphs' private pool and the eager
allocator's blocks. With fixed-size segments the eager side fragments: on Llama-3.2-11B-Vision at seq 8192 it
reserved 15.2 GiB for 11.0 GiB allocated (H200, `scripts/bench_qlora.py`). Expandable segments map
physical pages into one growing virtual range per pool and stream, so freed blocks merge and reserved memory stays
close to allocated memory. Unsloth turns the same setting on when it is imported.

How: `configure()` runs when `hf_fastvision` is imported. It only writes the environment variable torch reads when
the allocator starts, and only when all of these hold:

- no allocator variable is set (``PYTORCH_ALLOC_CONF``, ``PYTORCH_CUDA_ALLOC_CONF``; the user's choice wins);
- ``HF_FASTVISION_EXPANDABLE_SEGMENTS`` is not ``0`` (the opt-out);
- CUDA has not started in this process (the allocator would not read the variable any more);
- the platform supports expandable segments (not Windows, not WSL, not ROCm).

It changes no numbers, only how memory is reserved.
"""

from __future__ import annotations

import os
import sys

__all__ = ["configure", "OPT_OUT", "SETTING"]

OPT_OUT = "HF_FASTVISION_EXPANDABLE_SEGMENTS"
SETTING = "expandable_segments:True"
_USER_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


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
    if env.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"off ({OPT_OUT}=0)"
    for var in _USER_VARS:
        if var in env:
            return f"left to the user ({var} is set)"
    platform = _unsupported_platform()
    if platform:
        return f"unsupported on {platform}"
    import torch  # the package imports it right after; importing it does not start CUDA

    if getattr(torch.version, "hip", None):
        return "unsupported on ROCm"
    try:
        if torch.cuda.is_initialized():
            return "too late (CUDA already started)"
    except Exception:  # pragma: no cover - a torch without CUDA support
        return "no CUDA"
    env[_variable()] = SETTING
    return "set"


def _variable() -> str:
    """torch >= 2.10 reads ``PYTORCH_ALLOC_CONF`` (the CUDA-specific name is deprecated there); older ones only
    ``PYTORCH_CUDA_ALLOC_CONF``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        major, minor = (int(p) for p in version("torch").split("+")[0].split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return "PYTORCH_CUDA_ALLOC_CONF"
    return "PYTORCH_ALLOC_CONF" if (major, minor) >= (2, 10) else "PYTORCH_CUDA_ALLOC_CONF"
