"""Front-end flags and kwargs → `LoadOptions` (shared by `AutoFastVisionModel` and `FastVisionModel`)."""

from __future__ import annotations

from typing import Any

from hf_fastvision.errors import ConflictingOptionsError
from hf_fastvision.loading import LoadOptions

__all__ = ["options_from_flags", "options_from_kwargs"]


def options_from_flags(
    *,
    load_in_4bit: bool,
    load_in_8bit: bool,
    load_in_16bit: bool,
    full_finetuning: bool,
    dtype: Any,
    device_map: Any,
    use_gradient_checkpointing: Any,
    kwargs: dict[str, Any],
) -> LoadOptions:
    """Map the Unsloth-style flags to load options.

    `load_in_4bit=True` is the default and yields to an explicit `load_in_8bit`, `load_in_16bit` or
    `full_finetuning`; any two of those three together are a conflict.
    """
    others = {"load_in_8bit": load_in_8bit, "load_in_16bit": load_in_16bit, "full_finetuning": full_finetuning}
    chosen = [k for k, v in others.items() if v]
    if len(chosen) > 1 and set(chosen) != {"load_in_16bit", "full_finetuning"}:
        raise ConflictingOptionsError(chosen, "choose one precision: 4-bit (default), 8-bit, or 16-bit / full fine-tuning.")
    if full_finetuning and load_in_8bit:
        raise ConflictingOptionsError(["full_finetuning", "load_in_8bit"], "full fine-tuning needs 16-bit weights.")
    if not (load_in_4bit or chosen):
        chosen = ["load_in_16bit"]  # load_in_4bit=False alone means 16-bit
    bits = 8 if load_in_8bit else 16 if ("load_in_16bit" in chosen or full_finetuning) else 4
    kw = dict(kwargs)
    if "torch_dtype" in kw:
        kw["dtype"] = kw.pop("torch_dtype")
    return LoadOptions(
        bits=bits,
        dtype=dtype if dtype is not None else kw.pop("dtype", None),
        device_map=device_map,
        quant_type=kw.pop("quant_type", "nf4"),
        double_quant=kw.pop("double_quant", True),
        quant_storage=kw.pop("quant_storage", "uint8"),
        keep_vision_16bit=kw.pop("keep_vision_16bit", False),
        keep_modules=tuple(kw.pop("keep_modules", ())),
        quantization_config=kw.pop("quantization_config", None),
        use_exact_model_name=kw.pop("use_exact_model_name", False),
        init_missing=kw.pop("init_missing", ()),
        full_finetuning=full_finetuning,
        use_gradient_checkpointing=use_gradient_checkpointing,
        patches=kw.pop("patches", True),
        extra=kw,
    )


def options_from_kwargs(kwargs: dict[str, Any]) -> LoadOptions:
    """`AutoFastVisionModel.from_pretrained` kwargs → options (same flag rules as `FastVisionModel`)."""
    kw = dict(kwargs)
    return options_from_flags(
        load_in_4bit=bool(kw.pop("load_in_4bit", True)),
        load_in_8bit=bool(kw.pop("load_in_8bit", False)),
        load_in_16bit=bool(kw.pop("load_in_16bit", False)),
        full_finetuning=bool(kw.pop("full_finetuning", False)),
        dtype=kw.pop("dtype", kw.pop("torch_dtype", None)),
        device_map=kw.pop("device_map", "sequential"),
        use_gradient_checkpointing=kw.pop("use_gradient_checkpointing", "unsloth"),
        kwargs=kw,
    )
