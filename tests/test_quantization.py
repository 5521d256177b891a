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


def test_cpu_inference_keeps_the_loaded_4bit_weights(tiny_checkpoint, tmp_path):
    """bitsandbytes 0.50 repacks 4-bit weights for its CPU GEMV on the first eval forward (AVX512-BF16 CPUs), storing
    the scales in bf16: a model saved after that held other weights. Our loads opt out, so an eval forward leaves
    every packed tensor as loaded and a save + reload gives the same logits."""
    import torch

    from hf_fastvision import FastVisionModel
    from hf_fastvision.archs.tiny import sample_batch

    model, processor = FastVisionModel.from_pretrained(tiny_checkpoint("qwen2_vl"), max_seq_length=128)
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert layers and not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in layers)
    before = {n: t.clone() for n, t in model.state_dict().items() if "weight" in n}
    FastVisionModel.for_inference(model)
    batch = sample_batch(processor, "qwen2_vl", 1, with_labels=False)
    with torch.no_grad():
        logits = model(**batch).logits
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    after = model.state_dict()
    assert all(torch.equal(after[n], t) for n, t in before.items())
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    again, _ = FastVisionModel.from_pretrained(str(tmp_path), max_seq_length=128)
    FastVisionModel.for_inference(again)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, logits)
