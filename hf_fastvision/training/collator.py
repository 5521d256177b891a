"""Vision SFT collator: chat conversations with images → a padded, labelled batch.

Samples are `{"messages": [...]}` in the processors' chat-message format (content parts
`{"type": "image", "image": PIL.Image}` and `{"type": "text", "text": ...}`), optionally with `"images"` for
templates that reference images without embedding them. Several images per conversation and batches mixing
text-only and image samples work. Labels mask padding, every image/vision special token and, with
`train_on_responses_only`, everything before the final assistant turn — so the model learns the answer and its
end-of-turn token, nothing else. Truncation to `max_seq_length` never cuts an image's token span.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from hf_fastvision.processor import special_image_token_ids, tokenizer_of, truncate_batch

__all__ = ["VisionSFTCollator"]

IGNORE_INDEX = -100


def _images_of(sample: dict[str, Any]) -> list[Any]:
    images = [part["image"] for msg in sample["messages"] if isinstance(msg.get("content"), list)
              for part in msg["content"] if part.get("type") == "image" and part.get("image") is not None]
    return images + list(sample.get("images") or [])


class VisionSFTCollator:
    """Callable for `Trainer` / `SFTTrainer` (`data_collator=`) and plain DataLoaders."""

    def __init__(
        self,
        processor: Any,
        *,
        max_seq_length: int | None = None,
        train_on_responses_only: bool = True,
        model_config: Any = None,
        processor_kwargs: dict[str, Any] | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        """`pad_to_multiple_of`: right-pad every batch's length to a multiple (capped at `max_seq_length`), so
        batches come in a few shapes and CUDA-graphed layers (which replay per shape) are reused."""
        self.processor = processor
        tok = tokenizer_of(processor)
        limit = max_seq_length if max_seq_length is not None else getattr(tok, "model_max_length", None)
        self.max_seq_length = int(limit) if limit is not None and limit < 10**8 else None
        self.train_on_responses_only = train_on_responses_only
        self.masked_ids = special_image_token_ids(processor, model_config)
        self.processor_kwargs = dict(processor_kwargs or {})
        if pad_to_multiple_of is not None and int(pad_to_multiple_of) <= 0:
            raise ValueError(f"pad_to_multiple_of must be a positive int, got {pad_to_multiple_of}")
        self.pad_to_multiple_of = int(pad_to_multiple_of) if pad_to_multiple_of else None

    def _encode(self, texts: list[str], images: list[list[Any]]) -> Any:
        tok = tokenizer_of(self.processor)
        side = tok.padding_side
        tok.padding_side = "right"
        try:
            return self.processor(
                text=texts,
                images=images if any(images) else None,
                padding=True,
                return_tensors="pt",
                **self.processor_kwargs,
            )
        except ValueError as exc:
            if any(images) and not all(images):
                raise ValueError(
                    f"{type(self.processor).__name__} of this transformers version cannot mix text-only and image "
                    "samples in one batch; upgrade transformers, or batch samples by modality (e.g. a sampler that "
                    f"groups them). Processor said: {exc}"
                ) from exc
            raise
        finally:
            tok.padding_side = side

    def _prompt_lengths(self, samples: Sequence[dict[str, Any]], images: list[list[Any]]) -> list[int]:
        """Tokens before each sample's final assistant turn (its prompt, rendered with the generation prompt)."""
        prompts, prompt_images = [], []
        for sample, imgs in zip(samples, images):
            messages = sample["messages"]
            if messages[-1].get("role") != "assistant":
                raise ValueError("train_on_responses_only needs each conversation to end with an assistant turn.")
            prompts.append(self.processor.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False))
            n_prompt_images = len(_images_of({"messages": messages[:-1]})) + len(sample.get("images") or [])
            prompt_images.append(imgs[:n_prompt_images])
        encoded = self._encode(prompts, prompt_images)
        return encoded["attention_mask"].sum(dim=1).tolist()

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not samples:
            raise ValueError("VisionSFTCollator got an empty batch.")
        texts = [self.processor.apply_chat_template(s["messages"], tokenize=False) for s in samples]
        images = [_images_of(s) for s in samples]
        batch = _pad_trailing_text_only_rows(self._encode(texts, images), images)
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = IGNORE_INDEX
        if self.masked_ids:
            labels[torch.isin(labels, torch.tensor(sorted(self.masked_ids)))] = IGNORE_INDEX
        if self.train_on_responses_only:
            for row, n in enumerate(self._prompt_lengths(samples, images)):
                labels[row, :n] = IGNORE_INDEX
        batch["labels"] = labels
        if self.max_seq_length is not None:
            batch = truncate_batch(batch, self.max_seq_length, self.masked_ids)
        if self.pad_to_multiple_of:
            batch = self._pad_to_multiple(batch)
        return batch

    def _pad_to_multiple(self, batch: Any) -> Any:
        n, length = batch["input_ids"].shape
        step = self.pad_to_multiple_of
        target = -(-length // step) * step
        if self.max_seq_length is not None:
            target = max(length, min(target, self.max_seq_length))
        extra = target - length
        if extra <= 0:
            return batch
        pad_id = tokenizer_of(self.processor).pad_token_id
        fill = {"input_ids": pad_id if pad_id is not None else 0, "labels": IGNORE_INDEX}
        for key, value in list(batch.items()):  # every per-token tensor: [batch, tokens, ...]
            if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[:2] == (n, length):
                pad = value.new_full((n, extra, *value.shape[2:]), fill.get(key, 0))
                batch[key] = torch.cat([value, pad], dim=1)
        return batch


def _pad_trailing_text_only_rows(batch: Any, images: list[list[Any]]) -> Any:
    """Some image processors (Mllama's) drop the rows of text-only samples that end a batch from their
    per-sample tensors; give those rows zeros (no image) so every per-sample tensor has the batch size."""
    n = len(images)
    with_images = [i for i, imgs in enumerate(images) if imgs]
    pixels = batch.get("pixel_values")
    per_sample = isinstance(pixels, torch.Tensor) and pixels.dim() >= 5 and pixels.shape[0] == n
    if not with_images or with_images[-1] == n - 1 or not per_sample:
        return batch
    short = with_images[-1] + 1
    for key, value in list(batch.items()):
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == short and key != "input_ids":
            pad = value.new_zeros((n - short, *value.shape[1:]))
            batch[key] = torch.cat([value, pad])
    return batch
