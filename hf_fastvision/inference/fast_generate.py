"""`model.fast_generate(...)`: greedy-identical generation with a static KV cache (and CUDA graphs on CUDA).

Everything here is transformers' own machinery, switched on per instance:

- ``cache_implementation="static"``: a fixed-size KV cache (``StaticCache``, built by the model's own
  ``_prepare_static_cache``, so model-specific layouts such as Mllama's cross-attention layers come out right),
  sized to ``max_seq_length`` where the installed transformers accepts ``max_cache_len`` (5.24) and to the call's
  ``max_length`` otherwise (5.17);
- on CUDA, ``generate``'s automatic compilation of the decode step (prefill stays eager) with Inductor and CUDA
  graphs (the ``reduce-overhead`` setting) plus ``emulate_precision_casts``, so fused elementwise code rounds
  to bf16 where eager does.  transformers refuses to auto-compile bitsandbytes models
  (``hf_quantizer.is_compileable`` is False) although bitsandbytes' 4-bit matmul is a registered custom op that
  Dynamo traces, so the instance gets a ``_valid_auto_compile_criteria`` that allows it for a static cache on
  CUDA; on CPU, or with ``enable_fast_inference(model, compile=False)``, nothing is compiled.  (Dynamo's plain
  ``"cudagraphs"`` backend would keep eager kernels, but it refuses graphs whose inputs are mutated, and the
  static KV cache is exactly that.)

A PEFT model generates through ``PeftModel.generate``: LoRA adapters apply unmerged.  Greedy output equals
``model.generate(..., do_sample=False)`` token for token.  If a model cannot generate with a static cache the call
falls back to the dynamic cache, and ``fast_inference_state(model).fallback_reason`` records why.
"""

from __future__ import annotations

import logging
import types
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "FastInferenceState",
    "enable_fast_inference",
    "disable_fast_inference",
    "fast_inference_state",
    "max_batch_for_memory",
]

logger = logging.getLogger(__name__)

_STATE_ATTR = "_hf_fastvision_fast_inference"


@dataclass
class FastInferenceState:
    """What `enable_fast_inference` chose for one model instance (``model._hf_fastvision_fast_inference``)."""

    max_seq_length: int = field(metadata={"help": "KV cache length (prompt + new tokens) per sequence."})
    gpu_memory_utilization: float = field(metadata={"help": "Share of free GPU memory the KV cache may use."})
    max_batch_size: int | None = field(
        default=None, metadata={"help": "Largest batch one call may take (None: unbounded, e.g. on CPU)."}
    )
    compile: bool = field(default=False, metadata={"help": "Decode step compiled (Inductor + CUDA graphs) — CUDA only."})
    decode_kernel: bool = field(default=False, metadata={
        "help": "4-bit linears run the few-row nf4 kernel on decode steps (CUDA; `inference/decode_kernels.py`)."})
    decode_kernel_requested: bool = field(default=False, metadata={"help": "enable_fast_inference(decode_kernel=...)."})
    decode_weights: str = field(default="4bit", metadata={
        "help": "What the language model's 4-bit linears decode from: '16bit' (a dequantized copy, "
                "`inference/dense_decode.py`), '4bit' (bitsandbytes' own forward) or 'none' (no 4-bit linears)."})
    decode_weights_requested: str = field(default="auto", metadata={
        "help": "enable_fast_inference(decode_weights=...): 'auto', '16bit' or '4bit'."})
    dense_layers: int = field(default=0, metadata={"help": "Linears with a 16-bit decode copy."})
    dense_bytes: int = field(default=0, metadata={"help": "Bytes those copies take."})
    compile_requested: bool = field(default=True, metadata={"help": "enable_fast_inference(compile=...) as given."})
    static_cache: bool = field(default=True, metadata={"help": "False once the model fell back to DynamicCache."})
    fallback_reason: str | None = field(default=None, metadata={"help": "Why the dynamic cache is used, if it is."})
    static_worked: bool = field(default=False, metadata={"help": "A static-cache call has succeeded."})
    calls: int = field(default=0, metadata={"help": "fast_generate calls so far."})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a PeftModel (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def fast_inference_state(model: nn.Module) -> FastInferenceState | None:
    return getattr(_unwrap(model), _STATE_ATTR, None)


def fast_inference_requested(model: nn.Module) -> bool:
    """Whether fast inference is on, or was on before `disable_fast_inference` (e.g. by `for_training`)."""
    base = _unwrap(model)
    return getattr(base, _STATE_ATTR, None) is not None or getattr(base, "_hf_fastvision_fast_inference_settings", None) is not None


def _kv_bytes_per_sequence(model: nn.Module, max_seq_length: int) -> int:
    cfg = model.config.get_text_config(decoder=True)
    layers = int(getattr(cfg, "num_hidden_layers", 1))
    heads = int(getattr(cfg, "num_attention_heads", 1))
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    itemsize = torch.finfo(model.dtype).bits // 8 if model.dtype.is_floating_point else 2
    return 2 * layers * kv_heads * int(head_dim) * int(max_seq_length) * itemsize


def max_batch_for_memory(
    model: nn.Module, max_seq_length: int, gpu_memory_utilization: float, already_used: int = 0
) -> int | None:
    """Largest batch whose static KV cache fits in ``gpu_memory_utilization`` of free CUDA memory (None off CUDA).

    ``already_used``: bytes taken since the budget was set (a 16-bit decode copy), counted as free before and
    charged to the budget."""
    device = _unwrap(model).device
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    per_seq = _kv_bytes_per_sequence(_unwrap(model), max_seq_length)
    budget = int((free + already_used) * gpu_memory_utilization) - already_used
    return max(1, budget // max(per_seq, 1))


_DECODE_WEIGHTS = ("auto", "16bit", "4bit")


def _has_4bit(model: nn.Module) -> bool:
    from hf_fastvision.inference.decode_kernels import _is_linear4bit

    return any(_is_linear4bit(m) for m in model.modules())


def _dense_copy_fits(choice: str, need: int, per_seq: int, free: int, utilization: float) -> bool:
    """Whether a 16-bit decode copy of ``need`` bytes is made, given ``free`` bytes of GPU memory (as if no copy
    existed) and one sequence's KV cache of ``per_seq`` bytes. ``"16bit"`` that cannot fit at all raises."""
    if choice == "auto":
        return need + per_seq <= int(free * utilization)
    if need + per_seq > free:
        raise ValueError(
            f"decode_weights='16bit' needs {need / 2**30:.1f} GiB for the 16-bit decode copy plus "
            f"{per_seq / 2**30:.2f} GiB of KV cache, but only {free / 2**30:.1f} GiB of GPU memory is free: pass "
            "decode_weights='4bit' (or 'auto'), a smaller max_seq_length, or free GPU memory."
        )
    return True


def _bind_decode_weights(base: nn.Module, choice: str, max_seq_length: int, utilization: float) -> tuple[int, int]:
    """Apply ``decode_weights``: returns (layers with a 16-bit copy, their bytes)."""
    from hf_fastvision.inference.dense_decode import (
        bind_dense_decode, dense_decode_bound, dense_decode_bytes, dense_decode_held, unbind_dense_decode,
    )

    if choice == "4bit" or (choice == "auto" and base.device.type != "cuda"):
        unbind_dense_decode(base)
        return 0, 0
    if base.device.type == "cuda":
        held = dense_decode_held(base)
        free, _total = torch.cuda.mem_get_info(base.device)
        need = held + dense_decode_bytes(base)
        if not _dense_copy_fits(choice, need, _kv_bytes_per_sequence(base, max_seq_length), free + held, utilization):
            logger.info("fast_inference: the 16-bit decode copy (%.1f GiB) and one sequence's KV cache do not fit "
                        "gpu_memory_utilization=%s; decoding from the 4-bit weights", need / 2**30, utilization)
            unbind_dense_decode(base)
            return 0, 0
    bind_dense_decode(base)
    return dense_decode_bound(base), dense_decode_held(base)


def _supports_max_cache_len() -> bool:
    from transformers import GenerationConfig

    return hasattr(GenerationConfig(), "max_cache_len")


def _compile_criteria(self: nn.Module, model_kwargs: dict, generation_config: Any) -> bool:
    """`_valid_auto_compile_criteria` without the quantizer veto: compile the decode step for a static cache on CUDA."""
    state = getattr(self, _STATE_ATTR, None)
    if state is None or not state.compile or getattr(generation_config, "disable_compile", False):
        return type(self)._valid_auto_compile_criteria(self, model_kwargs, generation_config)
    from transformers import DynamicCache

    cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    return (
        self.device.type == "cuda"
        and cache is not None
        and bool(getattr(cache, "is_compileable", False))
        and not isinstance(cache, DynamicCache)
    )


def _compile_config() -> Any:
    """Inductor + CUDA graphs (what ``mode="reduce-overhead"`` sets; torch.compile takes a mode or options, not
    both), with bf16 rounding of fused intermediates emulated as eager does it."""
    from transformers.generation.configuration_utils import CompileConfig

    return CompileConfig(mode=None, options={"triton.cudagraphs": True, "emulate_precision_casts": True})


def _batch_size(args: tuple, kwargs: dict) -> int:
    for value in (*args[:1], kwargs.get("input_ids"), kwargs.get("inputs_embeds"), kwargs.get("attention_mask")):
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return int(value.shape[0])
    return 1


def _fast_generate(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """`generate` with a static KV cache (and, on CUDA, a compiled decode step); same inputs and outputs."""
    base = _unwrap(self)
    state: FastInferenceState = getattr(base, _STATE_ATTR)
    state.calls += 1
    batch = _batch_size(args, kwargs)
    if state.max_batch_size is not None and batch > state.max_batch_size:
        raise ValueError(
            f"fast_generate got a batch of {batch}, but its static KV cache ({state.max_seq_length} tokens per "
            f"sequence, gpu_memory_utilization={state.gpu_memory_utilization}) fits at most {state.max_batch_size}: "
            "split the batch, or call enable_fast_inference again with a larger gpu_memory_utilization / "
            "max_batch_size or a smaller max_seq_length."
        )
    user_chose_cache = any(k in kwargs for k in ("cache", "past_key_values", "cache_implementation"))
    if user_chose_cache or kwargs.get("use_cache") is False or not state.static_cache:
        return self.generate(*args, **kwargs)
    static_kwargs = dict(kwargs, cache_implementation="static")
    if _supports_max_cache_len():
        static_kwargs.setdefault("max_cache_len", state.max_seq_length)
    if state.compile:
        static_kwargs.setdefault("compile_config", _compile_config())
    else:
        static_kwargs.setdefault("disable_compile", True)
    try:
        out = self.generate(*args, **static_kwargs)
    except Exception as err:  # noqa: BLE001 - a model that refuses a static cache falls back, recorded
        if state.static_worked:
            raise  # the static cache worked before: this is an error of this call, not a static-cache limitation
        state.static_cache = False
        state.fallback_reason = f"{type(err).__name__}: {err}"[:500]
        logger.warning(
            "fast_generate: %s cannot generate with a static KV cache (%s); using the dynamic cache",
            type(base).__name__,
            state.fallback_reason,
        )
        return self.generate(*args, **kwargs)
    state.static_worked = True
    return out


def enable_fast_inference(
    model: nn.Module,
    *,
    max_seq_length: int | None = None,
    gpu_memory_utilization: float | None = None,
    max_batch_size: int | None = None,
    compile: bool | None = None,
    decode_kernel: bool | None = None,
    decode_weights: str | None = None,
) -> nn.Module:
    """Attach ``model.fast_generate(...)`` (same inputs as ``generate``) to this instance; returns the model.

    Arguments left out reuse the previous call's (kept across `disable_fast_inference`), else
    ``max_seq_length`` = the one given at load and ``gpu_memory_utilization`` = 0.5.  ``max_seq_length`` sizes the static KV cache; on CUDA the largest batch
    is the one whose cache fits in ``gpu_memory_utilization`` of free memory, or ``max_batch_size`` if smaller.
    ``compile`` (default: on for CUDA models) compiles the decode step; ``compile=False`` keeps eager kernels.
    ``decode_weights`` (default ``"auto"``): ``"16bit"`` keeps a dequantized 16-bit copy of the language model's
    4-bit linears for generation (the same numbers bitsandbytes computes for several rows, without dequantizing
    every step); ``"auto"`` does so on CUDA when the copy plus one sequence's KV cache fits in
    ``gpu_memory_utilization`` of free memory (the KV cache gets the rest); ``"4bit"`` never does.
    ``decode_kernel`` (default off; opt-in, slower than bitsandbytes on an H200 so far) runs the remaining 4-bit
    linears through the few-row nf4 Triton kernel on decode steps.
    Call again after wrapping the model in PEFT to generate through the PeftModel (the base keeps working too:
    LoRA layers live in its modules).  Idempotent.
    """
    base = _unwrap(model)
    previous = getattr(base, _STATE_ATTR, None) or getattr(base, "_hf_fastvision_fast_inference_settings", None)
    if max_seq_length is None:
        max_seq_length = previous.max_seq_length if previous is not None else getattr(base, "max_seq_length", None)
    if gpu_memory_utilization is None:
        gpu_memory_utilization = previous.gpu_memory_utilization if previous is not None else 0.5
    if max_seq_length is None or int(max_seq_length) <= 0:
        raise ValueError(f"max_seq_length must be a positive int, got {max_seq_length}")
    if not 0.0 < float(gpu_memory_utilization) <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    if max_batch_size is not None and int(max_batch_size) <= 0:
        raise ValueError(f"max_batch_size must be positive, got {max_batch_size}")
    want_compile = bool(compile) if compile is not None else getattr(previous, "compile_requested", True)
    want_kernel = bool(decode_kernel) if decode_kernel is not None else getattr(previous, "decode_kernel_requested", False)
    want_weights = decode_weights if decode_weights is not None else getattr(previous, "decode_weights_requested", "auto")
    if want_weights not in _DECODE_WEIGHTS:
        raise ValueError(f"decode_weights must be one of {_DECODE_WEIGHTS}, got {want_weights!r}")
    from hf_fastvision.inference.decode_kernels import bind_decode_kernels, unbind_decode_kernels

    # both bind instance forwards on the same layers: the kernel comes off first and goes back on last, onto the
    # layers without a 16-bit copy
    unbind_decode_kernels(base)
    dense_layers, dense_bytes = _bind_decode_weights(base, want_weights, int(max_seq_length),
                                                     float(gpu_memory_utilization))
    limit = max_batch_for_memory(base, int(max_seq_length), float(gpu_memory_utilization), already_used=dense_bytes)
    if max_batch_size is not None:
        limit = int(max_batch_size) if limit is None else min(limit, int(max_batch_size))
    state = FastInferenceState(
        max_seq_length=int(max_seq_length),
        gpu_memory_utilization=float(gpu_memory_utilization),
        max_batch_size=limit,
        compile_requested=want_compile,
        compile=base.device.type == "cuda" and want_compile,
        decode_kernel_requested=want_kernel,
        decode_kernel=base.device.type == "cuda" and want_kernel,
        decode_weights_requested=want_weights,
        decode_weights="16bit" if dense_layers else ("4bit" if _has_4bit(base) else "none"),
        dense_layers=dense_layers,
        dense_bytes=dense_bytes,
    )
    old = getattr(base, _STATE_ATTR, None)
    if old is not None and not old.static_cache:  # a known limitation stays known
        state.static_cache, state.fallback_reason = False, old.fallback_reason
    elif old is not None:
        state.static_worked = old.static_worked
    setattr(base, _STATE_ATTR, state)
    base._valid_auto_compile_criteria = types.MethodType(_compile_criteria, base)
    for target in {id(model): model, id(base): base}.values():
        target.fast_generate = types.MethodType(_fast_generate, target)
    if state.decode_kernel:
        bind_decode_kernels(base)
    return model


def disable_fast_inference(model: nn.Module) -> nn.Module:
    """Remove ``fast_generate`` and the compile override (back to plain ``generate``); settings are kept so that
    ``enable_fast_inference(model)`` with no arguments restores them.  Safe on models that never had it."""
    base = _unwrap(model)
    state = getattr(base, _STATE_ATTR, None)
    if state is not None:
        base._hf_fastvision_fast_inference_settings = state
        delattr(base, _STATE_ATTR)
    for target in (model, base):
        target.__dict__.pop("fast_generate", None)
    base.__dict__.pop("_valid_auto_compile_criteria", None)
    from hf_fastvision.inference.decode_kernels import unbind_decode_kernels
    from hf_fastvision.inference.dense_decode import unbind_dense_decode

    unbind_decode_kernels(base)
    if unbind_dense_decode(base) and base.device.type == "cuda":
        torch.cuda.empty_cache()  # the decode copy's memory goes back to training
    return model
