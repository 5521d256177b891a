"""A few steps through transformers' Trainer and TRL's SFTTrainer with the vision collator lower the loss."""

from __future__ import annotations

import pytest
import torch

from hf_fastvision import FastVisionModel
from hf_fastvision.archs.tiny import sample_messages
from hf_fastvision.training import VisionSFTCollator


class _Conversations(torch.utils.data.Dataset):
    def __init__(self, name, n):
        self.items = [{"messages": c} for c in sample_messages(name, n=n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _setup(name, tiny_checkpoint):
    model, processor = FastVisionModel.from_pretrained(str(tiny_checkpoint(name)), max_seq_length=256)
    model = FastVisionModel.get_peft_model(model, r=8, lora_alpha=16)
    return model, processor, VisionSFTCollator(processor, model_config=model.config)


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_transformers_trainer(tiny_checkpoint, tmp_path):
    from transformers import Trainer, TrainingArguments

    model, processor, collator = _setup("qwen2_5_vl", tiny_checkpoint)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=1, report_to=[], remove_unused_columns=False, save_strategy="no", use_cpu=True,
        gradient_accumulation_steps=2,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Conversations("qwen2_5_vl", 8), data_collator=collator)
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_trl_sft_trainer(tiny_checkpoint, tmp_path):
    trl = pytest.importorskip("trl")
    model, processor, collator = _setup("gemma3", tiny_checkpoint)
    args = trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=1, report_to=[], remove_unused_columns=False, save_strategy="no", use_cpu=True,
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    datasets = pytest.importorskip("datasets")
    rows = []
    for conv in sample_messages("gemma3", n=8):  # the layout TRL's vision datasets use: images in their own column
        images = [part.pop("image") for msg in conv for part in msg["content"] if part.get("type") == "image"]
        rows.append({"messages": conv, "images": images})
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             data_collator=collator, processing_class=processor)
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
