"""Where training switches the allocator to expandable segments (`hf_fastvision.allocator`, ``train`` mode): the
LoRA set-up, a full fine-tuning load, or else the patched model's first training forward with labels."""

from __future__ import annotations

import pytest
import torch

from hf_fastvision import FastVisionModel, allocator
from hf_fastvision.archs.tiny import sample_batch

NAME = "qwen2_5_vl"


@pytest.fixture
def switches(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(allocator, "enable_for_training", lambda: calls.append("switch") or "switched")
    return calls


def test_the_lora_set_up_switches(switches, tiny_checkpoint):
    model, _ = FastVisionModel.from_pretrained(str(tiny_checkpoint(NAME)))
    assert switches == []  # loading alone keeps the fixed-size segments
    FastVisionModel.get_peft_model(model, r=4, lora_alpha=8)
    assert switches  # for_training ran it


def test_a_full_finetuning_load_switches(switches, tiny_checkpoint):
    FastVisionModel.from_pretrained(str(tiny_checkpoint(NAME)), full_finetuning=True, load_in_4bit=False)
    assert switches == ["switch"]


def test_peft_s_own_set_up_switches_at_the_first_training_forward(switches, tiny_checkpoint):
    from peft import LoraConfig, get_peft_model

    model, processor = FastVisionModel.from_pretrained(str(tiny_checkpoint(NAME)))
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    batch = sample_batch(processor, NAME, n=1)
    model.eval()
    with torch.no_grad():
        model(**batch)
    assert switches == []  # evaluation does not
    model.train()
    loss = model(**batch).loss
    assert torch.isfinite(loss) and switches == ["switch"]
