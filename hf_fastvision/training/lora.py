"""LoRA set-up for vision and language layers, chosen from the architecture spec, and train/inference switches.

Unlike the common recipe, nothing is upcast: `prepare_model_for_kbit_training` casts every 16-bit weight to
fp32 (paying memory for frozen weights); here frozen 4-bit and 16-bit weights keep their dtype and only the
LoRA weights are fp32.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from hf_fastvision import allocator
from hf_fastvision.errors import InvalidArgumentError
from hf_fastvision.loading import get_load_info
from hf_fastvision.processor import set_padding_side
from hf_fastvision.quantization import module_role
from hf_fastvision.registry import get_arch, resolve_roots
from hf_fastvision.training.checkpointing import disable_checkpointing, enable_checkpointing

__all__ = ["lora_target_modules", "get_peft_model", "for_training", "for_inference"]

logger = logging.getLogger(__name__)


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - 16-bit only installs
        return False
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def _kind(name: str, markers: Sequence[str]) -> bool:
    parts = name.split(".")[:-1]  # the containing modules, not the layer's own name
    return any(m in part for part in parts for m in markers)


def lora_target_modules(
    model: nn.Module,
    *,
    finetune_vision_layers: bool = True,
    finetune_language_layers: bool = True,
    finetune_attention_modules: bool = True,
    finetune_mlp_modules: bool = True,
) -> list[str]:
    """Full paths of the linear layers the flags select, from the spec's vision/language roots and markers."""
    base = _unwrap(model)
    spec = get_arch(base.config)
    roots = resolve_roots(spec, base)
    targets: list[str] = []
    for name, module in base.named_modules():
        if not _is_linear(module):
            continue
        role = module_role(name, roots)
        if not ((role == "vision" and finetune_vision_layers) or (role == "language" and finetune_language_layers)):
            continue
        is_attention = _kind(name, spec.attention_markers)
        is_mlp = not is_attention and _kind(name, spec.mlp_markers)
        if (is_attention and finetune_attention_modules) or (is_mlp and finetune_mlp_modules):
            targets.append(name)
    return targets


def _unwrap(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def get_peft_model(
    model: Any,
    r: int = 16,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    bias: str = "none",
    finetune_vision_layers: bool = True,
    finetune_language_layers: bool = True,
    finetune_attention_modules: bool = True,
    finetune_mlp_modules: bool = True,
    target_modules: Sequence[str] | str | None = None,
    modules_to_save: Sequence[str] | None = None,
    use_rslora: bool = False,
    random_state: int = 3407,
    use_gradient_checkpointing: Any = None,
    fast_lora_init: bool = True,
    **kwargs: Any,
) -> Any:
    """Wrap `model` with LoRA adapters on the layers the flags select (or `target_modules`, which overrides).

    `use_gradient_checkpointing`: "unsloth" (offloaded to CPU), True (plain), False; None keeps the value given
    at load. `fast_lora_init`: peft's injection on the meta device with the same starting weights drawn in a
    second thread (`training/lora_init.py`); configurations it does not model take peft's own path. Extra kwargs go
    to `peft.LoraConfig`.
    """
    from peft import LoraConfig
    from peft import get_peft_model as peft_get_peft_model

    _check_lora_numbers(r, lora_alpha, lora_dropout, bias)
    if target_modules is not None and not isinstance(target_modules, str) and not list(target_modules):
        if not kwargs.get("target_parameters"):
            raise InvalidArgumentError.empty_target_modules()
    if not (finetune_vision_layers or finetune_language_layers) and target_modules is None:
        raise ValueError("Select vision and/or language layers (finetune_*_layers=True), or pass target_modules.")
    if not (finetune_attention_modules or finetune_mlp_modules) and target_modules is None:
        raise ValueError("Select attention and/or MLP modules (finetune_*_modules=True), or pass target_modules.")
    if hasattr(model, "peft_config"):
        raise ValueError("This model already has LoRA adapters; load a fresh base model to add new ones.")
    targets = (
        target_modules
        if target_modules is not None
        else lora_target_modules(
            model,
            finetune_vision_layers=finetune_vision_layers,
            finetune_language_layers=finetune_language_layers,
            finetune_attention_modules=finetune_attention_modules,
            finetune_mlp_modules=finetune_mlp_modules,
        )
    )
    if not targets:
        raise ValueError("No linear layer matches the selected flags; pass target_modules explicitly.")
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        bias=bias,
        target_modules=list(targets) if not isinstance(targets, str) else targets,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        use_rslora=use_rslora,
        task_type=None,
        **kwargs,
    )
    if target_modules is not None:
        _check_targets(model, config)
    from hf_fastvision.training import precompile

    precompile.precompile_if_enabled(_unwrap(model), frozen=True)  # background compiles overlap the injection
    dtypes_before = {n: p.dtype for n, p in model.named_parameters()}
    mode = use_gradient_checkpointing if use_gradient_checkpointing is not None else getattr(
        model, "_hf_fastvision_checkpointing", "unsloth"
    )
    from hf_fastvision.training import lora_init

    why_not = lora_init.supported(model, config) if fast_lora_init else "fast_lora_init=False"
    fast = lora_init.inject(model, config, seed=random_state) if why_not is None else None
    if fast is None:
        logger.debug("LoRA set-up through peft's own path: %s", why_not or "a target is not a linear layer")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(random_state)
            peft_model = peft_get_peft_model(model, config, autocast_adapter_dtype=True)
        return _finish_set_up(peft_model, dtypes_before, mode)
    peft_model, pending = fast
    try:  # A's numbers are still being drawn in a thread: nothing below reads them
        return _finish_set_up(peft_model, dtypes_before, mode)
    finally:
        pending.finish()


@functools.lru_cache(maxsize=1)
def _bias_choices() -> tuple[str, ...]:
    """peft's `LoraConfig.bias` choices, read from its type hint."""
    import typing

    from peft import LoraConfig

    try:
        choices = typing.get_args(typing.get_type_hints(LoraConfig)["bias"])
    except Exception:  # pragma: no cover - a peft whose hints do not resolve
        choices = ()
    return tuple(c for c in choices if isinstance(c, str)) or ("none", "all", "lora_only")


def _check_lora_numbers(r: Any, lora_alpha: Any, lora_dropout: Any, bias: Any) -> None:
    """Rank, alpha, dropout and bias checked before peft sees them (peft accepts a negative alpha, and fails
    on a float rank only deep inside `torch.empty`)."""
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r <= 0:
        raise InvalidArgumentError.lora_rank(r)
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, numbers.Real) or not (
        math.isfinite(lora_alpha) and lora_alpha > 0
    ):
        raise InvalidArgumentError.lora_alpha(lora_alpha)
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, numbers.Real) or not 0 <= lora_dropout < 1:
        raise InvalidArgumentError.lora_dropout(lora_dropout)
    if not isinstance(bias, str) or bias not in _bias_choices():
        raise InvalidArgumentError.choice("bias", bias, _bias_choices())


_WRAPPABLE = (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)


def _wrappable(module: nn.Module) -> bool:
    return _is_linear(module) or isinstance(module, _WRAPPABLE) or type(module).__name__ == "Conv1D"


def _short_name(name: str) -> str:
    """A layer's own name as `target_modules` takes it ("q_proj"; "mlp.0" inside a Sequential)."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def _check_targets(model: nn.Module, config: Any) -> None:
    """`target_modules` given by the user match at least one module, and only modules LoRA can wrap.

    Matching is peft's own (`check_target_module_exists`: names match a path or its suffix, a string is a regex
    over full paths), so what passes here is what peft would inject; checked before peft touches the model.
    """
    from peft.tuners.tuners_utils import check_target_module_exists

    targets = config.target_modules
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            return
        try:
            re.compile(targets)
        except re.error as exc:
            raise InvalidArgumentError.bad_regex("target_modules", targets, str(exc)) from None
    named = list(model.named_modules())
    linear = sorted({_short_name(name) for name, module in named if name and _is_linear(module)})
    matched = {name: module for name, module in named if name and check_target_module_exists(config, name)}
    if not matched:
        shown = targets if isinstance(targets, str) else sorted(targets)
        raise InvalidArgumentError.unmatched_target_modules(shown, linear)
    unwrappable = {name: type(module).__name__ for name, module in matched.items() if not _wrappable(module)}
    if unwrappable:
        raise InvalidArgumentError.unsupported_target_modules(unwrappable, linear)


def _finish_set_up(peft_model: Any, dtypes_before: dict[str, torch.dtype], mode: Any) -> Any:
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()  # LoRA trains in fp32
    base = _unwrap(peft_model)
    for name, param in base.named_parameters():  # frozen weights keep the dtype they were loaded in
        original = name.replace(".base_layer", "")
        if "lora_" not in name and param.dtype != dtypes_before.get(original, param.dtype):
            raise RuntimeError(f"{original} changed dtype from {dtypes_before[original]} to {param.dtype}")
    base._hf_fastvision_checkpointing = mode
    from hf_fastvision.patching import apply_lora_patches

    apply_lora_patches(base)
    if get_load_info(base) is None:
        logger.info("model was not loaded by hf_fastvision; LoRA set up from its config alone")
    for_training(peft_model)
    return peft_model


def _processor(model: Any) -> Any:
    return getattr(_unwrap(model), "_hf_fastvision_processor", None)


def for_training(model: Any, use_gradient_checkpointing: Any = None) -> Any:
    """Train mode, right padding, no KV cache, checkpointing as chosen at load / LoRA set-up, kernels bound."""
    from hf_fastvision.inference import disable_fast_inference
    from hf_fastvision.patching import resume_patches

    disable_fast_inference(model)
    base = _unwrap(model)
    resume_patches(base)
    mode = use_gradient_checkpointing if use_gradient_checkpointing is not None else getattr(
        base, "_hf_fastvision_checkpointing", "unsloth"
    )
    model.train()
    _set_use_cache(base, False)
    if mode:
        enable_checkpointing(base, mode)
    else:
        disable_checkpointing(base)
    if (processor := _processor(model)) is not None:
        set_padding_side(processor, "right")
    from hf_fastvision.training import precompile

    precompile.precompile_if_enabled(base)  # opt-in threads on CUDA: the first step finds its kernels compiled
    allocator.enable_for_training()  # expandable segments from here on, where deferred (see `allocator`)
    return model


def for_inference(model: Any) -> Any:
    """Eval mode, left padding for batched generation, KV cache on, checkpointing off, stock forwards (the
    training kernels are suspended until `for_training`: generation compiles and graphs the stock modules)."""
    from hf_fastvision.patching import suspend_patches

    base = _unwrap(model)
    suspend_patches(base)
    model.eval()
    _set_use_cache(base, True)
    disable_checkpointing(base)
    if (processor := _processor(model)) is not None:
        set_padding_side(processor, "left")
    from hf_fastvision.inference import enable_fast_inference, fast_inference_requested

    if fast_inference_requested(model):
        enable_fast_inference(model)  # back to the fast path chosen at load, settings kept from then
    return model


def _set_use_cache(model: nn.Module, value: bool) -> None:
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "use_cache"):
            cfg.use_cache = value
