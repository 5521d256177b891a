"""Architecture registry: one `ArchSpec` per model family, looked up by `model_type`.

Architecture knowledge is data. A spec names where the language model, the vision tower and the vision-to-text
projector live, which linear layers count as attention or MLP, and how the processor's image resolution is
bounded. Everything else (quantization plan, LoRA targets, patches) is computed from a spec and the model's
actual module tree, so a new family needs one small file in `archs/` and nothing else.

Paths are dotted module paths from the top model (`model.language_model`). A path written as a bare name
(no dot) is a *discovery pattern*: it matches every module whose last path component has that name. The
generic spec uses discovery patterns only; named specs use full paths, which `resolve_roots` checks exist.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

__all__ = ["ArchSpec", "Roots", "register_arch", "get_arch", "get_arch_for_model_type", "list_archs", "resolve_roots"]


def _no_image_budget(processor: Any, max_image_size: int) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class ArchSpec:
    """What hf_fastvision needs to know about one family of vision-language models."""

    name: str
    """Family name, unique in the registry (e.g. 'qwen2_5_vl')."""
    model_types: tuple[str, ...]
    """transformers `config.model_type` values this spec covers."""
    language_model: tuple[str, ...] = ("model.language_model",)
    """Module path(s) of the text decoder."""
    vision_tower: tuple[str, ...] = ("model.vision_tower",)
    """Module path(s) of the vision encoder."""
    projectors: tuple[str, ...] = ("model.multi_modal_projector",)
    """Vision-to-text projector / merger modules; always kept in 16-bit. May lie inside the vision tower."""
    attention_markers: tuple[str, ...] = ("attn", "attention")
    """A linear layer is an attention projection if a component of its path contains one of these."""
    mlp_markers: tuple[str, ...] = ("mlp", "feed_forward", "ffn")
    """A linear layer is an MLP projection if a component of its path contains one of these."""
    image_budget: Callable[[Any, int], dict[str, Any]] = _no_image_budget
    """Maps `max_image_size` (longest image side, pixels) to processor attribute updates; returns what it set."""
    pad_token_candidates: tuple[str, ...] = ()
    """Existing tokens to use as the dedicated pad token, tried in order before adding a new one."""
    checkpoint_layers: tuple[str, ...] = ()
    """Class names of repeated blocks to checkpoint besides transformers' GradientCheckpointingLayer ones."""
    unused_layer_kwargs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Per checkpointed layer class name: keyword arguments its caller passes and its forward never reads.
    Checkpointing passes None for them while training, so they are not held for the recompute, copied into CUDA
    graph buffers or part of a graph's key."""
    patches: dict[str, Any] = field(default_factory=dict)
    """Kernel patches this family supports (consumed by `patching.py`)."""
    generic: bool = False
    """True for the fallback spec discovered from transformers' image-text-to-text mapping."""
    notes: str = ""
    """Free text shown by `hf-fastvision info`."""

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"ArchSpec.name must be an identifier, got {self.name!r}")
        if not self.model_types:
            raise ValueError(f"ArchSpec {self.name!r} must cover at least one model_type")
        for attr in ("language_model", "vision_tower", "projectors"):
            value = getattr(self, attr)
            if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
                raise TypeError(f"ArchSpec.{attr} must be a tuple of non-empty strings, got {value!r}")


@dataclass(frozen=True)
class Roots:
    """A spec's paths resolved against one model instance."""

    language: tuple[str, ...]
    vision: tuple[str, ...]
    projectors: tuple[str, ...]
    lm_head: tuple[str, ...]


_REGISTRY: dict[str, ArchSpec] = {}
_BY_MODEL_TYPE: dict[str, ArchSpec] = {}


def register_arch(spec: ArchSpec, *, exist_ok: bool = False) -> ArchSpec:
    """Add `spec` to the registry. Refuses to silently replace a family or claim a model_type twice."""
    if not isinstance(spec, ArchSpec):
        raise TypeError(f"register_arch expects an ArchSpec, got {type(spec).__name__}")
    if spec.name in _REGISTRY and not exist_ok:
        raise ValueError(f"Architecture {spec.name!r} is already registered; pass exist_ok=True to replace it.")
    taken = {mt: _BY_MODEL_TYPE[mt].name for mt in spec.model_types if mt in _BY_MODEL_TYPE}
    taken = {mt: owner for mt, owner in taken.items() if owner != spec.name}
    if taken and not exist_ok:
        raise ValueError(f"model_type(s) {taken} already belong to other specs; pass exist_ok=True to override.")
    _REGISTRY[spec.name] = spec
    for mt in spec.model_types:
        _BY_MODEL_TYPE[mt] = spec
    return spec


def list_archs(*, include_generic: bool = True) -> list[ArchSpec]:
    """Registered specs, named families first."""
    _ensure_loaded()
    specs = sorted(_REGISTRY.values(), key=lambda s: (s.generic, s.name))
    return [s for s in specs if include_generic or not s.generic]


def get_arch_for_model_type(model_type: str) -> ArchSpec | None:
    _ensure_loaded()
    return _BY_MODEL_TYPE.get(model_type)


def get_arch(config: Any) -> ArchSpec:
    """The spec for a config (or a model's config); raises with the list of supported types if none."""
    _ensure_loaded()
    model_type = getattr(config, "model_type", None) or getattr(getattr(config, "config", None), "model_type", None)
    spec = _BY_MODEL_TYPE.get(model_type)
    if spec is None:
        known = ", ".join(sorted(_BY_MODEL_TYPE))
        raise KeyError(
            f"No architecture spec for model_type {model_type!r}. Supported: {known}. Register one with "
            "hf_fastvision.register_arch(ArchSpec(...))."
        )
    return spec


def _match(pattern: str, names: list[str]) -> list[str]:
    if "." in pattern:
        return [pattern] if pattern in names else []
    return [n for n in names if n.rsplit(".", 1)[-1] == pattern]


def _outermost(paths: list[str]) -> tuple[str, ...]:
    """Drop paths nested inside another path of the list; keep order."""
    out: list[str] = []
    for p in sorted(set(paths), key=lambda s: (s.count("."), s)):
        if not any(p == q or p.startswith(q + ".") for q in out):
            out.append(p)
    return tuple(out)


def resolve_roots(spec: ArchSpec, model: nn.Module) -> Roots:
    """Resolve a spec's module paths against `model` (a real or meta-device instance)."""
    names = [n for n, _ in model.named_modules() if n]

    def find(patterns: tuple[str, ...], what: str, required: bool) -> tuple[str, ...]:
        found: list[str] = []
        for pattern in patterns:
            found += _match(pattern, names)
        if required and not found:
            raise ValueError(
                f"Architecture spec {spec.name!r} expects {what} at {patterns}, but {type(model).__name__} has "
                "no such module. The installed transformers may have moved it: update the spec in hf_fastvision/archs/."
            )
        return _outermost(found)

    language = find(spec.language_model, "the language model", required=not spec.generic)
    vision = find(spec.vision_tower, "the vision tower", required=not spec.generic)
    projectors = find(spec.projectors, "the projector", required=False)
    # A projector found by discovery inside the language model is not a vision projector.
    projectors = tuple(p for p in projectors if not any(p.startswith(lang + ".") for lang in language))
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    lm_head = tuple(n for n, m in model.named_modules() if out_emb is not None and m is out_emb and n)
    return Roots(language=language, vision=vision, projectors=projectors, lm_head=lm_head)


def _ensure_loaded() -> None:
    if not _REGISTRY:
        import hf_fastvision.archs  # noqa: F401  (registers every family on import)
