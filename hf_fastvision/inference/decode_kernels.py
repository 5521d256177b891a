"""Few-token 4-bit matmuls for generation: bitsandbytes ``Linear4bit`` layers run `kernels.nf4_matmul` when a call
has at most ``MAX_ROWS`` rows (a decode step of a batch of up to 16), and their own forward otherwise.

Bound per instance by `enable_fast_inference` (on CUDA) and removed by `disable_fast_inference`; the previous
instance forward (if any) is kept and called for every other input. If the kernel cannot run on this machine
(e.g. a Triton too old to compile it), the first failure switches it off for the process with one warning and the
layers fall back to bitsandbytes.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch
from torch import nn

__all__ = ["bind_decode_kernels", "unbind_decode_kernels", "decode_kernels_bound"]

logger = logging.getLogger(__name__)

_PREV = "_hffv_decode_prev_forward"
_BROKEN: dict[str, str] = {}


def _is_linear4bit(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Linear4bit" and cls.__module__.startswith("bitsandbytes")


def _previous(module: nn.Module) -> Any:
    prev = module.__dict__.get(_PREV)
    return prev if prev is not None else type(module).forward.__get__(module)


def _decode_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    from hf_fastvision.kernels.nf4_matmul import nf4_matmul, supports

    weight = self.weight
    state = getattr(weight, "quant_state", None)
    if args or kwargs or self.training or _BROKEN or state is None or not isinstance(x, torch.Tensor):
        return _previous(self)(x, *args, **kwargs)
    compute = getattr(self, "compute_dtype", None) or x.dtype
    xc = x.to(compute)
    if not supports(xc, weight, state):
        return _previous(self)(x, *args, **kwargs)
    try:
        out = nf4_matmul(xc, weight, state, self.bias)
    except Exception as exc:  # noqa: BLE001 - a kernel that cannot compile here must not break generation
        _BROKEN["reason"] = f"{type(exc).__name__}: {exc}"[:300]
        logger.warning("nf4 decode kernel disabled (%s); bitsandbytes' matmul is used instead", _BROKEN["reason"])
        return _previous(self)(x, *args, **kwargs)
    return out.to(x.dtype)


def bind_decode_kernels(model: nn.Module) -> int:
    """Bind the few-row kernel onto every bitsandbytes 4-bit linear of `model`; returns how many. Idempotent."""
    count = 0
    for module in model.modules():
        if _is_linear4bit(module) and _PREV not in module.__dict__:
            module.__dict__[_PREV] = module.__dict__.get("forward")
            module.forward = types.MethodType(_decode_forward, module)
            count += 1
    return count


def unbind_decode_kernels(model: nn.Module) -> int:
    """Restore the forwards `bind_decode_kernels` replaced; returns how many."""
    count = 0
    for module in model.modules():
        if _PREV in module.__dict__:
            prev = module.__dict__.pop(_PREV)
            if prev is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = prev
            count += 1
    return count


def decode_kernels_bound(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if _PREV in m.__dict__)
