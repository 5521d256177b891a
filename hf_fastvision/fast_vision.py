"""`FastVisionModel`: the keyword front users of Unsloth know, returning `(model, processor)`."""

from __future__ import annotations

import numbers
import os
import warnings
from typing import Any

import torch

from hf_fastvision.auto import AutoFastVisionModel
from hf_fastvision.errors import InvalidArgumentError
from hf_fastvision.loading import get_load_info, load_model
from hf_fastvision.options import options_from_flags
from hf_fastvision.processor import load_processor
from hf_fastvision.registry import get_arch

__all__ = ["FastVisionModel"]

_PROCESSOR_KWARGS = ("token", "revision", "cache_dir", "local_files_only", "trust_remote_code")


def _check_max_seq_length(max_seq_length: Any) -> None:
    """A positive int (or None, no limit); anything else is refused before loading."""
    if max_seq_length is None:
        return
    if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, numbers.Integral) or max_seq_length <= 0:
        raise InvalidArgumentError.positive_int("max_seq_length", max_seq_length, 2048)


def _warn_past_positions(config: Any, max_seq_length: int | None) -> None:
    """Warn when `max_seq_length` exceeds the language model's `max_position_embeddings`."""
    if max_seq_length is None:
        return
    text = None
    try:
        text = config.get_text_config() if hasattr(config, "get_text_config") else getattr(config, "text_config", None)
    except Exception:  # heterogeneous configs (Gemma 4) may refuse some attribute reads
        text = getattr(config, "text_config", None)
    positions = None
    for cfg in (text, config):
        try:
            positions = getattr(cfg, "max_position_embeddings", None) if cfg is not None else None
        except Exception:
            positions = None
        if isinstance(positions, int) and not isinstance(positions, bool) and positions > 0:
            break
        positions = None
    if positions is not None and max_seq_length > positions:
        warnings.warn(InvalidArgumentError.long_sequence_warning(int(max_seq_length), positions), UserWarning, stacklevel=3)


class FastVisionModel:
    """Static entry points: `from_pretrained`, plus the training helpers added by `hf_fastvision.training`."""

    @staticmethod
    def from_pretrained(
        model_name: str | os.PathLike[str] = "unsloth/Llama-3.2-11B-Vision-Instruct-bnb-4bit",
        max_seq_length: int = 2048,
        dtype: torch.dtype | str | None = None,
        load_in_4bit: bool = True,
        load_in_8bit: bool = False,
        load_in_16bit: bool = False,
        full_finetuning: bool = False,
        token: str | None = None,
        device_map: Any = "sequential",
        trust_remote_code: bool = False,
        use_gradient_checkpointing: Any = "unsloth",
        fast_inference: bool = False,
        gpu_memory_utilization: float = 0.5,
        **kwargs: Any,
    ) -> tuple[Any, Any]:
        """Load a vision-language model (4-bit by default) and its processor, ready for LoRA fine-tuning.

        Extra keyword arguments: `max_image_size` (longest image side in pixels: the processor's resolution
        bound, the biggest memory lever), `keep_vision_16bit`, `keep_modules`, `use_exact_model_name`,
        `quant_type`, `double_quant`, `quant_storage`, `init_missing` (module prefixes, e.g. ``("lm_head",)``,
        whose tensors a checkpoint may lack: they are freshly initialised), and transformers' own `revision`, `cache_dir`,
        `local_files_only`, `attn_implementation`, `quantization_config` (which wins over the built-in plan).

        ``fast_inference=True`` attaches ``model.fast_generate`` (static KV cache of ``max_seq_length``, decode step
        compiled on CUDA). ``gpu_memory_utilization`` is the share of free GPU memory it may take: the KV cache,
        plus a 16-bit decode copy of the language model's 4-bit linears when that fits (see
        `hf_fastvision.inference.enable_fast_inference`, ``decode_weights``; `for_training` frees it).
        """
        if not 0.0 < float(gpu_memory_utilization) <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        _check_max_seq_length(max_seq_length)
        max_image_size = kwargs.pop("max_image_size", None)
        kwargs["token"] = token
        kwargs["trust_remote_code"] = trust_remote_code
        options = options_from_flags(
            load_in_4bit=load_in_4bit,
            load_in_8bit=load_in_8bit,
            load_in_16bit=load_in_16bit,
            full_finetuning=full_finetuning,
            dtype=dtype,
            device_map=device_map,
            use_gradient_checkpointing=use_gradient_checkpointing,
            kwargs=kwargs,
        )
        model = load_model(model_name, options, AutoFastVisionModel._model_mapping)
        info = get_load_info(model)
        assert info is not None
        processor_kwargs = {k: options.extra[k] for k in _PROCESSOR_KWARGS if options.extra.get(k) is not None}
        if info.resolution.revision is not None:
            processor_kwargs["revision"] = info.resolution.revision
        processor = load_processor(
            info.resolution.name,
            get_arch(model.config),
            model=model,
            max_seq_length=max_seq_length,
            max_image_size=max_image_size,
            **processor_kwargs,
        )
        _warn_past_positions(model.config, max_seq_length)
        model.max_seq_length = max_seq_length
        model._hf_fastvision_processor = processor  # for_training / for_inference switch its padding side
        if fast_inference:
            from hf_fastvision.inference import enable_fast_inference

            enable_fast_inference(
                model, max_seq_length=max_seq_length or 2048, gpu_memory_utilization=gpu_memory_utilization
            )
        return model, processor

    @staticmethod
    def get_peft_model(model: Any, **kwargs: Any) -> Any:
        """LoRA on the vision and/or language layers the flags select; see `hf_fastvision.training.get_peft_model`."""
        from hf_fastvision.training.lora import get_peft_model

        return get_peft_model(model, **kwargs)

    @staticmethod
    def for_training(model: Any, use_gradient_checkpointing: Any = None) -> Any:
        from hf_fastvision.training.lora import for_training

        return for_training(model, use_gradient_checkpointing)

    @staticmethod
    def for_inference(model: Any) -> Any:
        from hf_fastvision.training.lora import for_inference

        return for_inference(model)
