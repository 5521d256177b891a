"""The registry: every named family resolves its modules on the real class; the generic spec covers the rest."""

from __future__ import annotations

import pytest
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from hf_fastvision import ArchSpec, list_archs, register_arch
from hf_fastvision.archs.tiny import NAMED_TINY_TYPES, model_type_of, tiny_config
from hf_fastvision.auto import AutoFastVisionModel
from hf_fastvision.quantization import meta_model
from hf_fastvision.registry import get_arch, get_arch_for_model_type, resolve_roots

NAMED = [s.name for s in list_archs(include_generic=False)]


def test_named_families_present():
    assert set(NAMED) == {"mllama", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "mistral3", "gemma3", "idefics3", "smolvlm"}


def test_generic_covers_every_other_image_text_type():
    for model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        spec = get_arch_for_model_type(model_type)
        assert spec is not None, model_type
        assert spec.generic == (spec.name not in NAMED)


@pytest.mark.parametrize("name", NAMED_TINY_TYPES)
def test_named_spec_resolves_on_real_class(name):
    config = tiny_config(name)
    spec = get_arch(config)
    assert not spec.generic and model_type_of(name) in spec.model_types
    model = meta_model(config, AutoFastVisionModel._model_mapping[type(config)])
    roots = resolve_roots(spec, model)
    assert roots.language and roots.vision and roots.projectors and roots.lm_head == ("lm_head",)
    for projector in roots.projectors:  # projectors never sit in the text decoder
        assert not any(projector.startswith(lang + ".") for lang in roots.language)


def test_register_arch_validates():
    with pytest.raises(ValueError, match="already registered"):
        register_arch(ArchSpec(name="qwen2_vl", model_types=("qwen2_vl",)))
    with pytest.raises(ValueError, match="already belong"):
        register_arch(ArchSpec(name="my_family", model_types=("qwen2_vl",)))
    with pytest.raises(TypeError):
        ArchSpec(name="bad", model_types=("x",), language_model="model.language_model")  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="Supported"):
        get_arch(type("C", (), {"model_type": "no_such_type"})())
