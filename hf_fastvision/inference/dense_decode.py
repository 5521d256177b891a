"""A 16-bit decode copy of a 4-bit model's language linears, inside ``gpu_memory_utilization``.

At decode time bitsandbytes 0.50 runs a 4-bit linear of more than one row as *dequantize the whole weight to
16-bit, then GEMM*: every step writes and reads back 2 bytes per parameter on top of the 0.5 it reads. On an H200
a batch-8 decode of a 7B model ran at 2.4x `generate` that way against 3.7x at batch 1 (`scripts/bench_generate.py`,
2026-12-01). Keeping the dequantized weights for the decode steps removes both the dequantization and its traffic.

The copy is exactly what bitsandbytes computes for a multi-row input (``dequantize_4bit(W, state).to(compute)``,
then ``F.linear``), so prefill and batched decode steps give the same numbers as `generate`; a one-row step (batch
1) goes through bitsandbytes' 4-bit GEMV in `generate` and through the dense weight here: equal up to fp32
accumulation order.

- Which layers: the 4-bit linears outside the vision tower (the tower runs once per prompt, in prefill), in model
  order, as long as the copy fits the budget the caller gives.
- Where: a non-persistent buffer ``_hffv_dense_weight`` on each bnb ``Linear4bit`` (moved by ``.to``, never
  saved), with an instance forward that uses it when the module is not training; `unbind_dense_decode` deletes
  the buffers and frees the memory (`for_training` does it through `disable_fast_inference`).
- LoRA: PEFT's 4-bit LoRA layer calls its base layer and adds the adapter, so adapters apply unmerged on top.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from hf_fastvision.inference.decode_kernels import _is_linear4bit

__all__ = ["bind_dense_decode", "unbind_dense_decode", "dense_decode_bound", "dense_decode_bytes", "dense_decode_held"]

_BUF = "_hffv_dense_weight"
_PREV = "_hffv_dense_prev_forward"


def _vision_prefixes(model: nn.Module) -> tuple[str, ...]:
    from hf_fastvision.registry import get_arch, resolve_roots

    try:
        return tuple(p + "." for p in resolve_roots(get_arch(model.config), model).vision)
    except Exception:  # noqa: BLE001 - unknown family or moved modules: treat every 4-bit linear as a candidate
        return ()


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    skip = _vision_prefixes(model)
    out = []
    for name, module in model.named_modules():
        if not _is_linear4bit(module) or getattr(module.weight, "quant_state", None) is None:
            continue
        if any(name.startswith(p) for p in skip):
            continue
        out.append((name, module))
    return out


def _compute_dtype(module: nn.Module) -> torch.dtype:
    dtype = getattr(module, "compute_dtype", None) or module.weight.quant_state.dtype
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16


def _dense_bytes(module: nn.Module) -> int:
    shape = module.weight.quant_state.shape
    return int(shape[0]) * int(shape[1]) * torch.finfo(_compute_dtype(module)).bits // 8


def dense_decode_bytes(model: nn.Module) -> int:
    """Bytes a 16-bit decode copy of the candidate linears of `model` not copied yet would take."""
    return sum(_dense_bytes(m) for _, m in _candidates(model) if _BUF not in m._buffers)


def _dense_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    weight = self._buffers.get(_BUF)
    if weight is None or self.training or args or kwargs:
        prev = self.__dict__.get(_PREV)
        return (prev if prev is not None else type(self).forward.__get__(self))(x, *args, **kwargs)
    bias = self.bias.to(weight.dtype) if self.bias is not None else None
    return torch.nn.functional.linear(x.to(weight.dtype), weight, bias).to(x.dtype)


def bind_dense_decode(model: nn.Module, budget_bytes: int | None = None) -> tuple[int, int]:
    """Give the 4-bit language linears of `model` a 16-bit decode copy, in model order, while the copies fit in
    `budget_bytes` (None: all of them). Returns ``(layers, bytes)`` newly copied. Idempotent."""
    import bitsandbytes.functional as bnbf

    from hf_fastvision.quantization import canonical_4bit

    count = used = 0
    for _name, module in _candidates(model):
        if _BUF in module._buffers:
            continue
        size = _dense_bytes(module)
        if budget_bytes is not None and used + size > budget_bytes:
            break
        weight = canonical_4bit(module.weight)
        with torch.no_grad():
            dense = bnbf.dequantize_4bit(weight.data, weight.quant_state).to(_compute_dtype(module))
        module.register_buffer(_BUF, dense.contiguous(), persistent=False)
        module.__dict__[_PREV] = module.__dict__.get("forward")
        module.forward = types.MethodType(_dense_forward, module)
        count += 1
        used += size
    return count, used


def unbind_dense_decode(model: nn.Module) -> int:
    """Delete the decode copies and restore the forwards; returns how many layers."""
    from hf_fastvision.patching import restore_forward

    count = 0
    for module in model.modules():
        if _BUF in module._buffers:
            del module._buffers[_BUF]
            restore_forward(module, module.__dict__.pop(_PREV, None))
            count += 1
    return count


def dense_decode_bound(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if _BUF in m._buffers)


def dense_decode_held(model: nn.Module) -> int:
    """Bytes the decode copies bound on `model` take now."""
    return sum(b.numel() * b.element_size() for m in model.modules() if (b := m._buffers.get(_BUF)) is not None)
