"""Quantization plans: roles, 16-bit modules, and skip entries that mean the same on every transformers 5.x."""

from __future__ import annotations

import re

import pytest

from hf_fastvision.archs.tiny import NAMED_TINY_TYPES, tiny_config
from hf_fastvision.auto import AutoFastVisionModel
from hf_fastvision.quantization import build_plan, meta_model, skip_entry
from hf_fastvision.registry import get_arch


def _plan(name, **kw):
    config = tiny_config(name)
    model = meta_model(config, AutoFastVisionModel._model_mapping[type(config)])
    return build_plan(model, get_arch(config), **kw), model


@pytest.mark.parametrize("name", NAMED_TINY_TYPES)
def test_default_plan_keeps_head_and_projector(name):
    plan, _ = _plan(name)
    roles_kept = {plan.roles[n] for n in plan.kept}
    roles_quant = {plan.roles[n] for n in plan.quantized}
    assert "lm_head" in roles_kept and "lm_head" not in roles_quant
    assert "projector" not in roles_quant
    assert "vision" in roles_quant and "language" in roles_quant  # vision tower quantized by default


@pytest.mark.parametrize("name", ["qwen2_5_vl", "gemma3", "idefics3"])
def test_keep_vision_16bit(name):
    plan, _ = _plan(name, keep_vision_16bit=True)
    assert not any(plan.roles[n] == "vision" for n in plan.quantized)
    assert any(plan.roles[n] == "vision" for n in plan.kept)


def test_user_keep_pattern_and_16bit():
    plan, _ = _plan("qwen2_vl", keep=[r"layers\.0\.mlp"])
    assert all("layers.0.mlp" not in n for n in plan.quantized)
    assert any("layers.0.mlp" in n for n in plan.kept)
    plan16, _ = _plan("qwen2_vl", bits=16)
    assert plan16.quantized == [] and plan16.skip_modules == []
    with pytest.raises(ValueError, match="nf4"):
        _plan("qwen2_vl", quant_type="int3")


def test_skip_entry_boundaries_under_installed_transformers():
    from transformers.quantizers.quantizers_utils import should_convert_module

    entry = skip_entry("model.language_model.layers.1")
    assert not should_convert_module("model.language_model.layers.1.mlp.up_proj", [entry])
    assert should_convert_module("model.language_model.layers.11.mlp.up_proj", [entry])
    assert should_convert_module("model.language_model.layers.1x", [entry])
    # 5.17 matched entries as unanchored-at-the-end regex prefixes: the lookahead keeps the boundary there too.
    assert re.match(entry, "model.language_model.layers.1.mlp")
    assert not re.match(entry, "model.language_model.layers.10.mlp")


@pytest.mark.parametrize("name", NAMED_TINY_TYPES)
def test_plan_agrees_with_transformers_matching(name):
    from transformers.quantizers.quantizers_utils import should_convert_module

    plan, _ = _plan(name)
    for module in plan.quantized:
        assert should_convert_module(module, plan.skip_modules), module
    for module in plan.kept:
        assert not should_convert_module(module, plan.skip_modules), module
