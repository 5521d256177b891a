"""Processor set-up: padding side, a dedicated pad token, the image-resolution lever, and safe truncation."""

from __future__ import annotations

from typing import Any

import torch

from hf_fastvision.errors import ImageSpanTruncationError, ModelNotFoundError
from hf_fastvision.registry import ArchSpec

__all__ = [
    "load_processor",
    "set_padding_side",
    "ensure_pad_token",
    "special_image_token_ids",
    "apply_image_budget",
    "truncate_batch",
]

NEW_PAD_TOKEN = "<|fastvision_pad|>"


def tokenizer_of(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def set_padding_side(processor: Any, side: str) -> None:
    """'right' for training, 'left' for batched generation."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    tokenizer_of(processor).padding_side = side
    if hasattr(processor, "padding_side"):
        processor.padding_side = side


def special_image_token_ids(processor: Any, config: Any = None) -> set[int]:
    """Ids of the multimodal special tokens the processor or config names (never usable as padding)."""
    tok = tokenizer_of(processor)
    ids: set[int] = set()
    if processor is not tok:
        for attr, value in vars(processor).items():
            if attr.endswith("_token") and isinstance(value, str):
                tid = tok.convert_tokens_to_ids(value)
                if isinstance(tid, int) and tid != tok.unk_token_id:
                    ids.add(tid)
            elif attr.endswith("_token_id") and isinstance(value, int):
                ids.add(value)
    for cfg in (config, getattr(config, "text_config", None)):
        for attr in ("image_token_id", "image_token_index", "video_token_id", "vision_start_token_id",
                     "vision_end_token_id", "boi_token_index", "eoi_token_index"):
            value = getattr(cfg, attr, None) if cfg is not None else None
            if isinstance(value, int):
                ids.add(value)
    return ids


def _forbidden_pad_ids(processor: Any, config: Any) -> set[int]:
    tok = tokenizer_of(processor)
    eos = tok.eos_token_id
    forbidden = set(special_image_token_ids(processor, config))
    if eos is not None:
        forbidden |= set(eos) if isinstance(eos, list) else {eos}
    for cfg in (config, getattr(config, "text_config", None)):
        eos_cfg = getattr(cfg, "eos_token_id", None) if cfg is not None else None
        if eos_cfg is not None:
            forbidden |= set(eos_cfg) if isinstance(eos_cfg, list) else {eos_cfg}
    return forbidden


def ensure_pad_token(processor: Any, spec: ArchSpec, model: Any = None, config: Any = None) -> str:
    """Give the tokenizer a pad token that is neither EOS nor an image token; returns it.

    Prefers the tokenizer's own pad token, then the spec's candidates; otherwise adds a new special token and,
    when a model is given, grows its embeddings to match.
    """
    tok = tokenizer_of(processor)
    config = config if config is not None else getattr(model, "config", None)
    forbidden = _forbidden_pad_ids(processor, config)
    if tok.pad_token is not None and tok.pad_token_id not in forbidden:
        chosen = tok.pad_token
    else:
        chosen = None
        vocab = tok.get_vocab()
        for cand in spec.pad_token_candidates:
            if cand in vocab and vocab[cand] not in forbidden:
                chosen = cand
                break
        if chosen is None:
            tok.add_special_tokens({"pad_token": NEW_PAD_TOKEN})
            chosen = NEW_PAD_TOKEN
            if model is not None and len(tok) > model.get_input_embeddings().weight.shape[0]:
                model.resize_token_embeddings(len(tok), mean_resizing=False)
        tok.pad_token = chosen
    if model is not None:
        pad_id = tok.convert_tokens_to_ids(chosen)
        for cfg in (model.config, getattr(model.config, "text_config", None), getattr(model, "generation_config", None)):
            if cfg is not None:
                cfg.pad_token_id = pad_id
    return chosen


def apply_image_budget(processor: Any, spec: ArchSpec, max_image_size: int | None) -> dict[str, Any]:
    """Bound image resolution (the biggest memory lever): longest side in pixels, mapped per family."""
    if max_image_size is None:
        return {}
    if int(max_image_size) < 14:
        raise ValueError(f"max_image_size is the longest image side in pixels; {max_image_size} is too small.")
    return spec.image_budget(processor, int(max_image_size))


def load_processor(
    name: str,
    spec: ArchSpec,
    *,
    model: Any = None,
    max_seq_length: int | None = None,
    max_image_size: int | None = None,
    padding_side: str = "right",
    **kwargs: Any,
) -> Any:
    """AutoProcessor for a checkpoint, set up for training (right padding) with a dedicated pad token."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"Cannot load a processor from {name!r} ({exc}). Save one next to the weights with "
            "`processor.save_pretrained(folder)`, or load the model alone with AutoFastVisionModel."
        ) from exc
    set_padding_side(processor, padding_side)
    ensure_pad_token(processor, spec, model=model)
    if max_seq_length is not None:
        tokenizer_of(processor).model_max_length = int(max_seq_length)
    apply_image_budget(processor, spec, max_image_size)
    return processor


def truncate_batch(batch: dict[str, Any], max_seq_length: int, image_token_ids: set[int]) -> dict[str, Any]:
    """Cut right-padded sequences to `max_seq_length` without entering any image's token span.

    Only text after the last image token may be dropped; a sample whose last image token lies beyond the limit
    raises `ImageSpanTruncationError` naming the fixes. Per-token tensors (same length as input_ids) are cut.
    """
    ids = batch["input_ids"]
    if ids.shape[1] <= max_seq_length:
        return batch
    if image_token_ids:
        is_image = torch.isin(ids, torch.tensor(sorted(image_token_ids), device=ids.device))
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        last_image = torch.where(is_image, positions, torch.full_like(positions, -1)).max(dim=1).values
        needed = int(last_image.max().item()) + 1
        if needed > max_seq_length:
            raise ImageSpanTruncationError(max_seq_length, needed)
    seq_len = ids.shape[1]
    out = dict(batch)
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == ids.shape[0] and value.shape[-1] == seq_len:
            out[key] = value[..., :max_seq_length]
    return out if type(batch) is dict else type(batch)(out)
