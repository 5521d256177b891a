"""Few-token 4-bit matmuls for generation: bitsandbytes ``Linear4bit`` layers run `kernels.nf4_matmul` when a call
has at most ``MAX_ROWS`` rows (a decode step of a batch of up to 16), and their own forward otherwise.

Bound per instance by `enable_fast_inference` (on CUDA) and removed by `disable_fast_inference`; the previous
instance forward (if any) is kept and called for every other input. The weight-side arguments are computed when
binding, so the forward that `torch.compile` traces in the decode step holds only shape checks and one custom op.
If the kernel cannot run on this machine (e.g. a Triton too old to compile it), the op falls back to dequantize +
matmul from the same tensors, with one warning.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

__all__ = ["bind_decode_kernels", "unbind_decode_kernels", "decode_kernels_bound"]

_PREV = "_hffv_decode_prev_forward"
_ARGS = "_hffv_nf4_args"
_COMPUTE = "_hffv_nf4_compute_dtype"


def _is_linear4bit(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Linear4bit" and cls.__module__.startswith("bitsandbytes")


def _previous(module: nn.Module) -> Any:
    prev = module.__dict__.get(_PREV)
    return prev if prev is not None else type(module).forward.__get__(module)


def _decode_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    # traced by torch.compile in the decode step: shape checks only (static there), everything else was decided
    # when binding; a kernel failure is handled inside the op
    from hf_fastvision.kernels.nf4_matmul import MAX_ROWS, nf4_matmul_with

    layer_args = getattr(self, _ARGS)
    if args or kwargs or self.training or x.dim() == 0 or x.shape[-1] != layer_args[7]:
        return _previous(self)(x, *args, **kwargs)
    if x.numel() // x.shape[-1] > MAX_ROWS:
        return _previous(self)(x, *args, **kwargs)
    compute = getattr(self, _COMPUTE) or x.dtype
    return nf4_matmul_with(x.to(compute), layer_args, self.bias).to(x.dtype)


def bind_decode_kernels(model: nn.Module, force: bool = False) -> int:
    """Bind the few-row kernel onto every bitsandbytes 4-bit linear of `model` whose weight it can take; returns
    how many. Idempotent. Needs Triton and CUDA weights (``force=True``: any device, for tests under the Triton
    interpreter)."""
    from hf_fastvision.kernels._utils import HAS_TRITON
    from hf_fastvision.kernels.nf4_matmul import layer_args

    if not HAS_TRITON:
        return 0
    count = 0
    for module in model.modules():
        if not _is_linear4bit(module) or _PREV in module.__dict__ or "_hffv_dense_weight" in module._buffers:
            continue  # already bound, or decoding from a 16-bit copy (`dense_decode.py`)
        from hf_fastvision.quantization import canonical_4bit

        weight = canonical_4bit(module.weight)  # not bitsandbytes' CPU GEMV layout
        state = getattr(weight, "quant_state", None)
        if state is None or (not weight.is_cuda and not force):
            continue
        args = layer_args(weight, state)
        if args is None:
            continue
        compute = getattr(module, "compute_dtype", None) or state.dtype
        module.__dict__[_ARGS] = args
        module.__dict__[_COMPUTE] = compute
        module.__dict__[_PREV] = module.__dict__.get("forward")
        module.forward = types.MethodType(_decode_forward, module)
        count += 1
    return count


def unbind_decode_kernels(model: nn.Module) -> int:
    """Restore the forwards `bind_decode_kernels` replaced; returns how many."""
    count = 0
    from hf_fastvision.patching import restore_forward

    for module in model.modules():
        if _PREV in module.__dict__:
            module.__dict__.pop(_ARGS, None)
            module.__dict__.pop(_COMPUTE, None)
            restore_forward(module, module.__dict__.pop(_PREV))
            count += 1
    return count


def decode_kernels_bound(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if _PREV in m.__dict__)
