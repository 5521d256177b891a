"""The load pipeline: resolve → config → spec → quantization plan → patched class → instance patches.

Each step is one function; data flows one way. `load_model` is what both front ends call.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hf_fastvision import allocator
from hf_fastvision.checkpoint_check import (
    check_index,
    check_tensors,
    check_weights_present,
    init_missing_prefixes,
    read_header,
    weight_files,
)
from hf_fastvision.errors import ConflictingOptionsError, CorruptCheckpointError, ModelNotFoundError, NotAVisionModelError
from hf_fastvision.errors import InvalidArgumentError
from hf_fastvision.errors import CheckpointConfigError, HubUnreachableError
from hf_fastvision.quantization import QuantPlan, build_plan, meta_model, require_bitsandbytes
from hf_fastvision.registry import ArchSpec, get_arch
from hf_fastvision.resolve import Resolution, is_offline, resolve

__all__ = [
    "LoadOptions", "LoadInfo", "load_model", "load_config", "get_load_info", "default_dtype", "plan_for",
    "check_device_map", "available_devices", "COMPUTE_DTYPES", "STORAGE_DTYPES",
    "diagnose_config", "verify_safetensors", "check_checkpoint",
]

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
    init_missing: tuple[str, ...] | bool = ()
    """Module-name prefixes (e.g. ("lm_head",)) whose tensors may be missing from the checkpoint and are then
    freshly initialised; True allows any. Otherwise a checkpoint lacking a tensor the model needs is refused."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Pass-through kwargs for transformers (token, revision, cache_dir, local_files_only, ...)."""

    @property
    def default_4bit(self) -> bool:
        return self.quant_type == "nf4" and self.double_quant and _dtype(self.quant_storage, STORAGE_DTYPES) == torch.uint8


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


COMPUTE_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)
"""Compute / 16-bit weight dtypes a model may be loaded in (16- and 32-bit floating types)."""
STORAGE_DTYPES: tuple[torch.dtype, ...] = (torch.uint8, torch.bfloat16, torch.float16, torch.float32)
"""Storage dtypes of packed 4-bit weights: uint8 (the default), or the compute dtype for FSDP."""


def _names(dtypes: tuple[torch.dtype, ...]) -> list[str]:
    return [str(d).removeprefix("torch.") for d in dtypes]


def _dtype(value: torch.dtype | str | None, allowed: tuple[torch.dtype, ...] = COMPUTE_DTYPES) -> torch.dtype | None:
    """`value` (a torch dtype, its name, "auto" or None) as a torch dtype from `allowed`; None for the default.

    Anything else (integer or float8 types, float64, a misspelt name) is an `InvalidArgumentError` listing the
    valid names. `allowed` is `COMPUTE_DTYPES` for `dtype=`, `STORAGE_DTYPES` for `quant_storage=`.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    resolved: Any = value
    if isinstance(value, str):
        resolved = getattr(torch, value.strip().removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or resolved not in allowed:
        if allowed == STORAGE_DTYPES:
            raise InvalidArgumentError.storage_dtype(value, _names(allowed))
        raise InvalidArgumentError.compute_dtype(value, _names(allowed))
    return resolved


def default_dtype(dtype: torch.dtype | str | None = None) -> torch.dtype:
    """The dtype asked for, else bf16 where the GPU supports it, fp16 on other GPUs, fp32 on CPU."""
    chosen = _dtype(dtype)
    if chosen is not None:
        return chosen
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def available_devices() -> list[str]:
    """The devices this process can place weights on: "cpu", then each CUDA (or MPS / XPU) device."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        devices += [f"xpu:{i}" for i in range(xpu.device_count())]
    return devices


def _is_device(value: Any, available: list[str], *, in_dict: bool) -> bool:
    """Whether `value` names a device of this machine ("disk" too, inside a dict)."""
    if isinstance(value, torch.device):
        value = str(value)
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return 0 <= value < sum(d.startswith(("cuda:", "xpu:")) for d in available)
    if not isinstance(value, str):
        return False
    name = value.strip().lower()
    if name == "cpu" or (in_dict and name == "disk"):
        return True
    kind, _, index = name.partition(":")
    if kind == "mps":
        return not index and "mps" in available
    return kind in ("cuda", "xpu") and (not index or index.isdigit()) and f"{kind}:{int(index or 0)}" in available


def check_device_map(device_map: Any) -> None:
    """Refuse a device map naming devices this machine lacks, before anything is loaded.

    Accepted: None, a strategy ("auto", "sequential", "balanced", "balanced_low_0"), a device ("cpu", "cuda",
    "cuda:N", a GPU index, a `torch.device`), or a dict of module names to devices / "cpu" / "disk" / GPU indices.
    """
    if device_map is None or (isinstance(device_map, str) and device_map in InvalidArgumentError.STRATEGIES):
        return
    available = available_devices()
    if isinstance(device_map, dict):
        for key, value in device_map.items():
            if not isinstance(key, str):
                raise InvalidArgumentError.device_map(device_map, key, available, key=key)
            if not _is_device(value, available, in_dict=True):
                shown = str(value) if isinstance(value, torch.device) else value
                raise InvalidArgumentError.device_map(device_map, shown, available, key=key)
        return
    if not _is_device(device_map, available, in_dict=False):
        shown = str(device_map) if isinstance(device_map, torch.device) else device_map
        raise InvalidArgumentError.device_map(device_map, shown, available)


def default_device_map(device_map: Any) -> Any:
    """Under torchrun/accelerate each rank loads on its own GPU; without CUDA everything is on the CPU.

    The map is checked first (`check_device_map`): one naming a device this machine lacks is refused."""
    check_device_map(device_map)
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


_NETWORK_ERRORS = frozenset(
    {
        "ConnectError", "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout", "TimeoutException",
        "NetworkError", "ProxyError", "SSLError", "ConnectionError", "Timeout", "OfflineModeIsEnabled",
        "UnsupportedProtocol",
    }
)


def _network_failure(exc: BaseException) -> BaseException | None:
    """The connection error or timeout somewhere in `exc`'s cause chain (httpx, requests or the socket layer)."""
    import socket

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ConnectionError, TimeoutError, socket.gaierror)) or any(
            c.__name__ in _NETWORK_ERRORS for c in type(current).__mro__
        ):
            return current
        current = current.__cause__ or current.__context__
    return None


def _remote_code_files(auto_map: dict[str, Any]) -> list[str]:
    """The module files an `auto_map` names in the checkpoint's own folder (not code of another repo)."""
    refs: list[str] = []
    for value in auto_map.values():
        refs.extend(v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, str))
    return sorted({ref.rsplit(".", 1)[0].replace(".", "/") + ".py" for ref in refs if "--" not in ref and "." in ref})


def diagnose_config(path: Path, name: str, *, trust_remote_code: bool, local: bool) -> dict[str, Any]:
    """Read config.json ourselves so a broken one is named precisely: invalid JSON (line, column), no or unknown
    `model_type`, remote code not trusted or (in a local folder) its module files absent. Returns the parsed dict."""
    import difflib

    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointConfigError.invalid_json(str(path), exc.lineno, exc.colno, exc.msg) from exc
    except UnicodeDecodeError as exc:
        raise CheckpointConfigError.invalid_json(str(path), 1, exc.start + 1, f"not UTF-8 text ({exc.reason})") from exc
    if not isinstance(data, dict):
        raise CheckpointConfigError.not_an_object(str(path), type(data).__name__)
    model_type, auto_map = data.get("model_type"), data.get("auto_map")
    known = isinstance(model_type, str) and model_type in CONFIG_MAPPING
    if isinstance(auto_map, dict) and auto_map:
        if not trust_remote_code and not known:
            raise CheckpointConfigError.remote_code_needed(name, [f"{k}: {v}" for k, v in sorted(auto_map.items())])
        if trust_remote_code and local:
            missing = [f for f in _remote_code_files(auto_map) if not (path.parent / f).is_file()]
            if missing:
                raise CheckpointConfigError.remote_code_missing(name, str(path.parent), missing)
        return data
    if not model_type:
        raise CheckpointConfigError.no_model_type(str(path))
    if not known:
        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3, cutoff=0.6)
        raise CheckpointConfigError.unknown_model_type(name, str(model_type), close, transformers.__version__)
    return data


def _cached_config(resolution: Resolution, extra: dict[str, Any]) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(
            resolution.name, "config.json", cache_dir=extra.get("cache_dir"), revision=resolution.revision
        )
    except Exception:
        return None
    return Path(found) if isinstance(found, str) else None


def _config_failure(resolution: Resolution, extra: dict[str, Any], exc: BaseException) -> Exception:
    """The error naming the fix for an AutoConfig failure (`exc`)."""
    import difflib

    import transformers

    trust = bool(extra.get("trust_remote_code"))
    if not resolution.local and not resolution.offline and (net := _network_failure(exc)) is not None:
        from huggingface_hub import constants

        return HubUnreachableError(resolution.requested, str(constants.ENDPOINT), f"{type(net).__name__}: {net}")
    if not resolution.local and (cached := _cached_config(resolution, extra)) is not None:
        try:  # downloaded before AutoConfig failed on it
            diagnose_config(cached, resolution.requested, trust_remote_code=trust, local=False)
        except CheckpointConfigError as diagnosed:
            return diagnosed
    text = str(exc)
    if isinstance(exc, ValueError) and (m := re.search(r"model type `([^`]+)`", text)):
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        close = difflib.get_close_matches(m.group(1), list(CONFIG_MAPPING.keys()), n=3, cutoff=0.6)
        return CheckpointConfigError.unknown_model_type(resolution.requested, m.group(1), close, transformers.__version__)
    if isinstance(exc, ValueError) and "trust_remote_code" in text:
        return CheckpointConfigError.remote_code_needed(resolution.requested, ["the repo's own code"])
    if resolution.local:
        first = text.strip().splitlines()[0] if text.strip() else ""
        return CheckpointConfigError.rejected(
            str(Path(resolution.name) / "config.json"), transformers.__version__, f"{type(exc).__name__}: {first}"
        )
    return ModelNotFoundError.unknown_id(
        resolution.requested,
        offline=resolution.offline,
        detail=type(exc).__name__,
        local_files_only=bool(extra.get("local_files_only")),
    )


def load_config(resolution: Resolution, extra: dict[str, Any]) -> Any:
    """AutoConfig for the resolved checkpoint; a failure becomes the error that names its fix (`errors`)."""
    from transformers import AutoConfig

    kwargs = {k: extra[k] for k in ("token", "revision", "cache_dir", "local_files_only", "trust_remote_code") if k in extra}
    trust = bool(extra.get("trust_remote_code"))
    if resolution.local:
        diagnose_config(Path(resolution.name) / "config.json", resolution.requested, trust_remote_code=trust, local=True)
    elif (resolution.offline or extra.get("local_files_only")) and (cached := _cached_config(resolution, extra)):
        diagnose_config(cached, resolution.requested, trust_remote_code=trust, local=False)
    try:
        return AutoConfig.from_pretrained(resolution.name, **kwargs)
    except (OSError, ValueError, *_hub_error_types()) as exc:
        raise _config_failure(resolution, extra, exc) from exc


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


def verify_safetensors(folder: Path, require_shards: bool = True) -> dict[Path, dict[str, Any]]:
    """Check the shard index (valid JSON; with `require_shards`, every shard it names is present) and every
    *.safetensors header and length: a truncated or partial download fails here, before any loading. Returns the
    headers read, by file."""
    check_index(folder, require_shards=require_shards)
    return {path: read_header(path) for path in sorted(folder.glob("*.safetensors"))}


def check_checkpoint(folder: Path, resolution: Resolution, options: LoadOptions, meta: Any) -> None:
    """Everything that can be checked before a weight is read: weights present (local folder), shard index and
    headers intact, and every tensor's shape against the meta-device model; missing tensors are refused unless
    `options.init_missing` names them (`checkpoint_check`)."""
    extra = options.extra
    complete = resolution.local or resolution.offline or bool(extra.get("local_files_only"))
    if any(extra.get(k) for k in ("subfolder", "gguf_file", "variant")):
        verify_safetensors(folder, require_shards=False)  # weights elsewhere or named otherwise: headers only
        return
    if resolution.local:
        check_weights_present(folder)
    headers = verify_safetensors(folder, require_shards=complete)
    files = weight_files(folder)
    if files is None:
        return  # not all on disk yet (downloaded by transformers) or not safetensors
    check_tensors(
        meta,
        folder,
        {f: headers[f] if f in headers else read_header(f) for f in files},
        init_missing=init_missing_prefixes(options.init_missing),
        check_shapes=not extra.get("ignore_mismatched_sizes"),
        key_mapping=extra.get("key_mapping"),
    )


def _prequantized(config: Any) -> bool:
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return False
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method)) == "bitsandbytes"


def _validate(options: LoadOptions) -> None:
    """Every option that can be checked without the config, before any file is read."""
    if options.bits not in (4, 8, 16):
        raise ValueError(f"bits must be 4, 8 or 16, got {options.bits!r}")
    _dtype(options.dtype)
    _dtype(options.quant_storage, STORAGE_DTYPES)
    check_device_map(options.device_map)
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
        quant_storage=_dtype(options.quant_storage, STORAGE_DTYPES) or torch.uint8,
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
        check_checkpoint(folder, resolution, options, meta)

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
