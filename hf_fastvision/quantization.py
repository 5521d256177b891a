"""Quantization plans: which linear layers become 4-bit (or 8-bit), which stay 16-bit, as inspectable data.

The plan is computed from a meta-device instance of the model class (no weights), so it reflects the installed
transformers' module tree. Skip entries handed to bitsandbytes are escaped full module paths followed by a
module-boundary lookahead, so they mean the same under every transformers 5.x matching rule (prefix regex on
5.17, boundary/suffix matching on 5.24): `model\\.visual(?=\\.|$)` skips `model.visual.*` and nothing else.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn

from hf_fastvision.errors import MissingDependencyError
from hf_fastvision.registry import ArchSpec, Roots, resolve_roots

__all__ = ["QuantPlan", "build_plan", "meta_model", "require_bitsandbytes", "skip_entry", "estimate_memory", "module_role"]

Role = Literal["lm_head", "projector", "vision", "language", "other"]


def require_bitsandbytes(feature: str = "4-bit loading") -> None:
    """Raise a clear error when bitsandbytes is not importable."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingDependencyError("bitsandbytes", feature)


def skip_entry(path: str) -> str:
    """A `llm_int8_skip_modules` entry matching `path` and its submodules only, on every transformers 5.x."""
    return re.escape(path) + r"(?=\.|$)"


def meta_model(config: Any, model_class: type) -> nn.Module:
    """An instance of `model_class` on the meta device: structure without memory."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        return model_class._from_config(config)


def module_role(name: str, roots: Roots) -> Role:
    def under(paths: Sequence[str]) -> bool:
        return any(name == p or name.startswith(p + ".") for p in paths)

    if under(roots.lm_head):
        return "lm_head"
    if under(roots.projectors):
        return "projector"
    if under(roots.vision):
        return "vision"
    if under(roots.language):
        return "language"
    return "other"


@dataclass
class QuantPlan:
    """What a load will quantize. `quantized` / `kept` list exact `nn.Linear` module paths."""

    bits: Literal[4, 8, 16] = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    quant_storage: str = "uint8"
    keep_vision_16bit: bool = False
    skip_modules: list[str] = field(default_factory=list)
    kept_roots: list[str] = field(default_factory=list)
    quantized: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    roles: dict[str, str] = field(default_factory=dict)

    def to_bnb_config(self) -> Any:
        """The BitsAndBytesConfig that realises this plan (None for 16-bit)."""
        if self.bits == 16:
            return None
        require_bitsandbytes(f"{self.bits}-bit loading")
        from transformers import BitsAndBytesConfig

        if self.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(self.skip_modules))
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype),
            bnb_4bit_quant_storage=getattr(torch, self.quant_storage),
            llm_int8_skip_modules=list(self.skip_modules),
        )

    @property
    def is_default_4bit(self) -> bool:
        """True when a published nf4 + double-quant twin realises this plan."""
        return self.bits == 4 and self.quant_type == "nf4" and self.double_quant and self.quant_storage == "uint8"

    def summary(self) -> dict[str, Any]:
        counts: dict[str, dict[str, int]] = {}
        for name in self.quantized + self.kept:
            bucket = counts.setdefault(self.roles.get(name, "other"), {"quantized": 0, "kept_16bit": 0})
            bucket["quantized" if name in set(self.quantized) else "kept_16bit"] += 1
        return {k: v for k, v in asdict(self).items() if k not in ("quantized", "kept", "roles", "skip_modules")} | {"by_role": counts}


def build_plan(
    model: nn.Module,
    spec: ArchSpec,
    *,
    bits: Literal[4, 8, 16] = 4,
    compute_dtype: torch.dtype = torch.bfloat16,
    quant_type: str = "nf4",
    double_quant: bool = True,
    quant_storage: torch.dtype = torch.uint8,
    keep_vision_16bit: bool = False,
    keep: Sequence[str] = (),
) -> QuantPlan:
    """Plan for `model` (usually from `meta_model`). `keep` adds regexes of module paths to keep 16-bit."""
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    roots = resolve_roots(spec, model)
    keep_res = [re.compile(k) for k in keep]
    kept_roots = list(roots.lm_head) + list(roots.projectors) + (list(roots.vision) if keep_vision_16bit else [])
    quantized: list[str] = []
    kept: list[str] = []
    extra_skips: list[str] = []
    roles: dict[str, str] = {}
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue  # bitsandbytes replaces exact nn.Linear only
        role = module_role(name, roots)
        roles[name] = role
        user_kept = any(r.search(name) for r in keep_res)
        in_kept_root = any(name == p or name.startswith(p + ".") for p in kept_roots)
        if bits == 16 or in_kept_root or user_kept:
            kept.append(name)
            if user_kept and not in_kept_root:
                extra_skips.append(skip_entry(name))
        else:
            quantized.append(name)
    skips = [skip_entry(p) for p in kept_roots] + extra_skips
    return QuantPlan(
        bits=bits,
        quant_type=quant_type,
        double_quant=double_quant,
        compute_dtype=str(compute_dtype).removeprefix("torch."),
        quant_storage=str(quant_storage).removeprefix("torch."),
        keep_vision_16bit=keep_vision_16bit,
        skip_modules=skips if bits != 16 else [],
        kept_roots=kept_roots,
        quantized=quantized,
        kept=kept,
        roles=roles,
    )


def estimate_memory(model: nn.Module, plan: QuantPlan, dtype_bytes: int = 2) -> dict[str, float]:
    """Bytes of weights after loading with `plan` (a meta model is enough), in GiB, by kind."""
    quantized = set(plan.quantized)
    q_bytes = 0.0
    other = 0.0
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            n = p.numel()
            if name in quantized and pname == "weight":
                if plan.bits == 4:
                    blocks = n / 64
                    q_bytes += n / 2 + (blocks * (1 + 4 / 256) if plan.double_quant else blocks * 4)
                else:
                    q_bytes += n + 4 * module.weight.shape[0]
            else:
                other += n * dtype_bytes
    gib = 1024**3
    return {"quantized_gib": q_bytes / gib, "16bit_gib": other / gib, "total_gib": (q_bytes + other) / gib}


def canonical_4bit(weight: torch.Tensor) -> torch.Tensor:
    """Give a bitsandbytes 4-bit weight back its canonical packing, in place; returns it.

    bitsandbytes 0.50 repacks a ``Linear4bit`` weight on its first eval-mode forward on an AVX512-BF16 CPU into a
    layout that only its CPU GEMV reads (``quant_state.packing_format_for_cpu``). ``dequantize_4bit`` and our
    kernels read the canonical layout, so whatever dequantizes a weight calls this first (bitsandbytes does the
    same before saving or moving to CUDA; its next CPU forward repacks again). The inverse is bitsandbytes' own
    and not exact: the repacking stored the block scales in bf16."""
    state = getattr(weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    return weight


def keep_canonical_packing(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking `model`'s 4-bit weights for its CPU GEMV; returns how many layers.

    The repacking (bitsandbytes 0.50, AVX512-BF16 CPUs, first eval forward) is lossy: it stores the block scales in
    bf16 and drops double quantization, so a model saved after a CPU inference call no longer holds the weights it
    was loaded with, and its logits change (the quantize CLI's save-and-reload check caught it). Layers keep the
    dequantize + ``F.linear`` route, the one bitsandbytes takes on CUDA for several rows."""
    count = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count
