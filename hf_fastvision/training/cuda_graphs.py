"""CUDA-graphed checkpointed layers: one graph replay per layer in forward, one in backward.

Why: a QLoRA step of a 7B vision-language model at 2048 tokens keeps the GPU busy for ~0.29 s but takes ~0.86 s
on an H200, because the host cannot issue the ~16,000 small kernels (per-layer norms, rotary, 4-bit
dequantization, LoRA matmuls, their backward and the checkpoint recompute) as fast as the GPU runs them
(`scripts/profile_step.py`). Checkpointed layers are the natural unit to graph: in forward a checkpointed layer
runs without autograd (input -> output), in backward it recomputes its forward and back-propagates
(input, grad of output -> grad of input and of its LoRA weights). Both are pure functions of tensors with
fixed shapes, so each is captured once as a CUDA graph and replayed: the host then issues one launch per layer
and direction instead of hundreds.

How (used by `checkpointing.py` in both modes, ``patches={"cuda_graphs": ...}``):

- A layer call is keyed by everything the graph bakes in: shapes, dtypes, devices and ``requires_grad`` of its
  tensor arguments, non-tensor argument values, the values of small 1-D integer tensors (``cu_seqlens``: the
  host reads them to schedule attention), autocast state and the addresses of the layer's parameters. The
  first call with a key runs its forward eagerly (warming kernel and plan caches) and captures both graphs in its
  own backward, before it replays the backward graph; later calls replay. Capturing there, in the first step's
  backward, costs the least memory: the optimizer has no state yet and the forward's working set is gone (a capture
  counts the layer's whole recompute + backward working set as allocated, on top of whatever is live). With
  ``capture_at="second_forward"`` the second call with a key captures both graphs instead (the earlier design).
  Anything the graph cannot express (a host sync inside the layer, an unsupported argument type, parameters on
  several devices or sharded) makes the capture fail or be refused and that key runs eagerly from then on, with
  one log line. At most ``max_keys`` shapes per layer are kept (then new shapes run eagerly).
- All graphs of a model share one memory pool and static input buffers: layers run one after another and every
  graph's outputs are copied out right after its replay, so their temporaries may overlap.
- The layer input is offloaded to pinned host memory exactly as in the eager offload mode (`_Box`); in plain
  mode it stays on the GPU, as torch's checkpoint keeps it.
- Exactness: the replayed kernels are the eager kernels on the same inputs; autocast runs without its weight
  cache inside graphs, so the graphs always read the current (optimizer-updated) weights.

Tests run the same code on CPU with an emulated graph (re-executes the captured function into the static
outputs), so the plumbing (keys, static buffers, gradients, fallbacks) is checked without CUDA; the real
capture is checked on the GPU machine (`tests/gpu/test_cuda_graphs_gpu.py`).
"""

from __future__ import annotations

import logging
import os
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hf_fastvision.training.checkpointing import _log_once
from hf_fastvision.training.lean_mlp import checkpoint_pass

__all__ = ["GraphedLayers", "host_values", "graphs_supported", "CAPTURE_POINTS"]

logger = logging.getLogger(__name__)

_UNSUPPORTED = object()
CAPTURE_POINTS = ("first_backward", "second_forward")  # where a key's graphs are captured (`GraphedLayers`)
MAX_FAILURES = 3  # distinct (layer class, shape) capture failures after which a model stops trying
_MAX_HOST_INTS = 4096  # 1-D int tensors up to this size are treated as host-known metadata (cu_seqlens)

# Tensors whose values the host may read while a graph is being captured (the static cu_seqlens buffers).
_HOST_KNOWN: dict[int, tuple[torch.Tensor, tuple[int, ...]]] = {}
# id -> (weak reference, version, values): tensors compare elementwise, so they cannot key a WeakKeyDictionary.
_HOST_CACHE: dict[int, tuple[Any, int, tuple[int, ...]]] = {}


def host_values(tensor: torch.Tensor) -> list[int]:
    """``tensor.tolist()``, but served from the host copy while a graph that reads it is captured or warmed up.

    Layer code that needs integer metadata on the host (e.g. attention chunk bounds) calls this instead of
    ``tolist()`` so the layer can be CUDA-graphed; outside graphs it is ``tolist()`` with a per-tensor cache.
    """
    known = _HOST_KNOWN.get(id(tensor))
    if known is not None and known[0] is tensor:
        return list(known[1])
    return list(_cached_host(tensor))


def _cached_host(tensor: torch.Tensor) -> tuple[int, ...]:
    hit = _HOST_CACHE.get(id(tensor))
    if hit is not None and hit[0]() is tensor and hit[1] == tensor._version:
        return hit[2]
    values = tuple(int(v) for v in tensor.reshape(-1).tolist())
    if len(_HOST_CACHE) > 1024:
        _HOST_CACHE.clear()
    _HOST_CACHE[id(tensor)] = (weakref.ref(tensor), tensor._version, values)
    return values


def graphs_supported() -> bool:
    return torch.cuda.is_available() and os.environ.get("HF_FASTVISION_DISABLE_CUDA_GRAPHS", "") in ("", "0")


# --------------------------------------------------------------------------------------------------------
# Flattening a layer call: tensors become static-buffer slots, everything else goes into the key.
# --------------------------------------------------------------------------------------------------------
def _leaf_key(value: Any, tensors: list[tuple[torch.Tensor, tuple[int, ...] | None]]) -> Any:
    """Key of one argument; its tensors are appended to `tensors` with their host values (small int tensors)."""
    if isinstance(value, torch.Tensor):
        meta = (value.shape, value.dtype, value.device, value.requires_grad)
        if not value.is_floating_point() and value.dim() <= 1 and value.numel() <= _MAX_HOST_INTS:
            values = _cached_host(value)
            tensors.append((value, values))
            return ("host", meta, values)
        tensors.append((value, None))
        return ("t", meta, value.stride())
    if value is None or isinstance(value, (bool, int, float, str)):
        return ("v", type(value).__name__, value)
    if isinstance(value, torch.dtype):
        return ("v", "dtype", str(value))
    if isinstance(value, (tuple, list)):
        items = tuple(_leaf_key(v, tensors) for v in value)
        return _UNSUPPORTED if _UNSUPPORTED in items else ("s", type(value).__name__, items)
    return _UNSUPPORTED


def _rebuild(value: Any, tensors: list[torch.Tensor], pos: list[int]) -> Any:
    if isinstance(value, torch.Tensor):
        t = tensors[pos[0]]
        pos[0] += 1
        return t
    if isinstance(value, (tuple, list)):
        return type(value)(_rebuild(v, tensors, pos) for v in value)
    return value


def _flatten_call(args: tuple, kwargs: dict) -> tuple[Any, list[tuple[torch.Tensor, Any]]] | None:
    """(key, [(tensor, host values or None), ...]) of a layer call, or None when an argument cannot be keyed."""
    tensors: list[tuple[torch.Tensor, Any]] = []
    key = (
        tuple(_leaf_key(a, tensors) for a in args),
        tuple((k, _leaf_key(kwargs[k], tensors)) for k in sorted(kwargs)),
    )
    if any(item is _UNSUPPORTED for item in key[0]) or any(item is _UNSUPPORTED for _, item in key[1]):
        return None
    return key, tensors


# --------------------------------------------------------------------------------------------------------
# Graph backends: CUDA graphs, and an emulation for CPU tests.
# --------------------------------------------------------------------------------------------------------
class _CudaGraph:
    """One captured function; outputs live in the shared pool and are valid until its next replay."""

    def __init__(self, device: torch.device, pool: Any, stream: torch.cuda.Stream) -> None:
        self.device, self.pool, self.stream = device, pool, stream
        self.graph = torch.cuda.CUDAGraph()
        self.outputs: Any = None

    def warm(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` eagerly on the capture stream (per-stream cuBLAS workspace, lazy inits) and return its result."""
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            out = fn()
        current.wait_stream(self.stream)
        return out

    def capture(self, fn: Callable[[], Any]) -> None:
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            self.graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                self.outputs = fn()
            finally:
                self.graph.capture_end()
        current.wait_stream(self.stream)

    def replay(self) -> Any:
        self.graph.replay()
        return self.outputs


class _EmulatedGraph:
    """CPU stand-in with a graph's contract: replay recomputes from the static inputs into the same outputs."""

    def __init__(self, *_: Any) -> None:
        self.fn: Callable[[], Any] | None = None
        self.outputs: Any = None

    def warm(self, fn: Callable[[], Any]) -> Any:
        return fn()

    def capture(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.outputs = fn()

    def replay(self) -> Any:
        self.fn()  # the captured functions write into the same static buffers they returned at capture
        return self.outputs


# --------------------------------------------------------------------------------------------------------
# Per-layer entries and the autograd function that replays them
# --------------------------------------------------------------------------------------------------------
class _Entry:
    __slots__ = ("fwd", "bwd", "static", "n_extra", "diff_extra", "params", "hidden_grad", "host_known")

    def __init__(self) -> None:
        self.fwd: Any = None
        self.bwd: Any = None
        self.static: list[torch.Tensor] = []  # [hidden, *extras, grad_out]
        self.n_extra = 0
        self.diff_extra: list[int] = []  # indices into extras that need a gradient
        self.params: list[torch.Tensor] = []
        self.hidden_grad = False
        self.host_known: list[tuple[torch.Tensor, tuple[int, ...]]] = []

    def load(self, hidden: torch.Tensor, extras: list[torch.Tensor], grad_out: torch.Tensor | None = None) -> None:
        static = self.static
        static[0].copy_(hidden.detach())
        _forget(static[0])
        for buf, t in zip(static[1 : 1 + self.n_extra], extras):
            _load_buffer(buf, t)
        if grad_out is not None:
            static[-1].copy_(grad_out.detach())
            _forget(static[-1])


# Which tensor (and version) a static buffer last received: extras such as rotary cos/sin are the same tensors for
# every layer of a step, so they are copied once per step instead of once per layer.
_BUFFER_SOURCE: dict[int, tuple[Any, int]] = {}


def _load_buffer(buf: torch.Tensor, src: torch.Tensor) -> None:
    last = _BUFFER_SOURCE.get(id(buf))
    if last is not None and last[0]() is src and last[1] == src._version:
        return
    buf.copy_(src.detach())
    try:
        _BUFFER_SOURCE[id(buf)] = (weakref.ref(src), src._version)
    except TypeError:  # pragma: no cover
        _BUFFER_SOURCE.pop(id(buf), None)


def _forget(buf: torch.Tensor) -> None:
    _BUFFER_SOURCE.pop(id(buf), None)


class _GraphedLayerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, entry: _Entry, box: Any, n_extra: int, hidden: torch.Tensor, *rest: torch.Tensor):
        extras = list(rest[:n_extra])
        entry.load(hidden, extras)
        out = entry.fwd.replay().clone()
        ctx.entry, ctx.box, ctx.extras = entry, box, extras
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        entry: _Entry = ctx.entry
        hidden = ctx.box.restore()
        grads = _replay_backward(entry, hidden, ctx.extras, grad_out)
        ctx.entry = ctx.box = ctx.extras = None
        return (None, None, None, *grads)


def _replay_backward(entry: _Entry, hidden: torch.Tensor, extras: list[torch.Tensor],
                     grad_out: torch.Tensor) -> list[torch.Tensor | None]:
    """Gradients of (hidden, *extras, *entry.params) from one replay of `entry`'s backward graph."""
    entry.load(hidden, extras, grad_out.to(entry.static[-1].dtype))
    copies = [g.clone() if g is not None else None for g in entry.bwd.replay()]
    return _by_input(copies, entry.hidden_grad, entry.n_extra, entry.diff_extra)


def _by_input(grads: list[torch.Tensor | None], hidden_grad: bool, n_extra: int,
              diff_extra: list[int]) -> list[torch.Tensor | None]:
    """[grad of hidden, grad of each extra, *grads of the params] from a backward's `wrt` order (hidden if it needs
    a gradient, the differentiable extras, the params)."""
    pos = 0
    grad_hidden = None
    if hidden_grad:
        grad_hidden, pos = grads[0], 1
    grad_extras: list[torch.Tensor | None] = [None] * n_extra
    for i in diff_extra:
        grad_extras[i], pos = grads[pos], pos + 1
    return [grad_hidden, *grad_extras, *grads[pos:]]


class _FirstCall:
    """What a key's first call keeps for its backward, where that layer's graphs are captured: the call itself
    (the layer, its forward, arguments and key) and its eager output until autograd takes it."""

    __slots__ = ("graphs", "layer", "inner", "as_kwarg", "args", "kwargs", "leaves", "autocast", "key", "out",
                 "param_slots", "layout")

    def __init__(self, **fields: Any) -> None:
        for name in self.__slots__:
            setattr(self, name, fields.get(name))


class _FirstCallFunction(torch.autograd.Function):
    """A key's first call: the forward ran eagerly (its output arrives in `call.out`); the backward captures the
    layer's graphs (unless a capture exists or failed by now) and replays the backward graph, or runs the same
    recompute + backward eagerly where it cannot."""

    @staticmethod
    def forward(ctx, call: _FirstCall, box: Any, n_extra: int, hidden: torch.Tensor, *rest: torch.Tensor):
        out, call.out = call.out, None
        ctx.call, ctx.box = call, box
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        call: _FirstCall = ctx.call
        hidden = ctx.box.restore()
        extras = [t for t, _ in call.leaves]
        entry = call.graphs._entry_for_backward(call, hidden)
        if entry is not None:
            grads = _replay_backward(entry, hidden, extras, grad_out)
        else:
            params = [mod._parameters[name] for mod, name in call.param_slots]
            hidden_grad = ctx.needs_input_grad[3]
            diff_extra = _differentiable(extras)
            run = _layer_call(call.inner, call.as_kwarg, call.args, call.kwargs, hidden.device, call.autocast)
            raw = _layer_grads(run, hidden, extras, hidden_grad, diff_extra, call.param_slots, params, grad_out)
            grads = _by_input(raw, hidden_grad, len(extras), diff_extra)
        ctx.call = ctx.box = None
        return (None, None, None, *grads)


def _differentiable(extras: list[torch.Tensor]) -> list[int]:
    return [i for i, t in enumerate(extras) if t.requires_grad and t.is_floating_point()]


def _layer_call(inner: Callable[..., Any], as_kwarg: str | None, args: tuple, kwargs: dict, device: torch.device,
                autocast: tuple[bool, torch.dtype]) -> Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor]:
    """The layer's forward as a function of (hidden, its tensor arguments in `_flatten_call` order), under the
    call's autocast state (without the weight cache: graphs must read the current weights)."""
    enabled, dtype = autocast

    def call(x: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
        pos = [0]
        c_args = _rebuild(args, tensors, pos)
        c_kwargs = {k: _rebuild(kwargs[k], tensors, pos) for k in sorted(kwargs)}
        with torch.autocast(device.type, dtype=dtype, enabled=enabled, cache_enabled=False):
            out = inner(*c_args, **{as_kwarg: x}, **c_kwargs) if as_kwarg else inner(x, *c_args, **c_kwargs)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"layer returned {type(out).__name__}, not a tensor")
        return out

    return call


def _layer_grads(call: Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor], hidden: torch.Tensor,
                 extras: list[torch.Tensor], hidden_grad: bool, diff_extra: list[int],
                 param_slots: list[tuple[nn.Module, str]], params: list[torch.Tensor],
                 grad_out: torch.Tensor) -> list[torch.Tensor | None]:
    """Recompute the layer's forward from (hidden, extras) and back-propagate `grad_out`: the gradients of hidden
    (if `hidden_grad`), of the extras at `diff_extra` and of `params`, in that order."""
    with torch.enable_grad():
        x = hidden.detach().requires_grad_(hidden_grad)
        tensors = list(extras)
        leaves = []
        for i in diff_extra:  # differentiable extras are read through leaves of their own
            tensors[i] = extras[i].detach().requires_grad_(True)
            leaves.append(tensors[i])
        # The trainable weights are read through fresh aliases (same storage, so graph replays see the optimizer's
        # updates): a weight's own AccumulateGrad node may have been created on the default stream and be kept
        # alive by the caller (a `loss` still referenced), and routing gradients to it from the capture stream
        # would sync with the default stream, which invalidates a capture.
        aliases = [p.detach().requires_grad_(True) for p in params]
        with _swapped_params(param_slots, aliases), checkpoint_pass(True):
            out = call(x, tensors)
        wrt = ([x] if hidden_grad else []) + leaves + aliases
        return list(torch.autograd.grad(out, wrt, grad_outputs=grad_out.to(out.dtype), allow_unused=True))


# --------------------------------------------------------------------------------------------------------
# The cache of one model (shared by its layers)
# --------------------------------------------------------------------------------------------------------
class GraphedLayers:
    """CUDA graphs for the checkpointed layers of one model (see the module docstring)."""

    def __init__(self, max_keys: int = 4, emulate: bool = False, capture_at: str = "first_backward") -> None:
        if capture_at not in CAPTURE_POINTS:
            raise ValueError(f"capture_at must be one of {CAPTURE_POINTS}, got {capture_at!r}")
        self.max_keys = max_keys
        self.emulate = emulate
        self.capture_at = capture_at  # see the module docstring
        self.stats = {"eager_calls": 0, "captures": 0, "replays": 0, "failures": 0, "refused": 0,
                      "backward_captures": 0, "forward_warmups": 0}
        self.last_failure: str | None = None
        self._warmed: set[Any] = set()
        self._fwd_warmed: set[Any] = set()  # (layer class, key signature) whose forward was warmed on the stream
        self._flush_pending = False
        self.disabled = False  # set after MAX_FAILURES distinct failed captures
        self._bad: set[Any] = set()  # (layer class, shape signature) whose capture failed: eager for every layer
        self._pools: dict[torch.device, Any] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._layers: "weakref.WeakKeyDictionary[nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()

    def __deepcopy__(self, memo):  # a copied model gets its own, empty cache
        return GraphedLayers(self.max_keys, self.emulate, self.capture_at)

    # ---- public ----
    def run(
        self,
        layer: nn.Module,
        inner: Callable[..., Any],
        hidden: torch.Tensor,
        as_kwarg: str | None,
        args: tuple,
        kwargs: dict,
        make_box: Callable[[torch.Tensor], Any],
    ) -> Any:
        """The layer's output through its graphs, or ``NotImplemented`` when this call must run eagerly."""
        if self.disabled or not (self.emulate or hidden.is_cuda):
            return NotImplemented
        flat = _flatten_call(args, kwargs)
        if flat is None:
            return self._refuse(layer, "an argument type the graph cannot hold")
        call_key, leaves = flat
        extras = [t for t, _ in leaves]
        params = [p for p in layer.parameters()]
        device = hidden.device
        if not self.emulate and any(p.device != device or type(p).__name__ == "DTensor" or p._base is not None
                                    for p in params):
            return self._refuse(layer, "parameters on another device, sharded or views")
        if not self.emulate and any(t.device != device for t in extras):
            return self._refuse(layer, "tensor arguments on another device")
        autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        key = (
            (hidden.shape, hidden.dtype, hidden.stride(), hidden.requires_grad), call_key, as_kwarg, autocast,
            tuple((p.data_ptr(), p.requires_grad) for p in params),
        )
        entries = self._layers.get(layer)
        if entries is None:
            entries = self._layers[layer] = OrderedDict()
        entry = entries.get(key)
        if entry is None:  # first sight: the forward runs eagerly (warms caches)
            if len(entries) >= 2 * self.max_keys:
                self.stats["eager_calls"] += 1
                return NotImplemented
            if self.capture_at == "first_backward":
                if self._may_capture(layer, entries, key):
                    return self._first_call(layer, entries, inner, hidden, as_kwarg, args, kwargs, leaves, autocast,
                                            key, make_box)
                if entries.get(key) == "bad":
                    self.stats["eager_calls"] += 1
                    return NotImplemented
            entries[key] = "seen"  # the next call with this key captures
            self.stats["eager_calls"] += 1
            return NotImplemented
        if entry in ("seen", "pending"):  # "pending": a first call whose backward has not run yet
            if not self._may_capture(layer, entries, key):
                self.stats["eager_calls"] += 1
                return NotImplemented
            self._start_capture_round()
            entry = self._capture_entry(layer, entries, inner, hidden, as_kwarg, args, kwargs, leaves, autocast, key)
            if entry is None:
                self.stats["eager_calls"] += 1
                return NotImplemented
        elif entry == "bad":
            self.stats["eager_calls"] += 1
            return NotImplemented
        elif self._flush_pending and not self.emulate:
            # the capture round is over: hand the warm-ups' blocks cached for the capture stream back
            self._flush_pending = False
            torch.cuda.empty_cache()
        entries.move_to_end(key)
        self.stats["replays"] += 1
        box = make_box(hidden)
        try:
            return _GraphedLayerFunction.apply(entry, box, entry.n_extra, hidden, *extras, *entry.params)
        finally:
            box.forward_done()

    # ---- internals ----
    def _may_capture(self, layer: nn.Module, entries: OrderedDict, key: tuple) -> bool:
        """Whether a call with `key` may be captured now; marks it "bad" where it never may."""
        if (type(layer), key[:4]) in self._bad:
            entries[key] = "bad"
            return False
        if _draws_random_numbers(layer):
            # the forward graph and the recomputing backward graph would draw different dropout masks
            entries[key] = "bad"
            self._refuse(layer, "dropout is active while training")
            return False
        return sum(isinstance(e, _Entry) for e in entries.values()) < self.max_keys

    def _start_capture_round(self) -> None:
        if not self.emulate:
            from hf_fastvision.training.precompile import wait

            wait()  # no background kernel launch (`precompile`) beside a capture
        if not self._flush_pending and not self.emulate:
            # a capture round starts: return the blocks the eager steps left cached, so the graphs' pool grows
            # into them instead of beside them (lower reserved peak)
            torch.cuda.empty_cache()

    def _capture_entry(self, layer, entries, inner, hidden, as_kwarg, args, kwargs, leaves, autocast, key,
                       layout=None):
        """Capture `key`'s graphs and record the entry, or record the failure (that key then runs eagerly)."""
        entry = self._capture(layer, inner, hidden, as_kwarg, args, kwargs, leaves, autocast, key[:4], layout)
        if entry is None:
            entries[key] = "bad"
            self._bad.add((type(layer), key[:4]))
            self.disabled = len(self._bad) >= MAX_FAILURES
            return None
        entries[key] = entry
        return entry

    def _first_call(self, layer, entries, inner, hidden, as_kwarg, args, kwargs, leaves, autocast, key, make_box):
        """A key's first call: the forward eagerly, the capture in its backward (`_FirstCallFunction`)."""
        with torch.no_grad(), checkpoint_pass(False):
            out = inner(*args, **{as_kwarg: hidden}, **kwargs) if as_kwarg else inner(hidden, *args, **kwargs)
        if not isinstance(out, torch.Tensor):  # not graphable: this call runs again, checkpointed eagerly
            entries[key] = "bad"
            return self._refuse(layer, f"it returns {type(out).__name__}, not a tensor")
        entries[key] = "pending"
        self.stats["eager_calls"] += 1
        param_slots = _trainable_slots(layer)
        call = _FirstCall(graphs=self, layer=layer, inner=inner, as_kwarg=as_kwarg, args=args, kwargs=kwargs,
                          leaves=leaves, autocast=autocast, key=key, out=out if out._base is None else out.clone(),
                          param_slots=param_slots, layout=_layout(out, hidden))
        params = [mod._parameters[name] for mod, name in param_slots]
        box = make_box(hidden)
        try:
            return _FirstCallFunction.apply(call, box, len(leaves), hidden, *(t for t, _ in leaves), *params)
        finally:
            box.forward_done()

    def _entry_for_backward(self, call: _FirstCall, hidden: torch.Tensor) -> _Entry | None:
        """In a first call's backward: the key's graphs (captured now unless they exist), or None (eager)."""
        entries = self._layers.get(call.layer)
        if entries is None:  # the cache was dropped (checkpointing switched off or the graphs replaced)
            return None
        entry = entries.get(call.key)
        if isinstance(entry, _Entry):
            return entry
        if entry != "pending" or self.disabled or not self._may_capture(call.layer, entries, call.key):
            return None
        self._start_capture_round()
        entry = self._capture_entry(call.layer, entries, call.inner, hidden, call.as_kwarg, call.args, call.kwargs,
                                    call.leaves, call.autocast, call.key, call.layout)
        if entry is not None:
            self.stats["backward_captures"] += 1
        return entry

    def _capture_failed(self, what: str, exc: Exception, device: torch.device) -> None:
        self.stats["failures"] += 1
        self.last_failure = f"{what}: {type(exc).__name__}: {exc}"
        _log_once(logging.WARNING, f"CUDA graphs: capturing {what} failed ({type(exc).__name__}: "
                  f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); it runs eagerly.")
        if not self.emulate:
            # a failed capture can leave its pool marked as recording: later captures get a fresh pool
            self._pools.pop(device, None)
            torch.cuda.synchronize(device)

    def _refuse(self, layer: nn.Module, why: str) -> Any:
        self.stats["refused"] += 1
        _log_once(logging.INFO, f"CUDA graphs: {type(layer).__name__} runs eagerly ({why}).")
        return NotImplemented

    def _buffer(self, slot: Any, like: torch.Tensor) -> torch.Tensor:
        """The static buffer of `slot` laid out like `like`, filled with it when new."""
        known = (slot, like.shape, like.dtype, like.device, like.stride()) in self._buffers
        buf = self._buffer_for(slot, like.shape, like.stride(), like.dtype, like.device)
        if not known:
            buf.copy_(like.detach())  # detached: a buffer must not keep autograd nodes (and their streams) alive
            _forget(buf)
        return buf

    def _buffer_for(self, slot: Any, shape: torch.Size, stride: tuple[int, ...], dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
        """The static buffer of `slot` for a layout (shared by every layer of that layout; its contents are
        written before any graph reads them)."""
        key = (slot, shape, dtype, device, stride)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.empty_strided(shape, stride, dtype=dtype, device=device)
        return buf

    def _new_graph(self, device: torch.device) -> Any:
        if self.emulate:
            return _EmulatedGraph()
        if device not in self._pools:
            self._pools[device] = torch.cuda.graph_pool_handle()
            self._streams[device] = torch.cuda.Stream(device=device)
        return _CudaGraph(device, self._pools[device], self._streams[device])

    def _capture(self, layer, inner, hidden, as_kwarg, args, kwargs, leaves, autocast, key_signature, layout=None):
        extras = [t for t, _ in leaves]
        entry = _Entry()
        device = hidden.device
        static_hidden = self._buffer(0, hidden)
        static_extras = [self._buffer(1 + i, t) for i, t in enumerate(extras)]
        entry.n_extra = len(extras)
        entry.hidden_grad = hidden.requires_grad
        entry.diff_extra = _differentiable(extras)
        param_slots = _trainable_slots(layer)
        entry.params = [mod._parameters[name] for mod, name in param_slots]
        entry.host_known = [(buf, values) for buf, (_, values) in zip(static_extras, leaves) if values is not None]
        call = _layer_call(inner, as_kwarg, args, kwargs, device, autocast)

        def fwd_body() -> torch.Tensor:
            with torch.no_grad(), checkpoint_pass(False):
                return call(static_hidden, static_extras)

        def bwd_body() -> list[torch.Tensor | None]:
            return _layer_grads(call, static_hidden, static_extras, entry.hidden_grad, entry.diff_extra, param_slots,
                                entry.params, static_grad)

        _register_host_known(entry.host_known)
        try:
            entry.fwd = self._new_graph(device)
            # outputs go to buffers outside the pool, shared by every layer of this shape (copied out on replay);
            # the output takes the input's own buffer where it can (one buffer less per shape): `fwd` writes it
            # only after the body has finished reading the input. The eager warm-up (lazy inits on the capture
            # stream, and the output's layout) runs once per layer class and signature: ~60 layer forwards less in
            # a 7B model's first step; a capture in the first backward knows the layout from the layer's own eager
            # forward.
            warm_key = (type(layer), key_signature)
            if layout is None or warm_key not in self._fwd_warmed:
                warm_out = entry.fwd.warm(fwd_body)
                layout = _layout(warm_out, static_hidden)
                self._fwd_warmed.add(warm_key)
                self.stats["forward_warmups"] += 1
            shape, stride, dtype, shares = layout
            static_out = static_hidden if shares else self._buffer_for(("out", 0), shape, stride, dtype, device)

            def fwd() -> torch.Tensor:
                out = fwd_body()
                fits = _can_share(out, static_out) if shares else (
                    out.shape == static_out.shape and out.stride() == static_out.stride() and out.dtype == dtype)
                if not fits:  # the forward changed its output layout since: the capture fails, eager from now
                    raise RuntimeError(f"output layout {tuple(out.shape)} {out.dtype} differs from the eager call's")
                static_out.copy_(out)
                return static_out

            entry.fwd.capture(fwd)
            static_grad = self._buffer(("grad_out", 0), static_out)
            entry.static = [static_hidden, *static_extras, static_grad]
            wrt_like = ([static_hidden] if entry.hidden_grad else []) + [static_extras[i] for i in entry.diff_extra]
            # the input's gradient may overwrite the output's buffer (copied last, see `bwd`)
            share_grad = entry.hidden_grad and _can_share(static_hidden, static_grad)
            grad_bufs = [static_grad if share_grad and i == 0 else self._buffer(("grad", i), t)
                         for i, t in enumerate(wrt_like + entry.params)]
            order = sorted(range(len(grad_bufs)), key=lambda i: grad_bufs[i] is static_grad)
            def bwd() -> tuple:
                grads = bwd_body()
                for i in order:  # a copy into the shared gradient buffer comes last: others may alias it
                    if grads[i] is not None:
                        grad_bufs[i].copy_(grads[i])
                return tuple(buf if g is not None else None for buf, g in zip(grad_bufs, grads))

            entry.bwd = self._new_graph(device)
            if key_signature not in self._warmed:
                entry.bwd.warm(bwd_body)
                self._warmed.add(key_signature)
                if not self.emulate:
                    # the warm-up's temporaries (a whole recompute + backward) sit cached for the capture stream,
                    # where no eager work can reuse them: hand them back before the pool grows
                    torch.cuda.empty_cache()
            entry.bwd.capture(bwd)
        except Exception as exc:  # a host sync or another uncapturable op inside the layer
            self._capture_failed(type(layer).__name__, exc, device)
            return None
        finally:
            _unregister_host_known(entry.host_known)
        self._flush_pending = True
        self.stats["captures"] += 1
        return entry


def _layout(out: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Size, tuple[int, ...], torch.dtype, bool]:
    """What a forward graph needs to know of a layer's output before capturing it: shape, strides, dtype, and
    whether it may be copied into the layer input's static buffer (a buffer laid out like `hidden`)."""
    return out.shape, out.stride(), out.dtype, _can_share(out, hidden)


def _can_share(result: torch.Tensor, buffer: torch.Tensor) -> bool:
    """Whether a graph may copy `result` into `buffer` (an input buffer it has finished reading): the same
    layout, and `result` is not a view of `buffer` (a pass-through output)."""
    return (
        result.shape == buffer.shape and result.dtype == buffer.dtype and result.stride() == buffer.stride()
        and result.device == buffer.device
        and result.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr()
    )


def _draws_random_numbers(layer: nn.Module) -> bool:
    """Whether a training-mode call of `layer` uses dropout (modules, or attention dropout rates > 0)."""
    for mod in layer.modules():
        if not mod.training:
            continue
        if isinstance(mod, nn.modules.dropout._DropoutNd) and mod.p > 0:
            return True
        for attr in ("attention_dropout", "dropout", "dropout_p"):
            value = mod.__dict__.get(attr)
            if isinstance(value, float) and value > 0:
                return True
    return False


def _trainable_slots(layer: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, name) of each trainable parameter of `layer`, once each, in `layer.parameters()` order."""
    slots, seen = [], set()
    for mod in layer.modules():
        for name, p in mod._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                if p.requires_grad:
                    slots.append((mod, name))
    return slots


class _swapped_params:
    """Temporarily read the parameters at `slots` as `tensors` (what functional_call does, without the module's
    __call__, which here would re-enter the checkpointing wrapper)."""

    def __init__(self, slots: list[tuple[nn.Module, str]], tensors: list[torch.Tensor]) -> None:
        self.slots, self.tensors, self.saved = slots, tensors, []

    def __enter__(self) -> None:
        for (mod, name), t in zip(self.slots, self.tensors):
            self.saved.append(mod._parameters[name])
            mod._parameters[name] = t

    def __exit__(self, *exc: Any) -> None:
        for (mod, name), p in zip(self.slots, self.saved):
            mod._parameters[name] = p
        self.saved = []


def _register_host_known(pairs: list[tuple[torch.Tensor, tuple[int, ...]]]) -> None:
    for t, values in pairs:
        _HOST_KNOWN[id(t)] = (t, values)


def _unregister_host_known(pairs: list[tuple[torch.Tensor, tuple[int, ...]]]) -> None:
    for t, _ in pairs:
        _HOST_KNOWN.pop(id(t), None)
