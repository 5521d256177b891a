"""Optional vLLM path for fast inference — thin, and NOT exercised by this project's tests.

vLLM is not installed on the CPU test machines nor on the GPU machine this project is benchmarked on, so nothing
here has run: this module only routes a checkpoint to ``vllm.LLM`` when (a) ``importlib.util.find_spec("vllm")``
finds vLLM and (b) vLLM's own model registry lists the checkpoint's architecture.  Otherwise it raises an error
that says what to do (``fast_generate`` — the static-cache path of ``enable_fast_inference`` — always works).

Nothing imports vllm unless `load_vllm_engine` is called and both checks pass; importing this module is free.
LoRA adapters go through vLLM's own LoRA support (``enable_lora=True`` + ``vllm.lora.request.LoRARequest``):
save the adapter with ``save_pretrained`` and pass its folder to `lora_request`.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from hf_fastvision.errors import FeatureNotAvailableError

__all__ = ["vllm_available", "vllm_supported_architectures", "vllm_supports", "load_vllm_engine", "lora_request"]


def vllm_available() -> bool:
    """True when the `vllm` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def vllm_supported_architectures() -> frozenset[str]:
    """Architecture class names vLLM's registry can serve (empty without vLLM)."""
    if not vllm_available():
        return frozenset()
    vllm = importlib.import_module("vllm")
    return frozenset(vllm.ModelRegistry.get_supported_archs())


def vllm_supports(config: Any) -> bool:
    """Whether vLLM is installed and lists one of the config's ``architectures``."""
    archs = set(getattr(config, "architectures", None) or [])
    return bool(archs & vllm_supported_architectures())


def _no_vllm() -> FeatureNotAvailableError:
    return FeatureNotAvailableError(
        "vLLM inference (the `vllm` package is not installed)",
        "Install it with `pip install vllm` on a CUDA machine, or use model.fast_generate(...) "
        "(enable_fast_inference) / model.generate(...).",
    )


def _check(config: Any) -> None:
    if not vllm_available():
        raise _no_vllm()
    if not vllm_supports(config):
        raise FeatureNotAvailableError(
            f"vLLM inference for architectures={getattr(config, 'architectures', None)}",
            "The installed vLLM does not list this architecture: use model.fast_generate(...) "
            "(enable_fast_inference) or model.generate(...) instead.",
        )


def load_vllm_engine(
    model_name_or_path: str,
    config: Any,
    *,
    max_seq_length: int,
    gpu_memory_utilization: float = 0.5,
    load_in_4bit: bool = True,
    max_lora_rank: int | None = None,
    **llm_kwargs: Any,
) -> Any:
    """A ``vllm.LLM`` for a checkpoint folder or Hub id (bitsandbytes 4-bit when ``load_in_4bit``).

    ``config`` is the checkpoint's transformers config (``model.config``), used to check support before vllm is
    imported.  Raises `FeatureNotAvailableError` without vLLM or for an architecture vLLM does not list.  ``max_lora_rank`` turns on vLLM's LoRA support.  Extra keywords go to ``vllm.LLM``.
    """
    _check(config)
    vllm = importlib.import_module("vllm")
    kwargs: dict[str, Any] = {
        "model": str(model_name_or_path),
        "max_model_len": int(max_seq_length),
        "gpu_memory_utilization": float(gpu_memory_utilization),
    }
    if load_in_4bit:
        kwargs["quantization"] = "bitsandbytes"
    if max_lora_rank is not None:
        kwargs.update(enable_lora=True, max_lora_rank=int(max_lora_rank))
    kwargs.update(llm_kwargs)
    return vllm.LLM(**kwargs)


def lora_request(adapter_folder: str, name: str = "adapter", adapter_id: int = 1) -> Any:
    """A ``vllm.lora.request.LoRARequest`` for a saved PEFT adapter folder (pass to ``LLM.generate``)."""
    if not vllm_available():
        raise _no_vllm()
    request_cls = importlib.import_module("vllm.lora.request").LoRARequest
    return request_cls(name, adapter_id, str(adapter_folder))
