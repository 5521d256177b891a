"""The gated MLP of a checkpointed layer, saving only its input (patch flag ``mlp_lean_recompute``, on by default).

With activation checkpointing a layer runs its forward twice: once without saving anything, and again in the
backward ("recompute") to rebuild what its backward needs. For the gated MLP ``down(act(gate(x)) * up(x))``,
the recompute has two costs that buy nothing:

- it runs ``down``'s forward, whose output only feeds the layer's output, and the recomputed layer output's values
  are never read: it only anchors the backward. That is one of the MLP's three big matmuls, per layer and step.
- it keeps ``gate``, ``up`` and the activation of *every* token alive through the layer's backward: at 8192
  tokens and Llama's width 14336, ~0.7 GiB at the step's peak, and the size of the CUDA graphs' pool.

Here the MLP is one autograd op that saves only ``x``. In the checkpoint's first forward it computes its output
in token chunks without saving anything. In the recompute it returns zeros of the output's shape instead of
computing it. Its backward recomputes ``gate`` and ``up`` per chunk of 4096 rows and, where all three
projections are fused 4-bit LoRA layers (the QLoRA case), takes every gradient without an autograd graph:
``lora_linear_4bit_grads`` for ``down``, ``gate`` and ``up`` (``down``'s forward never runs) and ``swiglu_grads``
/ ``geglu_grads`` for the activation. Otherwise it goes through autograd per chunk (``down`` still fused where it
can be). That path is kept out of CUDA graph captures: nested autograd inside a captured backward left one
activation per layer allocated on an H200 (+2.2 GiB on Qwen2.5-VL-7B at 2048 tokens), so while a graph captures,
such a layer runs the plain MLP.

Zeros in place of the recomputed output are exact only when nothing in the layer's backward reads the MLP
output's value. That holds where it only enters the residual add (``residual + mlp(x)``), or is scaled by a frozen
weight first, so the arch specs list those layer classes (``patches["lean_mlp"]``, with a predicate of the layer
where it depends on which weights train: Mllama's cross-attention layers and their MLP gate). Everywhere else,
and outside a checkpointed layer, the MLP runs as before. The checkpointing code says which pass is running
(`checkpoint_pass`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["checkpoint_pass", "current_pass", "lean_mlp_forward", "chunk_tokens", "DEFAULT_CHUNK_TOKENS"]

# Every chunk dequantizes the three 4-bit weights again (in its forward and its backward): at 1024 tokens that cost
# (~40 us per weight and call on an H200) outweighs the saved matmul, so chunks are large; 8192 tokens make 2.
DEFAULT_CHUNK_TOKENS = 4096
_STATE = threading.local()  # the autograd engine recomputes in its own thread: the flag is per thread
_OUT = "_hffv_lean_out"  # per MLP: {(x dtype, width, autocast): (out features, out dtype)} from a real forward


def chunk_tokens(value: bool | int) -> int:
    """Tokens per chunk for the flag's value: ``True`` -> the default, a positive int -> itself."""
    if value is True:
        return DEFAULT_CHUNK_TOKENS
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise ValueError(f"mlp_lean_recompute takes True or a positive number of tokens per chunk, got {value!r}")


@contextlib.contextmanager
def checkpoint_pass(recompute: bool) -> Iterator[None]:
    """Mark the layer code run inside as a checkpointed layer's first forward (False) or its recompute (True)."""
    previous = getattr(_STATE, "recompute", None)
    _STATE.recompute = recompute
    try:
        yield
    finally:
        _STATE.recompute = previous


def current_pass() -> bool | None:
    """True in a checkpointed layer's recompute, False in its first forward, None outside checkpointed layers."""
    return getattr(_STATE, "recompute", None)


def lean_mlp_forward(mlp: nn.Module, x: torch.Tensor, op: Callable[..., torch.Tensor], chunk: int) -> Any:
    """The MLP's output through the lean path, or ``NotImplemented`` where the plain forward must run."""
    recompute = current_pass()
    if recompute is None or not x.is_floating_point() or _plain_only(mlp):
        return NotImplemented
    if not torch.is_grad_enabled():  # e.g. the CUDA graph of a checkpointed layer's forward
        return _chunked(mlp, x, op, chunk)
    from hf_fastvision.training.cuda_graphs import _trainable_slots  # (cuda_graphs imports this module)

    up_slots = _trainable_slots(mlp.gate_proj) + _trainable_slots(mlp.up_proj)
    down_slots = _trainable_slots(mlp.down_proj)
    if not (x.requires_grad or up_slots or down_slots):
        return NotImplemented
    out_meta = mlp.__dict__.get(_OUT, {}).get(_meta_key(x))
    skip = bool(recompute) and out_meta is not None
    slots = up_slots + down_slots
    params = [module._parameters[name] for module, name in slots]
    if any(type(p).__name__ == "DTensor" or p.untyped_storage().size() == 0 for p in params):
        return NotImplemented  # sharded (FSDP2) weights: the plain path, which their wrappers gather for
    if _capturing(x) and (_act_grads(op) is None or _fused_parts(mlp, params, x) is None):
        # a CUDA graph's recompute + backward: only the graph-free backward. Through nested autograd a backward
        # captured in a graph kept one activation per layer allocated (+2.2 GiB on Qwen2.5-VL-7B at 2048)
        return NotImplemented
    return _LeanMLPFunction.apply(x, mlp, op, chunk, out_meta if skip else None, (slots, len(up_slots)), *params)


def _plain_only(mlp: nn.Module) -> bool:
    """MLPs the lean path must leave alone, in every pass: FSDP-wrapped parts (the wrappers' hooks gather the
    weights), and active dropout (e.g. peft's ``lora_dropout``): the backward's recompute of gate/up would draw new
    masks, while the checkpoint's recompute replays the forward's random state (and a chunked forward draws them
    in another order than the plain one)."""
    for m in mlp.modules():
        if type(m).__name__ == "FullyShardedDataParallel":
            return True
        if m.training and isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return True
    return False


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _meta_key(x: torch.Tensor) -> tuple:
    device = x.device.type
    return x.dtype, x.shape[-1], torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)


def _chunked(mlp: nn.Module, x: torch.Tensor, op: Callable[..., torch.Tensor], chunk: int) -> torch.Tensor:
    """``down(op(gate(x), up(x)))`` over chunks of rows (the output of a forward whose intermediates die here)."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] <= chunk:  # one chunk: its output is the output (no copy into a buffer)
        out = mlp.down_proj(op(mlp.gate_proj(rows), mlp.up_proj(rows)))
    else:
        out = None
        for start in range(0, rows.shape[0], chunk):
            piece = rows[start : start + chunk]
            y = mlp.down_proj(op(mlp.gate_proj(piece), mlp.up_proj(piece)))
            if out is None:
                out = y.new_empty(rows.shape[0], y.shape[-1])
            out[start : start + chunk] = y
    mlp.__dict__.setdefault(_OUT, {})[_meta_key(x)] = (out.shape[-1], out.dtype)
    return out.reshape(*x.shape[:-1], out.shape[-1])


class _LeanMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mlp, op, chunk, skip_meta, layout, *params):
        ctx.save_for_backward(x)
        ctx.mlp, ctx.op, ctx.chunk, ctx.params = mlp, op, chunk, params
        ctx.slots, ctx.n_up = layout
        device = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        if skip_meta is not None:  # the recompute: the output's value is never read (see the module docstring)
            features, dtype = skip_meta
            return x.new_zeros(*x.shape[:-1], features, dtype=dtype)
        with torch.no_grad():
            return _chunked(mlp, x, op, chunk)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        mlp, op, chunk, n_up = ctx.mlp, ctx.op, ctx.chunk, ctx.n_up
        params = list(ctx.params)
        need_x = ctx.needs_input_grad[0]
        enabled, dtype = ctx.autocast
        from hf_fastvision.training.cuda_graphs import _swapped_params  # (cuda_graphs imports this module)

        # the weights the forward saw (a CUDA graph's aliases of them): the same tensors get the gradients
        with _swapped_params(ctx.slots, params), \
                torch.autocast(x.device.type, dtype=dtype, enabled=enabled, cache_enabled=False):
            parts = _fused_parts(mlp, params, x)
            act_grads = _act_grads(op)
            if parts is not None and act_grads is not None:
                dx, grads = _backward_fused(mlp, op, act_grads, parts, params, x, grad_out, chunk, need_x)
            else:
                with torch.enable_grad():
                    dx, grads = _backward_autograd(mlp, op, params, n_up, x, grad_out, chunk, need_x)
        return (dx.reshape(x.shape) if need_x else None, None, None, None, None, None, *grads)


def _backward_fused(mlp, op, act_grads, parts, params, x, grad_out, chunk, need_x):
    """The backward where gate, up and down are all 4-bit linears (fused LoRA layers, or frozen without an
    adapter; `_fused_parts`): no autograd graph at all. Per chunk: gate/up forward, the activation, then each
    projection's gradients (`lora_linear_4bit_grads`) and the activation's (`swiglu_grads` / `geglu_grads`,
    written over the chunk's own gate/up outputs)."""
    from hf_fastvision.kernels.lora_linear_4bit import lora_linear_4bit_grads

    rows, grad_rows = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
    dx = torch.empty_like(rows) if need_x and rows.shape[0] > chunk else None
    total: dict[int, torch.Tensor] = {}
    gate, up, down = parts
    for start in range(0, rows.shape[0], chunk):
        xc = rows[start : start + chunk]
        with torch.no_grad():
            gate_out, up_out = mlp.gate_proj(xc), mlp.up_proj(xc)
            act = op(gate_out, up_out)
        d_act, *found = lora_linear_4bit_grads(act, *down, grad_rows[start : start + chunk])
        _accumulate(total, down, found)
        del act
        d_gate, d_up = act_grads(d_act, gate_out, up_out, overwrite_inputs=True)
        del d_act
        dx_gate, *found = lora_linear_4bit_grads(xc, *gate, d_gate, need_x=need_x)
        _accumulate(total, gate, found)
        dx_up, *found = lora_linear_4bit_grads(xc, *up, d_up, need_x=need_x)
        _accumulate(total, up, found)
        if need_x and dx is None:  # one chunk: its gradient is the gradient (already in the input's dtype)
            dx = dx_gate.add_(dx_up)
        elif need_x:
            dx[start : start + chunk] = dx_gate.add_(dx_up)
    return dx, [total.get(id(p)) for p in params]


def _backward_autograd(mlp, op, params, n_up, x, grad_out, chunk, need_x):
    """The backward through autograd per chunk (any gate/up; ``down`` fused where it is a 4-bit LoRA layer)."""
    up_params, down_params = params[:n_up], params[n_up:]
    rows, grad_rows = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
    dx = torch.empty_like(rows) if need_x else None
    up_grads: list[torch.Tensor | None] = [None] * len(up_params)
    down_grads: list[torch.Tensor | None] = [None] * len(down_params)
    fused = _fused_down(mlp.down_proj, down_params, x)
    for start in range(0, rows.shape[0], chunk):
        xc = rows[start : start + chunk].detach().requires_grad_(need_x)
        act = op(mlp.gate_proj(xc), mlp.up_proj(xc), overwrite_inputs=True)
        g = grad_rows[start : start + chunk]
        if fused is not None:
            d_act, found_down = fused(act.detach(), g)
        else:  # autograd through `down` (its forward runs: not a fused 4-bit LoRA layer)
            leaf = act.detach().requires_grad_(True)
            found = torch.autograd.grad(mlp.down_proj(leaf), [leaf, *down_params], g, allow_unused=True)
            d_act, found_down = found[0], found[1:]
        wrt = ([xc] if need_x else []) + up_params
        found_up = list(torch.autograd.grad(act, wrt, d_act, allow_unused=True)) if wrt else []
        if need_x:
            dx[start : start + chunk] = found_up.pop(0)
        up_grads = [_add(t, v) for t, v in zip(up_grads, found_up)]
        down_grads = [_add(t, v) for t, v in zip(down_grads, found_down)]
    return dx, up_grads + down_grads


def _accumulate(total: dict[int, torch.Tensor], part: tuple, found: list[torch.Tensor | None]) -> None:
    """Add a projection's (d lora_a, d lora_b) to the totals by parameter."""
    for param, grad in zip(part[2:4], found):
        if grad is not None and param is not None:
            total[id(param)] = grad if id(param) not in total else total[id(param)].add_(grad)


def _act_grads(op: Callable) -> Callable | None:
    """The graph-free backward of the MLP's activation op (`swiglu_grads` / `geglu_grads`), else None."""
    from hf_fastvision import kernels

    return {kernels.swiglu: kernels.swiglu_grads, kernels.geglu: kernels.geglu_grads}.get(op)


def _lora_parts(module: nn.Module, x: torch.Tensor) -> tuple | None:
    """``(weight, quant_state, lora_a, lora_b, scaling)`` of a peft 4-bit LoRA layer the fused op computes
    exactly (`patching._lora_fusable`), ``(weight, quant_state, None, None, 0.0)`` of a bitsandbytes 4-bit linear
    without an adapter, else None."""
    from hf_fastvision.patching import _lora_fusable, lora_4bit_parts

    if not hasattr(module, "lora_A"):
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None or type(module).__name__ != "Linear4bit" or module.weight.requires_grad:
            return None
        return module.weight, state, None, None, 0.0
    if not hasattr(module, "get_base_layer") or not _lora_fusable(module, x):
        return None
    weight, state, lora_a, lora_b, scaling, _bias = lora_4bit_parts(module)  # a frozen bias adds no gradient
    return weight, state, lora_a, lora_b, float(scaling)


def _fused_parts(mlp: nn.Module, params: list[torch.Tensor], x: torch.Tensor) -> tuple | None:
    """The three projections' `_lora_parts` when all are 4-bit linears the graph-free backward handles and
    ``params`` (the MLP's trainable weights) are among their adapters' weights; else None."""
    parts = tuple(_lora_parts(m, x) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    if any(p is None for p in parts):
        return None
    adapters = {id(w) for part in parts for w in part[2:4] if w is not None}
    return parts if all(id(p) in adapters for p in params) else None


def _add(total: torch.Tensor | None, value: torch.Tensor | None) -> torch.Tensor | None:
    if value is None:
        return total
    return value if total is None else total.add_(value)


def _fused_down(down: nn.Module, down_params: list[torch.Tensor], x: torch.Tensor) -> Callable | None:
    """``(act, grad) -> (d act, [grads of down_params])`` without ``down``'s forward, for a peft 4-bit LoRA layer
    the fused op computes exactly (trainable: its adapter's two weights); else None (autograd through ``down``)."""
    part = _lora_parts(down, x) if down_params else None  # x stands for down's input (a floating tensor)
    if part is None or [id(p) for p in down_params] != [id(part[2]), id(part[3])]:
        return None
    from hf_fastvision.kernels.lora_linear_4bit import lora_linear_4bit_grads

    def grads(act: torch.Tensor, g: torch.Tensor):
        d_act, da, db = lora_linear_4bit_grads(act, *part, g)
        return d_act, [da, db]

    return grads
