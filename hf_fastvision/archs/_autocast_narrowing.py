"""Which linears compute in the autocast dtype whatever their input's float dtype (shared by the Mllama patches).

Under 16-bit autocast, bitsandbytes' 4-bit linears (and the fused LoRA op, which matches them) narrow their input
to the compute dtype and widen the result back to the *input's* dtype, so a model whose norms run in fp32 (autocast
runs ``nn.LayerNorm`` in fp32) pays an fp32 round trip around every such linear. Where a linear computes in the
autocast dtype anyway, feeding it the narrowed input gives the same numbers; these helpers say where that holds.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["answers_in_input_dtype", "autocast_dtype", "narrows_to"]


def _is_4bit(layer: nn.Module) -> bool:
    return type(layer).__name__ == "Linear4bit" and hasattr(layer, "compute_dtype")


def narrows_to(layer: nn.Module, dtype: torch.dtype, x: torch.Tensor) -> bool:
    """Whether ``layer(x)`` computes in ``dtype`` whatever ``x``'s float dtype (under autocast to ``dtype``)."""
    if type(layer) is nn.Linear:
        return True
    if _is_4bit(layer):
        return layer.compute_dtype == dtype
    if hasattr(layer, "get_base_layer") and hasattr(layer, "lora_A"):  # peft LoRA
        from hf_fastvision.patching import _KIND, _lora_fusable

        base = layer.get_base_layer()
        if _is_4bit(base):
            return base.compute_dtype == dtype and layer.__dict__.get(_KIND) == "lora" and _lora_fusable(layer, x)
        if type(base) is not nn.Linear or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
            return False
        name = layer.active_adapters[0]
        dropout = layer.lora_dropout[name] if name in layer.lora_dropout else None
        no_dropout = isinstance(dropout, nn.Identity) or getattr(dropout, "p", 1.0) == 0.0 or not layer.training
        plain = type(layer.lora_A[name]) is nn.Linear and type(layer.lora_B[name]) is nn.Linear
        return no_dropout and plain and name not in getattr(layer, "lora_variant", {})
    return False


def answers_in_input_dtype(layer: nn.Module) -> bool:
    """4-bit linears (bitsandbytes, and the fused LoRA op over them) return the input's dtype; autocast's
    ``nn.Linear`` (bare or under peft's LoRA) returns the autocast dtype."""
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    return _is_4bit(base)


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The 16-bit dtype autocast gives ``x``'s device type, or None (autocast off, or not 16-bit)."""
    kind = x.device.type
    if not torch.is_autocast_enabled(kind):
        return None
    dtype = torch.get_autocast_dtype(kind)
    return dtype if dtype in (torch.bfloat16, torch.float16) else None
