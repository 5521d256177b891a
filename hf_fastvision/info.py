"""`hf-fastvision info`: resolution, architecture, quantization plan and memory estimate from the config alone."""

from __future__ import annotations

from typing import Any

from hf_fastvision.auto import AutoFastVisionModel
from hf_fastvision.loading import arch_for, default_dtype, load_config, plan_for, resolve_for
from hf_fastvision.options import options_from_kwargs
from hf_fastvision.quantization import estimate_memory, meta_model

__all__ = ["describe"]


def describe(name: str, **kwargs: Any) -> dict[str, Any]:
    """Everything `from_pretrained(name, **kwargs)` would decide, without loading a weight."""
    options = options_from_kwargs(kwargs)
    resolution = resolve_for(name, options)
    config = load_config(resolution, options.extra)
    spec = arch_for(config, name)
    dtype = default_dtype(options.dtype)
    model_class = AutoFastVisionModel._model_mapping[type(config)]
    meta = meta_model(config, model_class)
    plan = plan_for(config, spec, model_class, options, dtype, meta=meta)
    memory = estimate_memory(meta, plan, dtype_bytes=2 if dtype.itemsize <= 2 else 4)
    return {
        "resolution": resolution.as_dict(),
        "model_type": config.model_type,
        "class": model_class.__name__,
        "arch": spec.name,
        "generic": spec.generic,
        "plan": plan,
        "memory": memory,
    }


def format_description(d: dict[str, Any]) -> str:
    plan = d["plan"]
    res = d["resolution"]
    lines = [
        f"requested      : {res['requested']}",
        f"loads          : {res['name']}  ({res['reason']})",
        f"architecture   : {d['arch']}{' (generic path)' if d['generic'] else ''} — {d['class']} [{d['model_type']}]",
        f"quantization   : {plan.bits}-bit"
        + (f" {plan.quant_type}, double quant {'on' if plan.double_quant else 'off'}, compute {plan.compute_dtype}" if plan.bits == 4 else ""),
        "",
        f"{'role':<10} {'4-bit linears':>14} {'16-bit linears':>15}",
    ]
    for role, counts in sorted(plan.summary()["by_role"].items()):
        lines.append(f"{role:<10} {counts['quantized']:>14} {counts['kept_16bit']:>15}")
    lines += [
        "",
        "kept 16-bit    : " + (", ".join(plan.kept_roots) if plan.kept_roots else "(nothing)"),
        f"weights memory : {_size(d['memory']['total_gib'])} "
        f"({_size(d['memory']['quantized_gib'])} quantized + {_size(d['memory']['16bit_gib'])} 16-bit)",
        f"estimated GPU  : ~{_size(d['memory']['total_gib'] * 1.05 + 0.5)} to load (weights + CUDA context); "
        "training adds activations, LoRA weights and optimizer state",
    ]
    return "\n".join(lines)


def _size(gib: float) -> str:
    return f"{gib:.2f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"
