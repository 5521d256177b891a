"""Activation checkpointing for transformers decoder layers, optionally with CPU offload.

Public API
----------
``enable_checkpointing(model, mode)``
    ``mode="unsloth"`` (alias ``"offload"``): checkpoint every decoder layer and keep the one tensor a
    checkpointed layer still needs - its input hidden state - in pinned host memory instead of on the GPU.
    The device-to-host copy runs on a side CUDA stream while the layer computes; in backward, when a layer's
    recomputation starts, the input of the layer before it is prefetched host-to-device on the side stream
    so it is resident by the time autograd gets there.
    ``mode=True`` (aliases ``"plain"``, ``"torch"``): plain non-reentrant ``torch.utils.checkpoint``.
    ``mode=False`` / ``None``: same as :func:`disable_checkpointing`.
``disable_checkpointing(model)``
    Remove our wrappers and restore the layers' transformers checkpointing flags as they were.
``checkpointing_mode(model)``, ``offload_stats(model)``, ``reset_offload_stats(model)``: introspection.

Design
------
transformers implements checkpointing differently across the versions we support:

* 5.17: ``GradientCheckpointingLayer.__call__`` calls ``self._gradient_checkpointing_func`` when
  ``self.gradient_checkpointing and self.training`` (even under ``no_grad``).
* 5.24: ``GradientCheckpointingLayer.__init_subclass__`` wraps each subclass's ``forward`` at class creation;
  the wrapper checkpoints when the flag is set *and* grad is enabled. Replacing ``forward`` afterwards (a
  fast-kernel patch on the class or the instance) silently drops checkpointing for that layer.

Relying on either mechanism is fragile, so we switch transformers' own flag off on every layer we manage
and install our own wrapper **per instance**: ``layer.forward`` becomes a bound method (``types.MethodType``,
so ``copy.deepcopy`` rebinds it to the copy) that checkpoints a call to the *current* inner forward - the
instance-level forward that was there before us (e.g. accelerate's hook) or, looked up at call time,
``type(layer).forward`` (so later class-level patches are still checkpointed). Nothing in transformers or
torch is patched. Because ``nn.Module.__call__`` dispatches to ``self.forward``, module hooks (FSDP2,
accelerate, PEFT) stay outside the checkpoint, exactly like transformers 5.24 does it.

We always use non-reentrant checkpointing: gradients reach LoRA weights even when the layer input does
not require grad (frozen embeddings), so ``enable_input_require_grads`` is not needed, and keyword tensor
arguments are handled. A zero-size "anchor" tensor on the activation device is passed as a positional
checkpoint argument so torch stashes/restores the right device's RNG and autocast state even though the
hidden state itself is not a checkpoint argument in offload mode.

Offload mode hands the hidden state to the checkpointed function through a small box instead of as a
checkpoint argument (the checkpoint would otherwise keep the GPU tensor alive). The autograd graph of the
original forward still connects to the input through ordinary edges (no data), so gradients flow exactly
as with plain checkpointing; the recomputation runs on a fresh leaf copy of the input with the same
``requires_grad``. Stream safety:

* forward: ``side.wait_stream(compute)`` -> D2H into pinned memory on ``side`` -> event; after the layer
  ran, ``compute.wait_event(d2h)`` so the GPU source cannot be freed/reused/overwritten before the copy
  finished (no ``record_stream`` needed for it). The pinned block is protected by the caching host
  allocator, which records an event for every non-blocking copy.
* backward prefetch: destination allocated on the compute stream, ``side.wait_stream(compute)`` (the block
  may just have been freed by compute work), H2D on ``side`` -> event, ``dst.record_stream(side)`` (safe
  even if the prefetch is never consumed); the consumer does ``compute.wait_event(h2d)``.
* backward without prefetch: H2D directly on the compute stream (ordered after the forward's wait).

No checkpointing (and no offload) happens when the layer is in eval mode, under ``torch.no_grad()`` /
inference mode, or when nothing in the call can produce a gradient (frozen layer and no grad-requiring
tensor input, e.g. a frozen vision tower). Cache arguments are dropped while checkpointing (the recompute
would otherwise update the KV cache twice), as transformers does; both the 5.17 (``past_key_values``) and
5.24 (``cache``) names are handled. Without CUDA the offload mode degrades to plain checkpointing (the
input is kept where it is) through the same code path.
"""

from __future__ import annotations

import copy
import functools
import logging
import types
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

from hf_fastvision.training.lean_mlp import checkpoint_pass

__all__ = [
    "enable_checkpointing",
    "disable_checkpointing",
    "checkpointing_mode",
    "checkpointed_layers",
    "offload_stats",
    "reset_offload_stats",
]

logger = logging.getLogger(__name__)

_STATE_ATTR = "_hffv_checkpointing"
_UNUSED_ATTR = "_hffv_unused_kwargs"

_OFFLOAD = "unsloth"
_PLAIN = "plain"

_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")
_HIDDEN_KWARGS = ("hidden_states", "hidden_state")


def _normalize_mode(mode: Any) -> str | None:
    if mode is None or mode is False:
        return None
    if mode is True:
        return _PLAIN
    if isinstance(mode, str):
        key = mode.strip().lower()
        if key in ("unsloth", "offload", "offloaded", "cpu_offload"):
            return _OFFLOAD
        if key in ("plain", "torch", "true", "on", "default"):
            return _PLAIN
        if key in ("false", "off", "none", ""):
            return None
    raise ValueError(
        f"Unknown checkpointing mode {mode!r}: use 'unsloth' (checkpoint + CPU offload of layer inputs), "
        "True (plain non-reentrant checkpointing) or False (off)."
    )


# --------------------------------------------------------------------------------------------------------
# Layer discovery
# --------------------------------------------------------------------------------------------------------
def _gc_layer_class() -> type:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return GradientCheckpointingLayer


def _model_specs(model: nn.Module) -> list[Any]:
    """The architecture specs of ``model``'s configured submodules (a VLM and its towers may each have one)."""
    from transformers import PreTrainedModel

    from hf_fastvision.registry import get_arch_for_model_type

    specs = []
    for module in model.modules():
        # the instance dict first: ``getattr`` on the thousands of modules without a config raises and catches
        # an AttributeError in ``nn.Module.__getattr__`` each time (~15 ms per pass on Qwen2.5-VL-7B with LoRA)
        config = module.__dict__.get("config")
        if config is None and isinstance(module, PreTrainedModel):
            config = getattr(module, "config", None)
        spec = get_arch_for_model_type(getattr(config, "model_type", "")) if config is not None else None
        if spec is not None and spec not in specs:
            specs.append(spec)
    return specs


def _spec_layer_names(model: nn.Module) -> set[str]:
    """Block classes an architecture spec asks to checkpoint although they are no GradientCheckpointingLayer."""
    return {name for spec in _model_specs(model) for name in spec.checkpoint_layers}


def _spec_unused_kwargs(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Layer class name -> keyword arguments its forward never reads (the specs' ``unused_layer_kwargs``)."""
    unused: dict[str, tuple[str, ...]] = {}
    for spec in _model_specs(model):
        unused.update(spec.unused_layer_kwargs)
    return unused


def checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    """The outermost ``GradientCheckpointingLayer`` instances of ``model``, in ``model.modules()`` order.

    Layers nested inside another such layer are skipped (checkpointing the outer one covers them).
    """
    gc_cls = _gc_layer_class()
    extra = _spec_layer_names(model)
    found: list[nn.Module] = []
    inside: list[str] = []
    for name, module in model.named_modules(remove_duplicate=True):
        if not isinstance(module, gc_cls) and type(module).__name__ not in extra:
            continue
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        inside.append(name)
        found.append(module)
    return found


# --------------------------------------------------------------------------------------------------------
# Per-model bookkeeping (shared by the layers of one enable call)
# --------------------------------------------------------------------------------------------------------
class _Manager:
    """Links offloaded inputs in forward order (for backward prefetch) and counts what happened."""

    def __init__(self) -> None:
        self.last: weakref.ReferenceType[_Box] | None = None
        self.stats: dict[str, int] = {}
        self.graphs: Any = None  # cuda_graphs.GraphedLayers when offloaded layers are CUDA-graphed
        self.reset_stats()

    def reset_stats(self) -> None:
        self.stats = {
            "checkpointed_calls": 0,
            "offloaded_tensors": 0,
            "offloaded_bytes": 0,
            "prefetches": 0,
            "prefetch_hits": 0,
            "sync_fetches": 0,
            "recomputes": 0,
        }

    def __deepcopy__(self, memo):  # a copied model gets its own, empty chain
        new = _Manager()
        new.stats = dict(self.stats)
        new.graphs = copy.deepcopy(self.graphs, memo)
        return new


class _LayerState:
    __slots__ = ("mode", "inner_forward", "had_instance_forward", "prev_gc", "manager", "warned")

    def __init__(self, mode, inner_forward, had_instance_forward, prev_gc, manager):
        self.mode = mode
        self.inner_forward = inner_forward  # instance-level forward that was there before us, else None
        self.had_instance_forward = had_instance_forward
        self.prev_gc = prev_gc  # (had instance attr, value) of `gradient_checkpointing`
        self.manager = manager
        self.warned = False

    def __deepcopy__(self, memo):
        inner = self.inner_forward
        if inner is not None:
            inner = copy.deepcopy(inner, memo)
        return _LayerState(self.mode, inner, self.had_instance_forward, self.prev_gc,
                           copy.deepcopy(self.manager, memo))


# Side streams, one per CUDA device, shared by all models of the process.
_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _SIDE_STREAMS.get(index)
    if stream is None:
        stream = torch.cuda.Stream(device=index)
        _SIDE_STREAMS[index] = stream
    return stream


class _Box:
    """Holds one checkpointed layer's input hidden state: live during forward, offloaded afterwards."""

    __slots__ = (
        "live", "host", "device", "requires_grad", "offloaded", "d2h_event", "prefetched", "prev",
        "fetches", "manager", "__weakref__",
    )

    def __init__(self, hidden: torch.Tensor, manager: _Manager, offload: bool) -> None:
        self.live = hidden
        self.device = hidden.device
        self.requires_grad = hidden.requires_grad
        self.offloaded = offload
        self.d2h_event = None
        self.prefetched = None  # (gpu tensor, event, allocation stream)
        self.fetches = 0
        self.manager = manager
        if offload:
            compute = torch.cuda.current_stream(hidden.device)
            side = _side_stream(hidden.device)
            side.wait_stream(compute)  # `hidden` is produced by work queued on the compute stream
            with torch.cuda.stream(side):
                host = torch.empty_like(hidden, device="cpu", pin_memory=True)
                host.copy_(hidden.detach(), non_blocking=True)
                event = torch.cuda.Event()
                event.record(side)
            self.host = host
            self.d2h_event = event
            manager.stats["offloaded_tensors"] += 1
            manager.stats["offloaded_bytes"] += hidden.numel() * hidden.element_size()
        else:
            # No CUDA: keep the input where it is (exactly what plain checkpointing keeps).
            self.host = hidden.detach()
        # Link to the previous box of this forward pass, unless backward already went through it.
        prev = manager.last() if manager.last is not None else None
        self.prev = weakref.ref(prev) if prev is not None and prev.fetches == 0 else None
        manager.last = weakref.ref(self)

    def forward_done(self) -> None:
        self.live = None
        if self.offloaded:
            # The GPU source may be freed or overwritten by whatever the compute stream runs next.
            torch.cuda.current_stream(self.device).wait_event(self.d2h_event)

    def prefetch(self) -> None:
        if not self.offloaded or self.prefetched is not None or self.fetches:
            return
        compute = torch.cuda.current_stream(self.device)
        side = _side_stream(self.device)
        dst = torch.empty_like(self.host, device=self.device)  # allocated on the compute stream
        side.wait_stream(compute)  # dst's block may just have been released by compute-stream work
        with torch.cuda.stream(side):
            dst.copy_(self.host, non_blocking=True)
            event = torch.cuda.Event()
            event.record(side)
        dst.record_stream(side)
        self.prefetched = (dst, event, compute)
        self.manager.stats["prefetches"] += 1

    def restore(self) -> torch.Tensor:
        """`fetch` for this layer's backward, starting the previous layer's prefetch (its H2D overlaps this layer's
        recompute and backward)."""
        hidden = self.fetch()
        prev = self.prev() if self.prev is not None else None
        if prev is not None:
            prev.prefetch()
        return hidden

    def fetch(self) -> torch.Tensor:
        """The input for recomputation: a fresh leaf on the original device with the original requires_grad."""
        self.fetches += 1
        if not self.offloaded:
            return self.host.detach().requires_grad_(self.requires_grad)
        compute = torch.cuda.current_stream(self.device)
        if self.prefetched is not None:
            tensor, event, alloc_stream = self.prefetched
            self.prefetched = None
            compute.wait_event(event)
            if alloc_stream != compute:
                tensor.record_stream(compute)
            self.manager.stats["prefetch_hits"] += 1
        else:
            # The compute stream already waited for the D2H copy at the end of the forward.
            tensor = self.host.to(self.device, non_blocking=True)
            self.manager.stats["sync_fetches"] += 1
        return tensor.requires_grad_(self.requires_grad)


# --------------------------------------------------------------------------------------------------------
# The per-instance forward
# --------------------------------------------------------------------------------------------------------
def _iter_tensors(values):
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (tuple, list)):
            for item in value:
                if isinstance(item, torch.Tensor):
                    yield item


def _needs_grad(layer: nn.Module, args: tuple, kwargs: dict) -> bool:
    for tensor in _iter_tensors(args):
        if tensor.requires_grad:
            return True
    for tensor in _iter_tensors(kwargs.values()):
        if tensor.requires_grad:
            return True
    return any(p.requires_grad for p in layer.parameters())


def _anchor_for(layer: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """A zero-size tensor on the activations' device so torch saves that device's RNG / autocast state."""
    for tensor in _iter_tensors(args):
        if tensor.is_floating_point():
            return torch.empty(0, device=tensor.device)
    for tensor in _iter_tensors(kwargs.values()):
        if tensor.is_floating_point():
            return torch.empty(0, device=tensor.device)
    for param in layer.parameters():
        return torch.empty(0, device=param.device)
    return torch.empty(0)


def _strip_cache_kwargs(layer: nn.Module, kwargs: dict) -> dict:
    changed = []
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
        changed.append("use_cache=False")
    if not getattr(layer, "_can_checkpoint_with_cache", False):
        for key in _CACHE_KWARGS:
            if kwargs.get(key) is not None:
                kwargs[key] = None
                changed.append(f"{key}=None")
    if changed:
        _log_once(logging.INFO, 
            f"Caching is incompatible with activation checkpointing in {type(layer).__name__}: "
            f"setting {', '.join(changed)} while training."
        )
    return kwargs


_WARNED: set[str] = set()


def _log_once(level: int, message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        logger.log(level, message)


def _warn_once(message: str) -> None:
    _log_once(logging.WARNING, message)


def _run_plain(inner: Callable, kwargs: dict, calls: list[int], _anchor: torch.Tensor, *args):
    recompute = calls[0] > 0  # torch's checkpoint calls this once in the forward, again to recompute
    calls[0] += 1
    with checkpoint_pass(recompute):
        return inner(*args, **kwargs)


def _run_offloaded(inner: Callable, box: _Box, kwargs: dict, as_kwarg: str | None, _anchor: torch.Tensor, *args):
    recompute = box.live is None
    if not recompute:  # the original forward
        hidden = box.live
    else:  # recomputation during backward
        box.manager.stats["recomputes"] += 1
        hidden = box.restore()
    with checkpoint_pass(recompute):
        if as_kwarg:
            return inner(*args, **{as_kwarg: hidden}, **kwargs)
        return inner(hidden, *args, **kwargs)


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    state: _LayerState | None = self.__dict__.get(_STATE_ATTR)
    if state is None:  # state removed behind our back: behave like the plain layer
        return type(self).forward(self, *args, **kwargs)
    inner = state.inner_forward
    if inner is None:
        # Looked up at call time so a later class-level patch of `forward` is still checkpointed.
        inner = types.MethodType(type(self).forward, self)

    if (
        state.mode is None
        or not self.training
        or not torch.is_grad_enabled()
        or not _needs_grad(self, args, kwargs)
    ):
        return inner(*args, **kwargs)

    if getattr(self, "gradient_checkpointing", False):
        # transformers' own checkpointing was switched back on (e.g. Trainer / PEFT called
        # `gradient_checkpointing_enable`): ours is in charge, don't checkpoint twice.
        self.gradient_checkpointing = False
        if not state.warned:
            state.warned = True
            _warn_once(
                "transformers' gradient checkpointing was re-enabled on layers managed by hf_fastvision's "
                "enable_checkpointing(); turning it off for them (hf_fastvision's checkpointing stays active)."
            )

    kwargs = _strip_cache_kwargs(self, dict(kwargs))
    for name in self.__dict__.get(_UNUSED_ATTR, ()):  # arguments this forward never reads (the spec says which)
        if kwargs.get(name) is not None:
            kwargs[name] = None
    manager = state.manager
    manager.stats["checkpointed_calls"] += 1
    anchor = _anchor_for(self, args, kwargs)

    hidden, as_kwarg = None, None
    if state.mode == _OFFLOAD or manager.graphs is not None:
        if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            hidden, args = args[0], args[1:]
        else:  # by keyword: `hidden_states`, or `hidden_state` (e.g. Mllama's vision layers on transformers 5.17)
            for name in _HIDDEN_KWARGS:
                value = kwargs.get(name)
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    hidden, as_kwarg = kwargs.pop(name), name
                    break

    offload = hidden is not None and state.mode == _OFFLOAD and hidden.is_cuda and torch.cuda.is_available()
    if hidden is not None and manager.graphs is not None:
        # plain mode keeps the input on the GPU (what torch's checkpoint keeps); offload mode moves it to the host
        out = manager.graphs.run(self, inner, hidden, as_kwarg, args, kwargs, lambda h: _Box(h, manager, offload))
        if out is not NotImplemented:
            return out
    if hidden is not None and state.mode != _OFFLOAD:  # graphs declined this call: plain checkpointing as before
        if as_kwarg:
            kwargs[as_kwarg] = hidden
        else:
            args = (hidden, *args)
        hidden = None

    if hidden is None:  # plain mode, or nothing to offload
        run = functools.partial(_run_plain, inner, kwargs, [0])
        return _torch_checkpoint(run, anchor, *args, use_reentrant=False)

    box = _Box(hidden, manager, offload)
    del hidden
    run = functools.partial(_run_offloaded, inner, box, kwargs, as_kwarg)
    try:
        return _torch_checkpoint(run, anchor, *args, use_reentrant=False)
    finally:
        box.forward_done()


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------
def _existing_manager(layers: list[nn.Module]) -> _Manager | None:
    for layer in layers:
        state = layer.__dict__.get(_STATE_ATTR)
        if state is not None:
            return state.manager
    return None


def enable_checkpointing(model: nn.Module, mode: Any = "unsloth", cuda_graphs: Any = None) -> int:
    """Checkpoint every decoder layer of ``model`` (any transformers model, PEFT-wrapped or not).

    Args:
        model: a ``PreTrainedModel`` (or a ``PeftModel`` / any module containing one) whose repeated blocks
            are ``transformers.modeling_layers.GradientCheckpointingLayer`` instances.
        mode: ``"unsloth"`` (checkpoint + offload layer inputs to pinned CPU memory on a side stream),
            ``True`` (plain non-reentrant checkpointing) or ``False`` (off, same as
            :func:`disable_checkpointing`).
        cuda_graphs: on CUDA, replay each layer's forward and recompute+backward as CUDA graphs
            (`cuda_graphs.py`): ``True``, ``False``, ``"emulate"`` (the same plumbing without CUDA, for tests) or
            ``None`` (the ``cuda_graphs`` patch flag the model was loaded with; off for other models).

    Returns:
        The number of layers now managed (0 when ``mode`` is off).

    Calling it again switches the mode in place; layers are never wrapped twice.
    """
    normalized = _normalize_mode(mode)
    if normalized is None:
        disable_checkpointing(model)
        return 0
    layers = checkpointed_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no transformers GradientCheckpointingLayer modules, so "
            "enable_checkpointing() has nothing to checkpoint."
        )
    if normalized == _OFFLOAD and not torch.cuda.is_available():
        _warn_once("enable_checkpointing('unsloth'): CUDA is not available, layer inputs are not offloaded "
                   "(plain checkpointing).")
    manager = _existing_manager(layers) or _Manager()
    manager.graphs = _graphs_for(model, normalized, cuda_graphs, manager.graphs)
    unused = _spec_unused_kwargs(model)
    for layer in layers:
        if unused.get(type(layer).__name__):
            layer.__dict__[_UNUSED_ATTR] = unused[type(layer).__name__]
        state = layer.__dict__.get(_STATE_ATTR)
        if state is None:
            instance_forward = layer.__dict__.get("forward")
            prev_gc = ("gradient_checkpointing" in layer.__dict__, getattr(layer, "gradient_checkpointing", False))
            state = _LayerState(normalized, instance_forward, instance_forward is not None, prev_gc, manager)
            setattr(layer, _STATE_ATTR, state)
            layer.forward = types.MethodType(_checkpointed_forward, layer)
        else:
            state.mode = normalized
            state.manager = manager
            current = layer.__dict__.get("forward")
            if getattr(current, "__func__", None) is not _checkpointed_forward:
                # Someone replaced the instance forward after us (e.g. accelerate hooks wrap it and still
                # call ours); only reinstall when our wrapper is no longer reachable at all.
                if not _wraps_ours(current, layer):
                    state.inner_forward = current
                    state.had_instance_forward = current is not None
                    layer.forward = types.MethodType(_checkpointed_forward, layer)
        # transformers' own checkpointing off for this layer: ours does it (both 5.17 and 5.24 honour the flag).
        layer.gradient_checkpointing = False
    return len(layers)


def _graphs_for(model: nn.Module, mode: str, cuda_graphs: Any, current: Any) -> Any:
    from hf_fastvision.training.cuda_graphs import GraphedLayers, graphs_supported

    options = model.__dict__.get("_hffv_patch_options")
    if options is None:
        base = getattr(model, "get_base_model", None)
        options = base().__dict__.get("_hffv_patch_options") if callable(base) else None
    if cuda_graphs is None:
        cuda_graphs = bool(getattr(options, "cuda_graphs", False))
    if not cuda_graphs:
        return None
    emulate = cuda_graphs == "emulate"
    capture_at = getattr(options, "cuda_graphs_capture", "first_backward")
    if not emulate and not graphs_supported():
        return None
    if isinstance(current, GraphedLayers) and current.emulate == emulate and current.capture_at == capture_at:
        return current  # keep the graphs already captured
    return GraphedLayers(emulate=emulate, capture_at=capture_at)


def _wraps_ours(forward: Any, layer: nn.Module) -> bool:
    """Whether an instance-level forward installed after ours still ends up calling ours.

    accelerate's ``add_hook_to_module`` keeps the previous forward in ``layer._old_forward``; other wrappers
    made with ``functools.wraps`` expose it as ``__wrapped__``.
    """
    candidates = [layer.__dict__.get("_old_forward"), getattr(forward, "__wrapped__", None)]
    return any(getattr(c, "__func__", None) is _checkpointed_forward for c in candidates)


def disable_checkpointing(model: nn.Module) -> int:
    """Undo :func:`enable_checkpointing`: restore each layer's forward and transformers checkpointing flag.

    Returns the number of layers restored.
    """
    restored = 0
    for layer in model.modules():
        state = layer.__dict__.get(_STATE_ATTR)
        if state is None:
            continue
        layer.__dict__.pop(_UNUSED_ATTR, None)
        current = layer.__dict__.get("forward")
        if getattr(current, "__func__", None) is _checkpointed_forward:
            if state.had_instance_forward:
                layer.forward = state.inner_forward
            else:
                del layer.forward
            delattr(layer, _STATE_ATTR)
        else:
            # Something wrapped our forward after us (e.g. accelerate): keep the wrapper chain intact, just
            # make ours a pass-through.
            state.mode = None
        had_attr, value = state.prev_gc
        if had_attr:
            layer.gradient_checkpointing = value
        elif "gradient_checkpointing" in layer.__dict__:
            del layer.gradient_checkpointing
        restored += 1
    return restored


def checkpointing_mode(model: nn.Module) -> str | None:
    """``"unsloth"``, ``"plain"`` or ``None`` (mixed modes report the first layer's)."""
    for layer in model.modules():
        state = layer.__dict__.get(_STATE_ATTR)
        if state is not None and state.mode is not None:
            return state.mode
    return None


def offload_stats(model: nn.Module) -> dict[str, int]:
    """Counters since enabling (or the last reset): checkpointed calls, offloaded tensors/bytes, prefetch hits."""
    for layer in model.modules():
        state = layer.__dict__.get(_STATE_ATTR)
        if state is not None:
            return dict(state.manager.stats)
    return {}


def reset_offload_stats(model: nn.Module) -> None:
    for layer in model.modules():
        state = layer.__dict__.get(_STATE_ATTR)
        if state is not None:
            state.manager.reset_stats()
            return
