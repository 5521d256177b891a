"""`AutoFastVisionModel`, a transformers Auto factory over patched classes.

The mapping is a `_LazyAutoMapping` built from transformers' own image-text-to-text names (a private copy, so
transformers' mapping object is never touched) whose model classes are replaced, lazily, by patched
subclasses. A patched class keeps the upstream class name and module, so `save_pretrained` writes an
`architectures` entry stock transformers loads, and checkpoint key conversions registered for the upstream
class still apply.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

from transformers import PreTrainedModel
from transformers.models.auto.auto_factory import _BaseAutoModelClass, _LazyAutoMapping
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from hf_fastvision.loading import load_model
from hf_fastvision.options import options_from_kwargs
from hf_fastvision.registry import get_arch_for_model_type

__all__ = ["AutoFastVisionModel", "patched_class", "is_patched_class", "FAST_VISION_MAPPING"]

_PATCHED: dict[type, type] = {}


def is_patched_class(cls: type) -> bool:
    return bool(cls.__dict__.get("_hf_fastvision_patched", False))


def patched_class(upstream: type) -> type:
    """The hf_fastvision subclass of `upstream` (created once, cached). Same name, same module."""
    if is_patched_class(upstream):
        return upstream
    if upstream not in _PATCHED:
        model_type = getattr(getattr(upstream, "config_class", None), "model_type", None)
        spec = get_arch_for_model_type(model_type) if model_type else None
        _PATCHED[upstream] = type(
            upstream.__name__,
            (upstream,),
            {
                "__module__": upstream.__module__,
                "__qualname__": upstream.__qualname__,
                "__doc__": upstream.__doc__,
                "_hf_fastvision_patched": True,
                "_hf_fastvision_arch": spec.name if spec else None,
            },
        )
    return _PATCHED[upstream]


class _FastVisionMapping(_LazyAutoMapping):
    """Config class → patched model class; user registrations are patched too and never silently dropped."""

    def _load_attr_from_module(self, model_type: str, attr: str) -> Any:
        obj = super()._load_attr_from_module(model_type, attr)
        if isinstance(obj, type) and issubclass(obj, PreTrainedModel):
            return patched_class(obj)
        return obj

    def register(self, key: Any, value: Any, exist_ok: bool = False) -> None:
        if key in self and not exist_ok:
            raise ValueError(f"{getattr(key, '__name__', key)} is already mapped to {self[key].__name__}; pass exist_ok=True.")
        self._extra_content[key] = patched_class(value)


FAST_VISION_MAPPING = _FastVisionMapping(CONFIG_MAPPING_NAMES, OrderedDict(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES))


class AutoFastVisionModel(_BaseAutoModelClass):
    """Any vision-language checkpoint → a patched model, 4-bit by default.

    `from_pretrained(id_or_path, **kwargs)` takes transformers' usual kwargs plus `load_in_4bit`,
    `load_in_8bit`, `load_in_16bit`, `keep_vision_16bit`, `keep_modules`, `use_exact_model_name`,
    `quant_type`, `double_quant`, `quant_storage`, `init_missing` (module prefixes whose tensors the
    checkpoint may lack, freshly initialised); it returns the model (use `FastVisionModel` for the
    `(model, processor)` pair). The loaded model records what was resolved and why in `model.hf_fastvision`.
    """

    _model_mapping = FAST_VISION_MAPPING

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str], *model_args: Any, **kwargs: Any) -> Any:
        if model_args:
            raise TypeError("AutoFastVisionModel.from_pretrained takes keyword arguments only after the model id.")
        options = options_from_kwargs(kwargs)
        return load_model(pretrained_model_name_or_path, options, cls._model_mapping)

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> Any:
        """A randomly initialised patched model (16-bit, like transformers' `from_config`)."""
        return super().from_config(config, **kwargs)

    @classmethod
    def register(cls, config_class: type, model_class: type, exist_ok: bool = False) -> None:
        """Map a config class (e.g. your own architecture's) to a model class; it is patched on the way in."""
        if getattr(model_class, "config_class", None) is not None and model_class.config_class.__name__ != config_class.__name__:
            raise ValueError(
                f"{model_class.__name__}.config_class is {model_class.config_class.__name__}, not {config_class.__name__}."
            )
        cls._model_mapping.register(config_class, model_class, exist_ok=exist_ok)
