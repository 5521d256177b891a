"""The load pipeline: resolve → config → spec → quantization plan → patched class → instance patches.

Each step is one function; data flows one way. `load_model` is what both front ends call.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hf_fastvision import allocator
from hf_fastvision.errors import ConflictingOptionsError, CorruptCheckpointError, ModelNotFoundError, NotAVisionModelError
from hf_fastvision.quantization import QuantPlan, build_plan, meta_model, require_bitsandbytes
from hf_fastvision.registry import ArchSpec, get_arch
from hf_fastvision.resolve import Resolution, is_offline, resolve

__all__ = ["LoadOptions", "LoadInfo", "load_model", "load_config", "get_load_info", "default_dtype", "plan_for"]

_PASS_THROUGH = ("token", "revision", "cache_dir", "local_files_only", "trust_remote_code", "attn_implementation")


@dataclass
class LoadOptions:
    """Everything that decides how a checkpoint is loaded (front ends build this from their kwargs)."""

    bits: int = 4
    """4 (nf4/fp4 through bitsandbytes), 8 (LLM.int8) or 16 (no quantization)."""
    dtype: torch.dtype | str | None = None
    """Compute and 16-bit weight dtype; None: bf16 on GPUs that support it, else fp16; fp32 on CPU."""
    device_map: Any = "sequential"
    """accelerate device map; 'sequential' on a CPU-only machine loads on the CPU."""
    quant_type: str = "nf4"
    double_quant: bool = True
    quant_storage: torch.dtype | str = torch.uint8
    """4-bit storage dtype; set it to the compute dtype for FSDP (disables the pre-quantized twin)."""
    keep_vision_16bit: bool = False
    """Keep the vision tower in 16-bit (it is quantized by default, as Unsloth and bitsandbytes do)."""
    keep_modules: tuple[str, ...] = ()
    """Regexes of further module paths to keep in 16-bit."""
    quantization_config: Any = None
    """A user's own quantization config; it wins over the plan and disables the pre-quantized twin."""
    use_exact_model_name: bool = False
    """Load exactly the given id: no pre-quantized twin, no 16-bit source."""
    full_finetuning: bool = False
    use_gradient_checkpointing: Any = "unsloth"
    patches: Any = True
    """Fused-kernel patches: True (all the spec supports), False, or a dict of `PatchOptions` flags."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Pass-through kwargs for transformers (token, revision, cache_dir, local_files_only, ...)."""

    @property
    def default_4bit(self) -> bool:
        return self.quant_type == "nf4" and self.double_quant and _dtype(self.quant_storage) == torch.uint8


@dataclass(frozen=True)
class LoadInfo:
    """Recorded on every loaded model as `model.hf_fastvision`: what was loaded and why."""

    resolution: Resolution
    arch: str
    plan: QuantPlan
    prequantized: bool
    dtype: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "resolution": self.resolution.as_dict(),
            "arch": self.arch,
            "prequantized": self.prequantized,
            "dtype": self.dtype,
            "plan": self.plan.summary(),
        }


def _dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value == "auto":
        return None
    resolved = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype must be a torch dtype or one of 'bfloat16', 'float16', 'float32'; got {value!r}")
    return resolved


def default_dtype(dtype: torch.dtype | str | None = None) -> torch.dtype:
    """The dtype asked for, else bf16 where the GPU supports it, fp16 on other GPUs, fp32 on CPU."""
    chosen = _dtype(dtype)
    if chosen is not None:
        return chosen
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def default_device_map(device_map: Any) -> Any:
    """Under torchrun/accelerate each rank loads on its own GPU; without CUDA everything is on the CPU."""
    if device_map not in ("sequential", None):
        return device_map
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", "0"))}
    if not torch.cuda.is_available():
        return "cpu"
    return device_map or "sequential"


def _hub_error_types() -> tuple[type[BaseException], ...]:
    from huggingface_hub import errors as hub_errors

    names = ("RepositoryNotFoundError", "RevisionNotFoundError", "EntryNotFoundError", "LocalEntryNotFoundError")
    return tuple(getattr(hub_errors, n) for n in names if hasattr(hub_errors, n))


def load_config(resolution: Resolution, extra: dict[str, Any]) -> Any:
    """AutoConfig for the resolved checkpoint, with hub failures turned into `ModelNotFoundError`."""
    from transformers import AutoConfig

    kwargs = {k: extra[k] for k in ("token", "revision", "cache_dir", "local_files_only", "trust_remote_code") if k in extra}
    try:
        return AutoConfig.from_pretrained(resolution.name, **kwargs)
    except (OSError, ValueError, *_hub_error_types()) as exc:
        if isinstance(exc, ValueError) and "model_type" in str(exc):
            raise ModelNotFoundError(
                f"{resolution.requested!r} has a config.json transformers does not recognise ({exc}). Upgrade "
                "transformers, or pass trust_remote_code=True for a repo with its own modeling code."
            ) from exc
        raise ModelNotFoundError.unknown_id(resolution.requested, offline=resolution.offline, detail=type(exc).__name__) from exc


def _suggest_auto_class(config: Any) -> str:
    from transformers.models.auto import modeling_auto as ma

    for mapping, name in (
        (ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "AutoModelForCausalLM"),
        (ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES, "AutoModelForSeq2SeqLM"),
        (ma.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES, "AutoModelForImageClassification"),
    ):
        if config.model_type in mapping:
            return name
    return "AutoModel"


def arch_for(config: Any, name: str) -> ArchSpec:
    """The spec for a loaded config, or a `NotAVisionModelError` naming the right transformers class."""
    try:
        return get_arch(config)
    except KeyError:
        raise NotAVisionModelError(name, config.model_type, _suggest_auto_class(config)) from None


def checkpoint_dir(resolution: Resolution, extra: dict[str, Any]) -> Path | None:
    """The folder holding the weights, when they are on disk already (local folder or HF cache)."""
    if resolution.local:
        return Path(resolution.name)
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(
        resolution.name, "config.json", cache_dir=extra.get("cache_dir"), revision=resolution.revision
    )
    return Path(found).parent if isinstance(found, str) else None


def verify_safetensors(folder: Path) -> None:
    """Check every *.safetensors header and length; a truncated download fails here, before any loading."""
    for path in sorted(folder.glob("*.safetensors")):
        size = path.stat().st_size
        try:
            with open(path, "rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    raise CorruptCheckpointError(str(path), f"{size} bytes, shorter than a safetensors header")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8:
                    raise CorruptCheckpointError(str(path), f"header claims {n} bytes, file has {size - 8}")
                header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptCheckpointError(str(path), f"unreadable header: {exc}") from exc
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise CorruptCheckpointError(str(path), f"{size} bytes on disk, {8 + n + end} expected")


def _prequantized(config: Any) -> bool:
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return False
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method)) == "bitsandbytes"


def _validate(options: LoadOptions) -> None:
    if options.bits not in (4, 8, 16):
        raise ValueError(f"bits must be 4, 8 or 16, got {options.bits!r}")
    if options.quantization_config is not None and options.bits == 16:
        raise ConflictingOptionsError(
            ["quantization_config", "load_in_16bit"], "a quantization_config asks for quantized weights; drop one."
        )
    if options.full_finetuning and options.bits != 16:
        raise ConflictingOptionsError(
            ["full_finetuning", f"load_in_{options.bits}bit"],
            "full fine-tuning trains every weight, which quantized weights cannot; use load_in_16bit=True or LoRA.",
        )


def plan_for(
    config: Any, spec: ArchSpec, model_class: type, options: LoadOptions, dtype: torch.dtype, meta: Any = None
) -> QuantPlan:
    """The quantization plan for `config` under `options`, computed on a meta-device instance (made if not given)."""
    meta = meta if meta is not None else meta_model(config, model_class)
    return build_plan(
        meta,
        spec,
        bits=options.bits,  # type: ignore[arg-type]
        compute_dtype=dtype,
        quant_type=options.quant_type,
        double_quant=options.double_quant,
        quant_storage=_dtype(options.quant_storage) or torch.uint8,
        keep_vision_16bit=options.keep_vision_16bit,
        keep=options.keep_modules,
    )


def resolve_for(name: str, options: LoadOptions) -> Resolution:
    blockers = []
    if options.quantization_config is not None:
        blockers.append("a user quantization_config was given")
    if not options.default_4bit:
        blockers.append("non-default 4-bit settings were asked for")
    if options.keep_vision_16bit or options.keep_modules:
        blockers.append("modules were asked to stay 16-bit")
    return resolve(
        name,
        want_4bit=options.bits == 4,
        want_16bit=options.bits == 16,
        allow_twin=not blockers,
        twin_block_reason="; ".join(blockers),
        use_exact_model_name=options.use_exact_model_name,
        revision=options.extra.get("revision"),
        cache_dir=options.extra.get("cache_dir"),
    )


def load_model(name: str | os.PathLike[str], options: LoadOptions, mapping: Any) -> Any:
    """Run the whole pipeline; `mapping` maps config classes to patched model classes."""
    _validate(options)
    if options.bits in (4, 8) or options.quantization_config is not None:
        require_bitsandbytes(f"{options.bits}-bit loading")
    resolution = resolve_for(os.fspath(name), options)
    try:
        config = load_config(resolution, options.extra)
    except ModelNotFoundError:
        if resolution.name == resolution.requested or is_offline():
            raise
        # The twin could not be reached: fall back to what the user asked for.
        resolution = Resolution(
            resolution.requested, resolution.requested, resolution.revision, False,
            f"twin {resolution.name} unavailable; loading the requested id", resolution.offline,
        )
        config = load_config(resolution, options.extra)
    spec = arch_for(config, resolution.requested)
    prequantized = _prequantized(config)
    if prequantized and options.bits == 16:
        raise ConflictingOptionsError(
            ["load_in_16bit", f"a pre-quantized checkpoint ({resolution.name})"],
            "4-bit weights cannot be loaded in 16-bit; pass the 16-bit source id instead.",
        )
    if prequantized and options.quantization_config is not None:
        raise ConflictingOptionsError(
            ["quantization_config", f"a pre-quantized checkpoint ({resolution.name})"],
            "a pre-quantized checkpoint cannot be re-quantized; drop quantization_config or load the 16-bit source.",
        )
    if prequantized and options.bits == 8:
        raise ConflictingOptionsError(
            ["load_in_8bit", f"a 4-bit pre-quantized checkpoint ({resolution.name})"],
            "load the 16-bit source to quantize it to 8-bit.",
        )
    dtype = default_dtype(options.dtype)
    model_class = mapping[type(config)]
    plan_options = options
    if prequantized:
        qc = config.quantization_config
        qc = qc if isinstance(qc, dict) else qc.to_dict()
        plan_options = LoadOptions(
            bits=4,
            quant_type=qc.get("bnb_4bit_quant_type", "nf4"),
            double_quant=bool(qc.get("bnb_4bit_use_double_quant", False)),
        )
    meta = meta_model(config, model_class)
    plan = plan_for(config, spec, model_class, plan_options, dtype, meta=meta)
    _start_precompile(meta, spec, options, dtype)
    if prequantized:
        skips = (config.quantization_config if isinstance(config.quantization_config, dict) else {}).get(
            "llm_int8_skip_modules"
        )
        plan.skip_modules = list(skips or [])

    folder = checkpoint_dir(resolution, options.extra)
    if folder is not None:
        verify_safetensors(folder)

    kwargs: dict[str, Any] = {k: options.extra[k] for k in _PASS_THROUGH if k in options.extra}
    kwargs.pop("revision", None)
    if resolution.revision is not None:
        kwargs["revision"] = resolution.revision
    kwargs.update(config=config, dtype=dtype, device_map=default_device_map(options.device_map))
    if options.quantization_config is not None:
        kwargs["quantization_config"] = options.quantization_config
    elif not prequantized and options.bits != 16:
        kwargs["quantization_config"] = plan.to_bnb_config()
    kwargs.update({k: v for k, v in options.extra.items() if k not in _PASS_THROUGH})
    _no_hub_kernels(kwargs, options.patches)
    try:
        model = model_class.from_pretrained(resolution.name, **kwargs)
    except Exception as exc:  # safetensors' own error type differs between versions
        if "safetensor" in type(exc).__name__.lower() or "incomplete metadata" in str(exc).lower():
            raise CorruptCheckpointError(resolution.name, str(exc)) from exc
        raise
    model.hf_fastvision = LoadInfo(resolution, spec.name, plan, prequantized, str(dtype).removeprefix("torch."))
    from hf_fastvision.quantization import keep_canonical_packing

    keep_canonical_packing(model)  # bitsandbytes' CPU repacking is lossy (quantization.keep_canonical_packing)
    from hf_fastvision.hub import attach_push_to_hub
    from hf_fastvision.patching import apply_patches

    apply_patches(model, spec, options.patches)

    attach_push_to_hub(model)  # model.push_to_hub publishes a verified bnb-4bit repo
    model._hf_fastvision_checkpointing = options.use_gradient_checkpointing
    if options.full_finetuning:
        for p in model.parameters():
            p.requires_grad_(True)
        allocator.enable_for_training()  # ready to train as loaded: expandable segments from here (`allocator`)
    return model


def _no_hub_kernels(kwargs: dict[str, Any], patches: Any) -> None:
    """``use_kernels=False`` for transformers unless the patches are off.

    From transformers 5.25 ``use_kernels`` defaults to True where the `kernels` package is installed, and every
    ``train()`` / ``eval()`` then re-kernelizes the ``use_kernel_forward_from_hub`` layers (RMSNorm, ...): each
    one's instance forward is replaced or removed, which would silently unbind our patches at the first mode
    switch. Hub kernels and our patches cover the same layers, so asking for both is refused.
    """
    from hf_fastvision.patching import PatchOptions

    if not any(v is True for v in vars(PatchOptions.from_value(patches)).values()):
        return  # patches off: transformers' own default applies
    if kwargs.get("use_kernels"):
        raise ValueError(
            "use_kernels=True hands RMSNorm and other layers to the Hub's kernels, which replace hf_fastvision's "
            "patched forwards at every train()/eval(). Drop use_kernels to keep our kernels, or pass patches=False "
            "to use the Hub's."
        )
    kwargs["use_kernels"] = False


def _start_precompile(meta: Any, spec: ArchSpec, options: LoadOptions, dtype: torch.dtype) -> None:
    """``patches={"precompile": "process"}``: a helper process compiles the kernels the patches will bind while
    the weights load (`training/precompile.py`); the meta model is not used after planning."""
    from hf_fastvision.patching import PatchOptions

    patches = PatchOptions.from_value(options.patches)
    if patches.precompile != "process" or not torch.cuda.is_available():
        return
    device_map = default_device_map(options.device_map)
    index = device_map.get("") if isinstance(device_map, dict) else None
    from hf_fastvision.training.precompile import start_process

    start_process(meta, spec, patches, torch.device("cuda", index if isinstance(index, int) else 0), dtype)


def get_load_info(model: Any) -> LoadInfo | None:
    """What `from_pretrained` resolved, planned and loaded for `model` (looks through peft wrappers)."""
    stack, seen = [model], set()
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        info = getattr(current, "__dict__", {}).get("hf_fastvision")
        if isinstance(info, LoadInfo):
            return info
        for attr in ("base_model", "model"):
            child = getattr(current, "__dict__", {}).get("_modules", {}).get(attr) or getattr(current, "__dict__", {}).get(attr)
            if isinstance(child, torch.nn.Module):
                stack.append(child)
    return None
