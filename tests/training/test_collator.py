"""The vision SFT collator: masking, several images, mixed batches, truncation that keeps image spans whole."""

from __future__ import annotations

import pytest
import torch

from hf_fastvision import FastVisionModel, ImageSpanTruncationError
from hf_fastvision.archs.tiny import NAMED_TINY_TYPES, sample_messages, tiny_images
from hf_fastvision.training import VisionSFTCollator

TEXT_ONLY = [
    {"role": "user", "content": [{"type": "text", "text": "say yes"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "yes."}]},
]


@pytest.mark.parametrize("name", NAMED_TINY_TYPES)
def test_mixed_batch_masks_prompt_pad_and_images(name, tiny_checkpoint):
    model, processor = FastVisionModel.from_pretrained(str(tiny_checkpoint(name)))
    collator = VisionSFTCollator(processor, model_config=model.config)
    samples = [{"messages": c} for c in sample_messages(name, n=2)] + [{"messages": TEXT_ONLY}]
    try:
        batch = collator(samples)
    except ValueError as exc:  # some processor versions (Mllama on transformers 5.17) refuse mixed batches
        assert "cannot mix text-only and image samples" in str(exc)
        samples = samples[:2]
        batch = collator(samples)
    labels, ids = batch["labels"], batch["input_ids"]
    tok = processor.tokenizer
    for row, sample in enumerate(samples):
        learned = tok.decode(ids[row][labels[row] != -100])
        answer = sample["messages"][-1]["content"][0]["text"]
        assert learned.strip().startswith(answer), (learned, answer)  # the answer (and end-of-turn) only
    assert not torch.isin(labels, torch.tensor(sorted(collator.masked_ids))).any()
    assert (labels[batch["attention_mask"] == 0] == -100).all()
    loss = model(**batch).loss
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", ["qwen2_5_vl", "idefics3", "gemma3"])
def test_several_images_per_conversation(name, tiny_checkpoint):
    _, processor = FastVisionModel.from_pretrained(str(tiny_checkpoint(name)), load_in_16bit=True)
    a, b = tiny_images(2, size=32)
    conv = [
        {"role": "user", "content": [{"type": "image", "image": a}, {"type": "image", "image": b},
                                     {"type": "text", "text": "what is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a square."}]},
    ]
    batch = VisionSFTCollator(processor)([{"messages": conv}, {"messages": TEXT_ONLY}])
    assert batch["input_ids"].shape[0] == 2 and "pixel_values" in batch


def test_truncation_never_cuts_an_image(tiny_checkpoint):
    _, processor = FastVisionModel.from_pretrained(str(tiny_checkpoint("qwen2_5_vl")), load_in_16bit=True)
    samples = [{"messages": c} for c in sample_messages("qwen2_5_vl", n=2)]
    full = VisionSFTCollator(processor, max_seq_length=10_000)(samples)
    collator = VisionSFTCollator(processor)
    image_end = max(int(torch.nonzero(torch.isin(r, torch.tensor(sorted(collator.masked_ids)))).max()) for r in full["input_ids"])
    keep = image_end + 2
    cut = VisionSFTCollator(processor, max_seq_length=keep)(samples)
    assert cut["input_ids"].shape[1] == keep
    assert torch.equal(cut["input_ids"], full["input_ids"][:, :keep])
    with pytest.raises(ImageSpanTruncationError, match="max_image_size"):
        VisionSFTCollator(processor, max_seq_length=image_end - 1)(samples)


@pytest.mark.parametrize("name", ["qwen2_5_vl", "mllama", "gemma3"])
def test_pad_to_multiple_of_keeps_the_loss(name, tiny_checkpoint):
    """Right-padding to a multiple (fewer distinct shapes for CUDA graphs) changes no label and no loss."""
    model, processor = FastVisionModel.from_pretrained(str(tiny_checkpoint(name)))
    samples = [{"messages": c} for c in sample_messages(name, n=2)]
    plain = VisionSFTCollator(processor, model_config=model.config)(samples)
    padded = VisionSFTCollator(processor, model_config=model.config, pad_to_multiple_of=64)(samples)
    length = plain["input_ids"].shape[1]
    assert padded["input_ids"].shape[1] == -(-length // 64) * 64
    for key in plain:
        if isinstance(plain[key], torch.Tensor) and plain[key].shape[:2] == plain["input_ids"].shape:
            assert padded[key].shape[1] == padded["input_ids"].shape[1], key
            torch.testing.assert_close(padded[key][:, :length], plain[key], msg=key)
    assert (padded["labels"][:, length:] == -100).all() and (padded["attention_mask"][:, length:] == 0).all()
    torch.testing.assert_close(model(**padded).loss, model(**plain).loss, rtol=1e-4, atol=1e-5)
    capped = VisionSFTCollator(processor, model_config=model.config, pad_to_multiple_of=10**4,
                               max_seq_length=length + 3)(samples)
    assert capped["input_ids"].shape[1] == length + 3  # never past max_seq_length
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        VisionSFTCollator(processor, pad_to_multiple_of=0)
