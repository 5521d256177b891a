"""peft's LoRA injection with the same starting weights, without its slow part.

For every target peft builds two ``nn.Linear`` on the CPU (each drawing its matrix from the global generator),
draws A again (kaiming-uniform), zeroes B, then copies both, one at a time, to the base layer's device and dtype:
three draws and two blocking host-to-device copies per layer, 1,040 copies for Llama-3.2-11B-Vision's 520 targets,
all on the load's critical path (peft's injection took 1.0-2.3 s of that model's load on the H200 host).

Here peft injects on the meta device (its ``low_cpu_mem_usage=True``: the same modules, no tensors), while a
second thread draws the same numbers from a private generator seeded like peft's global one (`draw_lora_a`: the
two draws peft throws away are drawn too, in one call, so the stream stays aligned). Every adapter then gets its
storage on its device (B as zeros) while the thread may still be drawing, and `training/lora.py` binds kernels and
sets up training meanwhile; `Pending.finish` waits for the draws and copies every A in from one host-to-device
transfer. The user's global generator is never touched (peft's path, as `get_peft_model` calls it, forks it).

Same numbers, dtypes, devices and trainable flags as peft's path: `tests/training/test_lora_init.py` compares every
adapter tensor bit for bit. Anything this does not model takes peft's path instead (`supported` says why): a
``LoraConfig`` field off its default other than those in `_FIELDS_OK`, a target that is not a linear layer, a
default dtype other than fp32, or a peft without the low-memory injection.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import threading
import time
from typing import Any

import torch
from torch import nn

__all__ = ["supported", "inject", "Pending", "draw_lora_a", "draw_lora_a_reference"]

logger = logging.getLogger(__name__)

# LoraConfig fields that change nothing this module reproduces (the rank and scaling are read back from the layers)
_FIELDS_OK = frozenset({
    "r", "lora_alpha", "lora_dropout", "target_modules", "task_type", "inference_mode", "use_rslora",
    "base_model_name_or_path", "revision", "peft_type", "auto_mapping", "peft_version",
})


def supported(model: nn.Module, config: Any) -> str | None:
    """None when `inject` reproduces peft's path for ``model`` and ``config``, else the reason it does not."""
    try:
        import inspect

        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import BaseTuner, check_target_module_exists
    except ImportError as exc:  # pragma: no cover - peft is a dependency
        return f"peft import failed ({exc})"
    # the tuner's own signature: `peft.get_peft_model` itself may be wrapped (a profiler, a timer)
    if "low_cpu_mem_usage" not in inspect.signature(BaseTuner.inject_adapter).parameters:
        return "this peft has no low_cpu_mem_usage injection"
    if not hasattr(LoraLayer, "_get_base_layer_device_and_dtype") or check_target_module_exists is None:
        return "this peft lacks the layer helpers used here"
    if torch.get_default_dtype() != torch.float32:
        return f"default dtype is {torch.get_default_dtype()}"
    try:
        defaults = type(config)()
    except Exception as exc:  # pragma: no cover
        return f"cannot build a default {type(config).__name__} ({exc})"
    for field in dataclasses.fields(config):
        if field.name in _FIELDS_OK:
            continue
        if getattr(config, field.name, None) != getattr(defaults, field.name, None):
            return f"LoraConfig.{field.name} is not its default"
    if not isinstance(config.r, int) or config.r <= 0:
        return "r is not a positive integer"
    return None


def _plan(model: nn.Module, config: Any) -> list[tuple[str, int, int]] | None:
    """(name, in_features, out_features) of each module peft will wrap, in its order; None when one is not linear."""
    matches = _target_matcher(config)
    plan = []
    for name, module in model.named_modules():
        if not name or not matches(name):
            continue
        if not isinstance(module, nn.Linear):  # bitsandbytes' Linear4bit and Linear8bitLt are nn.Linear too
            return None
        plan.append((name, module.in_features, module.out_features))
    return plan


def _target_matcher(config: Any) -> Any:
    """``name -> bool``: whether peft's ``check_target_module_exists`` selects module ``name`` for ``config``.

    A list of names (as `lora_target_modules` gives: hundreds of full paths) selects a module whose name is one of
    them or ends with ``"." + one``; peft tests each with ``endswith`` (356 tests for each of Qwen2.5-VL-7B's ~2,700
    other modules); here each of the name's dot-suffixes is looked up in a set instead, the same answer. Other
    configurations (a regex, exclusions, layer indexes) ask peft."""
    from peft.tuners.tuners_utils import check_target_module_exists

    targets = config.target_modules
    plain = (isinstance(targets, (list, tuple, set, frozenset)) and not getattr(config, "exclude_modules", None)
             and not getattr(config, "modules_to_save", None) and getattr(config, "layers_to_transform", None) is None)
    if not plain:
        def ask_peft(name: str) -> bool:
            found = check_target_module_exists(config, name)
            return bool(found) and type(found).__name__ != "_ExcludedModule"

        return ask_peft
    wanted = frozenset(targets)

    def listed(name: str) -> bool:
        if name in wanted:
            return True
        dot = name.find(".")
        while dot != -1:
            if name[dot + 1:] in wanted:
                return True
            dot = name.find(".", dot + 1)
        return False

    return listed


def _kaiming_bound(fan_in: int) -> float:
    """``nn.init.kaiming_uniform_(w, a=sqrt(5))``'s bound for a weight of ``fan_in`` inputs, computed as it does."""
    return math.sqrt(3.0) * (nn.init.calculate_gain("leaky_relu", math.sqrt(5)) / math.sqrt(fan_in))


def draw_lora_a_reference(shapes: list[tuple[int, int]], r: int, seed: int) -> torch.Tensor:
    """peft's A matrices for layers of (in, out) ``shapes``, flat and in order, as its path draws them after
    ``torch.manual_seed(seed)``: per layer ``nn.Linear(in, r)`` and ``nn.Linear(r, out)`` (discarded), then
    kaiming-uniform A. Three ``uniform_`` calls per layer: the definition `draw_lora_a` is checked against."""
    gen = torch.Generator().manual_seed(seed)
    flat = torch.empty(sum(r * i for i, _ in shapes), dtype=torch.float32)
    scratch = torch.empty(max((max(r * i, o * r) for i, o in shapes), default=0), dtype=torch.float32)
    a = math.sqrt(5)
    offset = 0
    for i, o in shapes:
        nn.init.kaiming_uniform_(scratch[: r * i].view(r, i), a=a, generator=gen)  # nn.Linear(in, r)'s init
        nn.init.kaiming_uniform_(scratch[: o * r].view(o, r), a=a, generator=gen)  # nn.Linear(r, out)'s init
        nn.init.kaiming_uniform_(flat[offset: offset + r * i].view(r, i), a=a, generator=gen)  # reset_lora_parameters
        offset += r * i
    return flat


def _draw_two_calls(shapes: list[tuple[int, int]], r: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    flat = torch.empty(sum(r * i for i, _ in shapes), dtype=torch.float32)
    # bytes: ``random_`` on uint8 takes one 32-bit draw per element too, at half a float uniform_'s cost
    scratch = torch.empty(max((r * (i + o) for i, o in shapes), default=0), dtype=torch.uint8)
    offset = 0
    for i, o in shapes:
        scratch[: r * (i + o)].random_(generator=gen)  # nn.Linear(in, r) and nn.Linear(r, out): thrown away
        bound = _kaiming_bound(i)
        flat[offset: offset + r * i].uniform_(-bound, bound, generator=gen)  # kaiming_uniform_'s own call
        offset += r * i
    return flat


_ALIGNED: list[bool] = []


def _two_calls_aligned() -> bool:
    """Whether this torch's uint8 ``random_`` takes one 32-bit draw per element, as float32 ``uniform_`` does (so one
    call can stand for peft's two discarded initialisations); checked once against `draw_lora_a_reference`."""
    if not _ALIGNED:
        shapes, r = [(37, 11), (5, 300), (640, 96)], 4
        _ALIGNED.append(torch.equal(_draw_two_calls(shapes, r, 1), draw_lora_a_reference(shapes, r, 1)))
        if not _ALIGNED[0]:
            logger.warning("lora_init: torch's random_/uniform_ draw counts differ from the expected; drawing as peft does")
    return _ALIGNED[0]


def draw_lora_a(shapes: list[tuple[int, int]], r: int, seed: int) -> torch.Tensor:
    """peft's A matrices for layers of (in, out) ``shapes``, flat and in order, as its path draws them after
    ``torch.manual_seed(seed)`` (`draw_lora_a_reference`, bit for bit), in two calls per layer: one uint8
    ``random_`` for the two discarded initialisations (it takes one 32-bit draw per element, as a float32
    ``uniform_`` does whatever its bounds, at half the cost), one ``uniform_`` with kaiming's bounds into A: 0.19
    against 0.24 s for Qwen2.5-VL-7B's 356 layers on the CI CPU. All serial, GIL-free torch calls and no
    Python-level init, so from a thread it competes little with peft's injection (one stream drawn in big chunks
    and gathered by ``cat`` was 2-3x slower on the H200 host: ``cat`` runs an OpenMP team, there beside the
    compiling helper)."""
    if not _two_calls_aligned():
        return draw_lora_a_reference(shapes, r, seed)
    return _draw_two_calls(shapes, r, seed)


class _Drawer(threading.Thread):
    def __init__(self, shapes: list[tuple[int, int]], r: int, seed: int) -> None:
        super().__init__(name="hffv-lora-init", daemon=True)
        self.args, self.result, self.error = (shapes, r, seed), None, None
        self.wall_s = self.cpu_s = 0.0

    def run(self) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            self.result = draw_lora_a(*self.args)
        except BaseException as exc:  # pragma: no cover - re-raised by the caller
            self.error = exc
        self.wall_s, self.cpu_s = time.perf_counter() - wall, time.thread_time() - cpu


SWITCH_INTERVAL = 1e-4  # seconds: the interpreter's thread switch interval while the drawing thread runs
LAST_DRAW: dict[str, float] = {}  # the last set-up's draw: seconds of wall clock and of the drawing thread's CPU


def _draw_in_thread() -> bool:
    """``HF_FASTVISION_LORA_DRAW=inline`` draws before the injection instead of beside it (an A/B switch)."""
    return os.environ.get("HF_FASTVISION_LORA_DRAW", "thread").strip().lower() != "inline"


def inject(model: nn.Module, config: Any, seed: int, adapter_name: str = "default") -> tuple[Any, Pending] | None:
    """``peft.get_peft_model(model, config, autocast_adapter_dtype=True)`` run after ``torch.manual_seed(seed)``,
    with the same adapter weights once the returned `Pending` is finished; the caller checks `supported` first.

    Returns ``(peft_model, pending)``: every adapter already has its final shape, dtype, device and trainable flag
    (B its zeros), only A's numbers are still being drawn; the caller may bind kernels and set up training
    meanwhile, as long as nothing reads A, then must call ``pending.finish()`` (also on its error path). None, with
    ``model`` untouched, where a target is not a linear layer (peft's path then applies)."""
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    plan = _plan(model, config)
    if plan is None:
        return None
    drawer = _Drawer([(i, o) for _, i, o in plan], config.r, seed)
    _two_calls_aligned()  # the one-off check runs here, not in the thread
    pending = Pending(drawer, plan, config.r, seed, adapter_name)
    try:
        if _draw_in_thread():
            # each of the drawer's torch calls ends by asking for the GIL back, which peft's pure-Python surgery
            # holds for up to the switch interval (5 ms): with the default the draws finished ~0.1 s (CPU) to
            # ~0.4 s (H200 host) after the injection; at 0.1 ms they finish within it on CPU (Qwen2.5-VL-7B:
            # 0.36-0.41 s for both, against 0.46-0.49 s, and 0.45 s drawing first). Restored by `finish`.
            sys.setswitchinterval(min(pending.switch_interval, SWITCH_INTERVAL))
            drawer.start()  # the draws overlap peft's module surgery below and the caller's set-up after it
        else:
            drawer.run()
        peft_model = get_peft_model(model, config, adapter_name=adapter_name, autocast_adapter_dtype=True,
                                    low_cpu_mem_usage=True)
        pending.layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
        pending.sources = _allocate(model, pending.layers, adapter_name)
    except BaseException:
        pending.finish(fill=False)
        raise
    return peft_model, pending


class Pending:
    """The A matrices of an `inject` still being drawn: `finish` waits for the draws and copies them in."""

    def __init__(self, drawer: _Drawer, plan: list[tuple[str, int, int]], r: int, seed: int, adapter_name: str):
        self.drawer, self.plan, self.r, self.seed, self.adapter_name = drawer, plan, r, seed, adapter_name
        self.switch_interval = sys.getswitchinterval()
        self.layers: list[tuple[str, nn.Module]] = []
        self.sources: list[torch.dtype] = []
        self.done = False

    def finish(self, fill: bool = True) -> None:
        """Join the drawing thread, restore the switch interval, and (``fill``) give every A its numbers."""
        if self.done:
            return
        self.done = True
        try:
            if self.drawer.ident is not None:
                self.drawer.join()
        finally:
            sys.setswitchinterval(self.switch_interval)
        LAST_DRAW.clear()
        LAST_DRAW.update(wall_s=self.drawer.wall_s, cpu_s=self.drawer.cpu_s)
        if self.drawer.error is not None:
            raise self.drawer.error
        if not fill:
            return
        flat = self.drawer.result
        if [name for name, _ in self.layers] != [name for name, _, _ in self.plan]:
            # peft chose other layers than planned: draw again in its order
            logger.debug("lora_init: peft wrapped other layers than planned; drawing again in its order")
            flat = draw_lora_a([(m.in_features, m.out_features) for _, m in self.layers], self.r, self.seed)
        _materialize(self.layers, self.sources, flat, self.adapter_name)


def _allocate(model: nn.Module, layers: list[tuple[str, nn.Module]], adapter_name: str) -> list[torch.dtype]:
    """Give each meta-device adapter real storage on the base layer's device, in the dtype peft's path ends with
    (the base layer's float dtype, as ``_move_adapter_to_device_of_base_layer`` casts, then its fp32 autocast of
    16-bit and fp8 adapters): B its zeros, A uninitialised until `_materialize`. Returns, per layer, the dtype A
    passes through on peft's path (the base layer's), so that `_materialize` rounds it the same way."""
    upcast = _upcast_dtypes()
    sources = []
    for name, layer in layers:
        lora_a, lora_b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        r = lora_a.weight.shape[0]
        if (tuple(lora_a.weight.shape) != (r, layer.in_features) or lora_a.bias is not None
                or tuple(lora_b.weight.shape) != (layer.out_features, r) or lora_b.bias is not None):
            raise RuntimeError(f"lora_init: {name} has adapters of an unexpected shape; use peft's path")
        device, dtype = layer._get_base_layer_device_and_dtype(layer.get_base_layer())
        device = torch.device("cpu") if device is None or device.type == "meta" else torch.device(device)
        target = dtype if dtype is not None and (dtype.is_floating_point or dtype.is_complex) else torch.float32
        final = torch.float32 if target in upcast else target  # peft's autocast of the adapters, done here
        a = torch.empty(r, layer.in_features, dtype=final, device=device)
        b = torch.zeros(layer.out_features, r, dtype=final, device=device)
        lora_a.weight = nn.Parameter(a, requires_grad=lora_a.weight.requires_grad)
        lora_b.weight = nn.Parameter(b, requires_grad=lora_b.weight.requires_grad)
        sources.append(target)
    return sources


def _upcast_dtypes() -> set[torch.dtype]:
    """The adapter dtypes peft's ``cast_adapter_dtype`` turns into fp32 (16-bit floats and the fp8 kinds)."""
    try:
        from peft.utils import UPCAST_DTYPES  # the names cast_adapter_dtype reads (peft >= 0.15)
    except ImportError:  # pragma: no cover - older peft: 16-bit floats only
        UPCAST_DTYPES = ()
    dtypes = {torch.float16, torch.bfloat16}
    for name in UPCAST_DTYPES:
        if (dtype := getattr(torch, name, None)) is not None:
            dtypes.add(dtype)
    return dtypes


@torch.no_grad()
def _materialize(layers: list[tuple[str, nn.Module]], sources: list[torch.dtype], flat: torch.Tensor,
                 adapter_name: str) -> None:
    """Copy each layer's A out of ``flat`` (one host-to-device transfer per device) into the parameter it has now,
    rounded through its base layer's dtype first where peft's path does (a 16-bit base: bf16, then fp32)."""
    on_device: dict[torch.device, torch.Tensor] = {}
    offset = 0
    for (name, layer), source in zip(layers, sources):
        weight = layer.lora_A[adapter_name].weight
        n = weight.numel()
        if weight.shape[1] != layer.in_features or offset + n > flat.numel():
            raise RuntimeError(f"lora_init: {name}'s A does not match the draws; use peft's path")
        if weight.device not in on_device:
            on_device[weight.device] = flat.to(weight.device)
        values = on_device[weight.device][offset: offset + n].view(weight.shape)
        weight.copy_(values.to(source) if source != weight.dtype else values)
        offset += n
    if offset != flat.numel():
        raise RuntimeError("lora_init: drew for more layers than peft wrapped")
