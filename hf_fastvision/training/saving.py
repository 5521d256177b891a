"""Saving trained models: LoRA adapters, merged 16-bit (LoRA folded into dequantized weights), merged 4-bit.

Adapters are peft's own format (`peft_model.save_pretrained` / `push_to_hub`), so adapters made elsewhere (e.g. by
Unsloth) load with `PeftModel.from_pretrained(model, folder)` and ours load anywhere peft runs. Merged folders are
plain transformers checkpoints with upstream class names. Every save goes through `hf_fastvision.writer`: nothing
the user had is deleted, a clash with a file we did not write is refused unless ``overwrite=True``, and an earlier
save of ours is replaced atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from hf_fastvision.writer import SafeWriter

__all__ = ["merged_state_dict", "save_merged_16bit", "save_merged_4bit", "save_adapter"]


def _dense_weight(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The 16-bit weight of a Linear, Linear4bit or Linear8bitLt."""
    weight = layer.weight
    if getattr(weight, "quant_state", None) is not None:  # bitsandbytes 4-bit
        import bitsandbytes.functional as F

        from hf_fastvision.quantization import canonical_4bit

        canonical_4bit(weight)  # after a CPU inference forward bitsandbytes holds it in its CPU GEMV layout
        return F.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
    scb = getattr(weight, "SCB", None)
    if scb is not None:  # bitsandbytes LLM.int8: row-wise absmax scaling
        return (weight.data.float() * scb.float().unsqueeze(1) / 127.0).to(dtype)
    return weight.data.to(dtype)


def _is_quantized_linear(module: nn.Module) -> bool:
    return getattr(getattr(module, "weight", None), "quant_state", None) is not None or type(module).__name__ == "Linear8bitLt"


def merged_state_dict(model: Any, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """State dict of the base model with every quantized linear dequantized and every active LoRA folded in."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out: dict[str, torch.Tensor] = {}
    skip_prefixes: list[str] = []
    for name, module in base.named_modules():
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        prefix = f"{name}." if name else ""
        if isinstance(module, LoraLayer):
            inner = module.get_base_layer()
            weight = _dense_weight(inner, torch.float32)
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    weight = weight + module.get_delta_weight(adapter).float()
            out[prefix + "weight"] = weight.to(dtype)
            if getattr(inner, "bias", None) is not None:
                out[prefix + "bias"] = inner.bias.data.to(dtype)
            skip_prefixes.append(prefix)
            continue
        if _is_quantized_linear(module):
            out[prefix + "weight"] = _dense_weight(module, dtype)
            if module.bias is not None:
                out[prefix + "bias"] = module.bias.data.to(dtype)
            skip_prefixes.append(prefix)
            continue
        for pname, param in module.named_parameters(recurse=False):
            out[prefix + pname] = param.data.to(dtype) if param.is_floating_point() else param.data
        for bname, buf in module.named_buffers(recurse=False):
            if bname not in module._non_persistent_buffers_set:
                out[prefix + bname] = buf
    return out


_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")


def _write_merged_16bit(model: Any, folder: Path, processor: Any, dtype: torch.dtype) -> None:
    from accelerate import init_empty_weights

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    state = merged_state_dict(model, dtype)
    config = base.config.__class__.from_dict(base.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    with init_empty_weights():
        fresh = type(base)._from_config(config, dtype=dtype)
    missing, unexpected = fresh.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k not in _tied_keys(fresh)]
    if missing or unexpected:
        raise RuntimeError(f"merged weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    fresh.tie_weights()
    fresh.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)


def save_merged_16bit(
    model: Any,
    folder: str | os.PathLike[str],
    processor: Any = None,
    dtype: torch.dtype = torch.bfloat16,
    *,
    overwrite: bool = False,
) -> Path:
    """Fold LoRA into dequantized weights and save a plain 16-bit checkpoint (no quantization_config).

    ``overwrite=True`` replaces files of the same name that hf_fastvision did not write (nothing else).
    """
    with SafeWriter(folder, kind="merged_16bit", overwrite=overwrite, expected=_MODEL_FILES) as w:
        _write_merged_16bit(model, w.tmp, processor, dtype)
    return w.dest


def _tied_keys(model: nn.Module) -> set[str]:
    keys = getattr(model, "_tied_weights_keys", None) or {}
    return set(keys if isinstance(keys, (list, set, tuple)) else keys.keys())


def save_merged_4bit(
    model: Any, folder: str | os.PathLike[str], processor: Any = None, *, overwrite: bool = False, **load_kwargs: Any
) -> Path:
    """Fold LoRA into the weights, re-quantize with the architecture's 4-bit plan, save a bnb-4bit checkpoint."""
    from hf_fastvision.auto import AutoFastVisionModel

    dtype = load_kwargs.pop("dtype", torch.bfloat16)
    with SafeWriter(folder, kind="merged_4bit", overwrite=overwrite, expected=_MODEL_FILES) as w:
        staging = w.scratch("merged16")  # the 16-bit copy; removed at the end, or by the next save if we die
        _write_merged_16bit(model, staging, processor, dtype)
        quantized = AutoFastVisionModel.from_pretrained(staging, load_in_4bit=True, use_exact_model_name=True,
                                                        dtype=dtype, **load_kwargs)
        quantized.save_pretrained(w.tmp)
        if processor is not None:
            processor.save_pretrained(w.tmp)
    return w.dest


_ADAPTER_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def _write_adapter_from_state(model: Any, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
    """peft's adapter files from a full state dict, selecting keys by name.

    peft's own `save_pretrained(state_dict=...)` picks entries by walking the model's modules, whose names under
    FSDP carry `_fsdp_wrapped_module` segments that the gathered state dict does not, so it would find nothing.
    """
    from safetensors.torch import save_file

    name = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapters[0]
    picked = {}
    for key, value in state_dict.items():
        for part in _ADAPTER_PARTS:
            marker = f".{part}.{name}"
            if marker + "." in key or key.endswith(marker):
                out_key = key.replace(marker, f".{part}", 1)
                if part == "lora_magnitude_vector":  # peft stores DoRA's magnitude without the ".weight" suffix
                    out_key = out_key.removesuffix(".weight")
                picked[out_key] = value.detach().to("cpu").contiguous()
                break
    if not picked:
        raise ValueError(f"no weights of adapter {name!r} in the state dict ({len(state_dict)} keys)")
    save_file(picked, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    model.peft_config[name].save_pretrained(str(folder))


def save_adapter(
    model: Any,
    folder: str | os.PathLike[str],
    processor: Any = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """peft's adapter format (adapter_config.json + adapter_model.safetensors), through the safe writer.

    ``state_dict``: the model's full state dict when the live parameters are not the whole tensors (FSDP:
    `hf_fastvision.distributed.save_on_main` gathers it and passes it here). ``overwrite=True`` replaces files of
    the same name that hf_fastvision did not write (nothing else).
    """
    if not hasattr(model, "peft_config"):
        raise ValueError("save_adapter needs a model with LoRA adapters (FastVisionModel.get_peft_model).")
    with SafeWriter(folder, kind="adapter", overwrite=overwrite, expected=_ADAPTER_FILES) as w:
        if state_dict is not None:
            _write_adapter_from_state(model, state_dict, w.tmp)
        else:
            model.save_pretrained(w.tmp)
        if processor is not None:
            processor.save_pretrained(w.tmp)
    return w.dest
