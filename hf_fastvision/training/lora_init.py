"""peft's LoRA injection with the same starting weights, without its slow part.

For every target peft builds two ``nn.Linear`` on the CPU (each drawing its matrix from the global generator),
draws A again (kaiming-uniform), zeroes B, then copies both, one at a time, to the base layer's device and dtype:
three draws and two blocking host-to-device copies per layer, 1,040 copies for Llama-3.2-11B-Vision's 520 targets,
all on the load's critical path (peft's injection took 1.0-2.3 s of that model's load on the H200 host).

Here peft injects on the meta device (its ``low_cpu_mem_usage=True``: the same modules, no tensors), while a
second thread draws the same random stream from a private generator seeded like peft's global one, in one
``uniform_(0, 1)`` call (the two draws peft throws away are drawn too, so the stream stays aligned; `draw_units`):
two GIL-free torch calls, so the thread hardly competes with the injection for the GIL (drawing layer by layer,
three Python-level initialisations per layer, it slowed the injection by ~40% and still made it wait). The unit
numbers reach each device in one copy, where each layer's A is scaled from them with the CPU kernel's float
rounding (`scale_units`, checked once against the reference draw: `unit_rounding`), and every B is allocated
there as zeros. The user's global generator is never touched (peft's path, as `get_peft_model` calls it, forks it).

Same numbers, dtypes, devices and trainable flags as peft's path: `tests/training/test_lora_init.py` compares every
adapter tensor bit for bit. Anything this does not model takes peft's path instead (`supported` says why): a
``LoraConfig`` field off its default other than those in `_FIELDS_OK`, a target that is not a linear layer, a
default dtype other than fp32, or a peft without the low-memory injection.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from typing import Any

import torch
from torch import nn

__all__ = ["supported", "inject", "draw_lora_a", "draw_lora_a_reference"]

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
    from peft.tuners.tuners_utils import check_target_module_exists

    plan = []
    for name, module in model.named_modules():
        found = check_target_module_exists(config, name) if name else None
        if not found or type(found).__name__ == "_ExcludedModule":
            continue
        if not isinstance(module, nn.Linear):  # bitsandbytes' Linear4bit and Linear8bitLt are nn.Linear too
            return None
        plan.append((name, module.in_features, module.out_features))
    return plan


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


def draw_units(shapes: list[tuple[int, int]], r: int, seed: int, chunk: int = 1 << 24) -> torch.Tensor:
    """The uniform [0, 1) numbers behind `draw_lora_a_reference`'s A matrices, flat and in order, in a few torch calls.

    A float32 ``uniform_(lo, hi)`` takes one 32-bit draw per element whatever the bounds, and ``uniform_(0, 1)``
    gives the unit number itself; so the whole stream (the two discarded draws of each layer included) is drawn
    ``chunk`` numbers per call into one reused buffer, and each chunk's kept numbers are gathered by one ``cat``:
    two GIL-free calls per chunk (~10 for a 7B model) instead of three Python-level initialisations per layer,
    so the drawing thread barely competes with peft's injection for the GIL. `scale_units` makes each A from them.
    """
    gen = torch.Generator().manual_seed(seed)
    keep, offset = [], 0  # (start, length) of each layer's A in the stream
    for i, o in shapes:
        offset += r * (i + o)  # nn.Linear(in, r) and nn.Linear(r, out): drawn, thrown away
        keep.append((offset, r * i))
        offset += r * i
    units = torch.empty(sum(n for _, n in keep), dtype=torch.float32)
    scratch = torch.empty(min(chunk, offset), dtype=torch.float32)
    k = filled = 0
    for c0 in range(0, offset, chunk):
        c1 = min(c0 + chunk, offset)
        buf = scratch[: c1 - c0]
        buf.uniform_(0.0, 1.0, generator=gen)
        pieces = []
        while k < len(keep):
            start, n = keep[k]
            lo, hi = max(start, c0), min(start + n, c1)
            if lo < hi:
                pieces.append(buf[lo - c0: hi - c0])
            if start + n > c1:
                break  # this layer's A goes on in the next chunk
            k += 1
        if pieces:
            m = sum(p.numel() for p in pieces)
            torch.cat(pieces, out=units[filled: filled + m])
            filled += m
    return units


def scale_units(units: torch.Tensor, fan_in: int, rounding: str) -> torch.Tensor:
    """A float32 ``uniform_(-b, b)`` result from its unit numbers (any device): ``u * (hi - lo) + lo`` in float32,
    fused (one rounding: exact in float64, then rounded) or as two roundings, as the CPU kernel computes it."""
    bound = _kaiming_bound(fan_in)
    lo, hi = torch.tensor([-bound, bound], dtype=torch.float32).tolist()  # the kernel's float bounds
    width = float(torch.tensor(hi, dtype=torch.float32) - torch.tensor(lo, dtype=torch.float32))
    if rounding == "fused":  # u*w has at most 48 significant bits and u*w+lo fits 53: exact in float64
        return units.double().mul_(width).add_(lo).float()
    return units.float().mul(width).add_(lo)


_ROUNDING: list[str | None] = []


def unit_rounding() -> str | None:
    """How this torch's CPU ``uniform_`` rounds ("fused" or "separate"), checked once against
    `draw_lora_a_reference`; None when neither reproduces it (`draw_lora_a` then draws the reference way)."""
    if not _ROUNDING:
        shapes, r = [(37, 11), (5, 300), (640, 96)], 4
        want = draw_lora_a_reference(shapes, r, 1)
        units = draw_units(shapes, r, 1)
        found = None
        for rounding in ("fused", "separate"):
            got, offset = [], 0
            for i, _ in shapes:
                got.append(scale_units(units[offset: offset + r * i], i, rounding))
                offset += r * i
            if torch.equal(torch.cat(got), want):
                found = rounding
                break
        if found is None:
            logger.warning("lora_init: torch's uniform_ is not reproduced from unit numbers; drawing layer by layer")
        _ROUNDING.append(found)
    return _ROUNDING[0]


def draw_lora_a(shapes: list[tuple[int, int]], r: int, seed: int) -> torch.Tensor:
    """peft's A matrices for layers of (in, out) ``shapes``, flat and in order, as its path draws them after
    ``torch.manual_seed(seed)`` (`draw_lora_a_reference`, bit for bit), through `draw_units`."""
    rounding = unit_rounding()
    if rounding is None:
        return draw_lora_a_reference(shapes, r, seed)
    units, out, offset = draw_units(shapes, r, seed), [], 0
    for i, _ in shapes:
        out.append(scale_units(units[offset: offset + r * i], i, rounding))
        offset += r * i
    return torch.cat(out) if out else units


class _Drawer(threading.Thread):
    """Draws the unit numbers (`draw_units`) when ``rounding`` is known, else the A matrices the reference way."""

    def __init__(self, shapes: list[tuple[int, int]], r: int, seed: int, rounding: str | None) -> None:
        super().__init__(name="hffv-lora-init", daemon=True)
        self.args, self.rounding, self.result, self.error = (shapes, r, seed), rounding, None, None

    def run(self) -> None:
        try:
            self.result = (draw_units if self.rounding else draw_lora_a_reference)(*self.args)
        except BaseException as exc:  # pragma: no cover - re-raised by the caller
            self.error = exc


def inject(model: nn.Module, config: Any, seed: int, adapter_name: str = "default") -> Any | None:
    """``peft.get_peft_model(model, config, autocast_adapter_dtype=True)`` run after ``torch.manual_seed(seed)``,
    with the same adapter weights; the caller checks `supported` first. None, with ``model`` untouched, where a
    target is not a linear layer (peft's path then applies)."""
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    plan = _plan(model, config)
    if plan is None:
        return None
    rounding = unit_rounding()
    drawer = _Drawer([(i, o) for _, i, o in plan], config.r, seed, rounding)
    drawer.start()  # the draws overlap peft's module surgery below
    peft_model = get_peft_model(model, config, adapter_name=adapter_name, autocast_adapter_dtype=True,
                                low_cpu_mem_usage=True)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    drawer.join()
    if drawer.error is not None:
        raise drawer.error
    flat = drawer.result
    if [name for name, _ in layers] != [name for name, _, _ in plan]:  # peft chose other layers: redraw in its order
        logger.debug("lora_init: peft wrapped other layers than planned; drawing again in its order")
        plan = [(name, m.in_features, m.out_features) for name, m in layers]
        flat, rounding = draw_lora_a([(i, o) for _, i, o in plan], config.r, seed), None
    _materialize(model, layers, flat, adapter_name, rounding)
    return peft_model


def _materialize(model: nn.Module, layers: list[tuple[str, nn.Module]], flat: torch.Tensor, adapter_name: str,
                 rounding: str | None = None) -> None:
    """Give each meta-device adapter its A (from ``flat``: the A matrices, or their unit numbers scaled here, on
    the device, when ``rounding`` is given) and zero B, on the base layer's device and (float) dtype, as peft's
    ``_move_adapter_to_device_of_base_layer`` would; peft's fp32 autocast then applies as usual."""
    from peft.tuners.tuners_utils import cast_adapter_dtype

    on_device: dict[torch.device, torch.Tensor] = {}
    offset = 0
    for name, layer in layers:
        lora_a, lora_b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
        r = lora_a.weight.shape[0]
        n = r * layer.in_features
        if (tuple(lora_a.weight.shape) != (r, layer.in_features) or lora_a.bias is not None
                or tuple(lora_b.weight.shape) != (layer.out_features, r) or lora_b.bias is not None):
            raise RuntimeError(f"lora_init: {name} has adapters of an unexpected shape; use peft's path")
        device, dtype = layer._get_base_layer_device_and_dtype(layer.get_base_layer())
        device = torch.device("cpu") if device is None or device.type == "meta" else torch.device(device)
        target = dtype if dtype is not None and (dtype.is_floating_point or dtype.is_complex) else torch.float32
        if device not in on_device:
            on_device[device] = flat.to(device)
        a = on_device[device][offset: offset + n]
        if rounding is None:
            a = a.view(r, layer.in_features).to(target, copy=True)
        else:  # a fresh float32 tensor: no copy needed to leave the shared buffer
            a = scale_units(a, layer.in_features, rounding).view(r, layer.in_features).to(target)
        offset += n
        b = torch.zeros(layer.out_features, r, dtype=target, device=device)
        lora_a.weight = nn.Parameter(a, requires_grad=lora_a.weight.requires_grad)
        lora_b.weight = nn.Parameter(b, requires_grad=lora_b.weight.requires_grad)
    if offset != flat.numel():
        raise RuntimeError("lora_init: drew for more layers than peft wrapped")
    cast_adapter_dtype(model, adapter_name=adapter_name, autocast_adapter_dtype=True)
