"""Bad input gets a clear error naming the fix, and nothing is written to disk."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from hf_fastvision import (
    AutoFastVisionModel,
    ConflictingOptionsError,
    CorruptCheckpointError,
    FastVisionModel,
    MissingDependencyError,
    ModelNotFoundError,
    NotAVisionModelError,
)


def _snapshot(path):
    return sorted((p, os.path.getsize(os.path.join(p, f))) for p, _, fs in os.walk(path) for f in fs)


@pytest.fixture
def watch_disk(tmp_path, monkeypatch):
    """Point the HF cache at an empty folder; the test asserts it is still empty afterwards."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HOME", str(cache))
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    yield tmp_path
    assert _snapshot(tmp_path) == before, "an error path wrote to disk"


def test_unknown_id_offline(watch_disk):
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache"):
        FastVisionModel.from_pretrained("no-such-org/no-such-model")


def test_missing_folder(watch_disk):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        AutoFastVisionModel.from_pretrained("./models/not-there")


def test_folder_without_config(watch_disk):
    (watch_disk / "empty").mkdir()
    before = _snapshot(watch_disk)
    with pytest.raises(ModelNotFoundError, match="config.json"):
        AutoFastVisionModel.from_pretrained(watch_disk / "empty")
    assert _snapshot(watch_disk) == before
    shutil.rmtree(watch_disk / "empty")


def test_text_only_model_suggests_causal_lm(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    with pytest.raises(NotAVisionModelError, match="AutoModelForCausalLM"):
        AutoFastVisionModel.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"load_in_8bit": True, "load_in_16bit": True},
        {"load_in_8bit": True, "full_finetuning": True},
        {"load_in_16bit": True, "quantization_config": object()},
    ],
)
def test_conflicting_flags(kwargs, watch_disk):
    with pytest.raises(ConflictingOptionsError, match="Conflicting options"):
        FastVisionModel.from_pretrained("Qwen/Qwen2.5-VL-7B-Instruct", **kwargs)


def test_bad_gpu_memory_utilization(watch_disk):
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        FastVisionModel.from_pretrained("Qwen/Qwen2.5-VL-7B-Instruct", gpu_memory_utilization=1.5)


def test_prequantized_cannot_load_16bit(tiny_checkpoint, tmp_path):
    model = AutoFastVisionModel.from_pretrained(tiny_checkpoint("qwen2_vl"))
    model.save_pretrained(tmp_path / "q4")
    with pytest.raises(ConflictingOptionsError, match="16-bit source"):
        AutoFastVisionModel.from_pretrained(tmp_path / "q4", load_in_16bit=True)


def test_truncated_safetensors(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("qwen2_vl")
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    before = _snapshot(tmp_path)
    with pytest.raises(CorruptCheckpointError, match="download it again"):
        AutoFastVisionModel.from_pretrained(broken)
    assert _snapshot(tmp_path) == before
    weights.write_bytes(data[:5])
    with pytest.raises(CorruptCheckpointError):
        AutoFastVisionModel.from_pretrained(broken)


def test_bitsandbytes_missing(monkeypatch, tiny_checkpoint):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a))
    with pytest.raises(MissingDependencyError, match="pip install bitsandbytes"):
        AutoFastVisionModel.from_pretrained(tiny_checkpoint("qwen2_vl"))
    # 16-bit loading does not need it
    model = AutoFastVisionModel.from_pretrained(tiny_checkpoint("qwen2_vl"), load_in_16bit=True)
    assert isinstance(model.lm_head, torch.nn.Linear)
