"""Checkpoints laid out like the public `unsloth/*-bnb-4bit` vision repos load through our API.

Those repos were written by plain transformers + bitsandbytes: config.json carries a `quantization_config`
whose `llm_int8_skip_modules` are bare names (Unsloth's list), `model.safetensors` holds the bnb 4-bit tensors
(`.absmax`, `.quant_map`, `.nested_absmax`, `.quant_state.bitsandbytes__nf4`), processor files sit next to them,
and the README front matter names the base model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from hf_fastvision import AutoFastVisionModel, FastVisionModel
from hf_fastvision.hub import inspect_checkpoint, is_4bit_model
from hf_fastvision.quantize import sample_inputs, stable_logits

UNSLOTH_SKIPS = ["lm_head", "multi_modal_projector", "merger", "modality_projection", "router", "vision_tower"]
README = """---
base_model: tiny-org/{name}
tags:
- unsloth
- {name}
license: apache-2.0
language:
- en
---
# Finetune with Unsloth
"""


def _quantized(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"}


def _unsloth_folder(src: Path, dest: Path, name: str) -> tuple[Path, torch.Tensor, set[str]]:
    """Write `dest` as Unsloth does (stock transformers, bare skip names); returns it, its logits, its 4-bit layers."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=UNSLOTH_SKIPS,
    )
    model = AutoModelForImageTextToText.from_pretrained(src, quantization_config=config, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(src)
    model.save_pretrained(dest)
    processor.save_pretrained(dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg.update(unsloth_fixed=True, _name_or_path=f"tiny-org/{name}")
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    (dest / "README.md").write_text(README.format(name=name))
    return dest, stable_logits(model, sample_inputs(processor)), _quantized(model)


@pytest.fixture(scope="module")
def unsloth_qwen(tiny_checkpoint, tmp_path_factory):
    return _unsloth_folder(tiny_checkpoint("qwen2_vl"), tmp_path_factory.mktemp("unsloth") / "qwen", "qwen2_vl")


def test_unsloth_layout_is_a_4bit_checkpoint(unsloth_qwen):
    folder, _, _ = unsloth_qwen
    info = inspect_checkpoint(folder)
    assert info.quant_type == "nf4" and info.double_quant and info.quantized_tensors > 0
    assert "merger" in info.skip_modules and info.model_type == "qwen2_vl"
    keys = set(json.loads((folder / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"])
    assert keys == set(UNSLOTH_SKIPS)


@pytest.mark.parametrize("name", ["qwen2_vl", "llava"])
def test_unsloth_layout_loads_through_our_api(name, unsloth_qwen, tiny_checkpoint, tmp_path):
    if name == "qwen2_vl":
        folder, expected, quantized = unsloth_qwen
    else:
        folder, expected, quantized = _unsloth_folder(tiny_checkpoint(name), tmp_path / name, name)
    model = AutoFastVisionModel.from_pretrained(str(folder))
    assert is_4bit_model(model) and model.hf_fastvision.prequantized
    assert model.hf_fastvision.plan.skip_modules == UNSLOTH_SKIPS
    model2, processor = FastVisionModel.from_pretrained(str(folder))
    assert processor.tokenizer.pad_token is not None
    inputs = sample_inputs(processor)
    assert torch.equal(stable_logits(model, inputs), expected)
    # The bare names mean whatever the installed transformers makes of them; we load the layers as they were saved.
    assert _quantized(model) == quantized and "lm_head" not in quantized


def test_unsloth_repo_pulls_and_loads_by_id(unsloth_qwen, servers, hub_client, tmp_path):
    folder, expected, _ = unsloth_qwen
    repo_id = "unsloth/tiny-qwen2-vl-bnb-4bit"
    sha = servers.seed(repo_id, folder)
    cache = tmp_path / "cache"
    pulled = hub_client.call("pull", repo_id=repo_id, revision="main", cache_dir=str(cache), endpoint=servers.olah_url)
    assert Path(pulled["path"]).name == sha
    assert pulled["quant_type"] == "nf4" and "merger" in pulled["kept"]
    model, processor = FastVisionModel.from_pretrained(repo_id, revision="main", cache_dir=str(cache))
    assert model.hf_fastvision.prequantized and model.hf_fastvision.resolution.name == repo_id
    assert torch.equal(stable_logits(model, sample_inputs(processor)), expected)
