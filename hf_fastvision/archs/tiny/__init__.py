"""Tiny, fully offline models and processors for every architecture we support.

Everything here is built from scratch: the tokenizer is a small byte-level BPE made with the
``tokenizers`` library (256 byte symbols, a handful of merged words and all the special tokens the
processor and the model need), the image processor is the architecture's own class configured for
tiny images, and the model config is a tiny random config (hidden 64, 2 text layers, 2 vision
layers, 4 heads) that keeps the real structure of the architecture.  Nothing is downloaded.

Public API::

    NAMED_TINY_TYPES     # the architectures we explicitly support
    GENERIC_TINY_TYPES   # further image-text-to-text types available in this transformers version
    ALL_TINY_TYPES       # NAMED_TINY_TYPES + GENERIC_TINY_TYPES
    tiny_config(name) -> PretrainedConfig
    tiny_tokenizer(name) -> PreTrainedTokenizerFast
    tiny_processor(name) -> ProcessorMixin
    tiny_model_and_processor(name, seed=0) -> (model, processor)
    tiny_images(n, size=32) -> list[PIL.Image]
    sample_messages(name, n=1, with_answer=True) -> list of conversations
    sample_batch(processor, name, n=1, with_labels=True) -> BatchFeature
    model_type_of(name) -> str          # "llava_pixtral" -> "llava"
    text_model_attr(name) -> str        # "text_model" (Idefics2/3, SmolVLM) or "language_model"
    missing_dependencies(name) -> list  # e.g. ["num2words"] for SmolVLM when not installed

Tokenizers pad on the left (batches are ready for ``generate``); the pad token is always a dedicated
token distinct from EOS.  Config vocab sizes are ``len(tokenizer)`` rounded up to a multiple of 8.
Requires torchvision (the transformers-5 image processors used here are torchvision-backed) and, for
SmolVLM, ``num2words``.

``name`` is a transformers ``model_type`` except ``"llava_pixtral"`` (Llava with a Pixtral vision
tower, as in mistral-community/pixtral-12b).  ``model_type_of(name)`` maps it back.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable

from hf_fastvision.archs.tiny._base import (  # noqa: F401  (the sizes are public: tests read them)
    HEAD_DIM,
    HEADS,
    HIDDEN,
    INTERMEDIATE,
    KV_HEADS,
    LAYERS,
    MAX_POS,
    _Recipe,
    _build_tokenizer,
    _chat_template,
    _set_token_ids,
    _tok_ids,
)
from hf_fastvision.archs.tiny._named import (  # noqa: F401
    _GEMMA3_TOK,
    _GEMMA_TEMPLATE,
    _IDEFICS2_TOK,
    _IDEFICS3_TOK,
    _IDEFICS_TEMPLATE,
    _LLAMA3_TEMPLATE,
    _LLAVA_NEXT_TEMPLATE,
    _LLAVA_TEMPLATE,
    _LLAVA_TOK,
    _MLLAMA_TOK,
    _PALIGEMMA_TEMPLATE,
    _PALIGEMMA_TOK,
    _PIXTRAL_TEMPLATE,
    _PIXTRAL_TOK,
    _QWEN_IMAGE,
    _QWEN_TEMPLATE,
    _QWEN_TOK,
    _QWEN_VIDEO,
    _SMOLVLM_TOK,
    _gemma3_config,
    _gemma3_processor,
    _idefics2_config,
    _idefics2_processor,
    _idefics3_like_config,
    _idefics3_processor,
    _llava_config,
    _llava_next_config,
    _llava_next_processor,
    _llava_pixtral_config,
    _llava_processor,
    _mistral3_config,
    _mllama_config,
    _mllama_processor,
    _paligemma_config,
    _paligemma_processor,
    _pixtral_processor,
    _qwen2_5_vl_config,
    _qwen2_vl_config,
    _qwen3_vl_config,
    _qwen_processor,
    _smolvlm_processor,
)
from hf_fastvision.archs.tiny._generic import (  # noqa: F401
    _AYA_TOK,
    _GLM4V_TOK,
    _INTERNVL_TOK,
    _LFM2_TOK,
    _QWEN_LLAVA_TOK,
    _aya_vision_config,
    _aya_vision_processor,
    _glm4v_config,
    _glm4v_processor,
    _internvl_config,
    _internvl_processor,
    _lfm2_vl_config,
    _lfm2_vl_processor,
    _llava_onevision_config,
    _llava_onevision_processor,
)

from hf_fastvision.archs.tiny._steps import lora_step  # noqa: E402

__all__ = [
    "lora_step",
    "NAMED_TINY_TYPES",
    "GENERIC_TINY_TYPES",
    "ALL_TINY_TYPES",
    "CANDIDATE_GENERIC_TYPES",
    "model_type_of",
    "text_model_attr",
    "missing_dependencies",
    "tiny_config",
    "tiny_tokenizer",
    "tiny_processor",
    "tiny_model_and_processor",
    "open_zero_gates",
    "ZERO_GATE_VALUE",
    "tiny_images",
    "sample_messages",
    "sample_batch",
]

NAMED_TINY_TYPES: tuple[str, ...] = (
    "mllama",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "llava",
    "llava_pixtral",
    "mistral3",
    "gemma3",
    "idefics3",
    "smolvlm",
)

# Sizes shared by every tiny model.
# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------
def _recipes() -> dict[str, _Recipe]:
    qwen_t = _chat_template(image=_QWEN_IMAGE, video=_QWEN_VIDEO, **_QWEN_TEMPLATE)
    r = {
        "mllama": _Recipe(
            "mllama",
            _MLLAMA_TOK,
            _chat_template(image="<|image|>", **_LLAMA3_TEMPLATE),
            _mllama_config,
            _mllama_processor,
            image_size=24,
        ),
        "qwen2_vl": _Recipe(
            "qwen2_vl",
            _QWEN_TOK,
            qwen_t,
            _qwen2_vl_config,
            _qwen_processor("Qwen2VLProcessor", "Qwen2VLVideoProcessor", 14),
            image_size=48,
        ),
        "qwen2_5_vl": _Recipe(
            "qwen2_5_vl",
            _QWEN_TOK,
            qwen_t,
            _qwen2_5_vl_config,
            _qwen_processor("Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor", 14),
            image_size=48,
        ),
        "qwen3_vl": _Recipe(
            "qwen3_vl",
            _QWEN_TOK,
            qwen_t,
            _qwen3_vl_config,
            _qwen_processor("Qwen3VLProcessor", "Qwen3VLVideoProcessor", 16),
            image_size=56,
        ),
        "llava": _Recipe(
            "llava", _LLAVA_TOK, _chat_template(image="<image>\n", **_LLAVA_TEMPLATE), _llava_config, _llava_processor
        ),
        "llava_pixtral": _Recipe(
            "llava", _PIXTRAL_TOK, _PIXTRAL_TEMPLATE, _llava_pixtral_config, _pixtral_processor(1), image_size=24
        ),
        "mistral3": _Recipe(
            "mistral3", _PIXTRAL_TOK, _PIXTRAL_TEMPLATE, _mistral3_config, _pixtral_processor(2), image_size=24
        ),
        "gemma3": _Recipe(
            "gemma3",
            _GEMMA3_TOK,
            _chat_template(image="<start_of_image>", **_GEMMA_TEMPLATE),
            _gemma3_config,
            _gemma3_processor,
        ),
        "idefics3": _Recipe(
            "idefics3",
            _IDEFICS3_TOK,
            _chat_template(prefix="{{ bos_token }}", **_IDEFICS_TEMPLATE),
            _idefics3_like_config("Idefics3Config", "idefics3_vision"),
            _idefics3_processor,
            image_size=40,
            text_model_attr="text_model",
        ),
        "smolvlm": _Recipe(
            "smolvlm",
            _SMOLVLM_TOK,
            _chat_template(prefix="<|im_start|>", **_IDEFICS_TEMPLATE),
            _idefics3_like_config("SmolVLMConfig", "smolvlm_vision"),
            _smolvlm_processor,
            image_size=40,
            text_model_attr="text_model",
            requires=("num2words",),
        ),
        # ---- generic
        "llava_next": _Recipe(
            "llava_next",
            _LLAVA_TOK,
            _chat_template(image="<image>\n", **_LLAVA_NEXT_TEMPLATE),
            _llava_next_config,
            _llava_next_processor,
            image_size=40,
        ),
        "llava_onevision": _Recipe(
            "llava_onevision",
            _QWEN_LLAVA_TOK,
            _chat_template(image="<image>\n", video="<video>\n", **_QWEN_TEMPLATE),
            _llava_onevision_config,
            _llava_onevision_processor,
            image_size=40,
        ),
        "paligemma": _Recipe("paligemma", _PALIGEMMA_TOK, _PALIGEMMA_TEMPLATE, _paligemma_config, _paligemma_processor),
        "aya_vision": _Recipe(
            "aya_vision",
            _AYA_TOK,
            _chat_template(
                prefix="{{ bos_token }}",
                turn_start="<|START_OF_TURN_TOKEN|>{role}",
                turn_end="<|END_OF_TURN_TOKEN|>",
                generation_prompt="<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
                image="<image>",
                roles={"user": "<|USER_TOKEN|>", "assistant": "<|CHATBOT_TOKEN|>", "system": "<|SYSTEM_TOKEN|>"},
            ),
            _aya_vision_config,
            _aya_vision_processor,
            image_size=40,
        ),
        "internvl": _Recipe(
            "internvl",
            _INTERNVL_TOK,
            _chat_template(image="<IMG_CONTEXT>\n", video="<video>\n", **_QWEN_TEMPLATE),
            _internvl_config,
            _internvl_processor,
            image_size=40,
        ),
        "glm4v": _Recipe(
            "glm4v",
            _GLM4V_TOK,
            _chat_template(
                prefix="[gMASK]<sop>",
                turn_start="<|{role}|>\n",
                turn_end="",
                generation_prompt="<|assistant|>\n",
                image="<|begin_of_image|><|image|><|end_of_image|>",
                video="<|begin_of_video|><|video|><|end_of_video|>",
            ),
            _glm4v_config,
            _glm4v_processor,
            image_size=48,
        ),
        "lfm2_vl": _Recipe(
            "lfm2_vl",
            _LFM2_TOK,
            _chat_template(image="<image>", prefix="{{ bos_token }}", **_QWEN_TEMPLATE),
            _lfm2_vl_config,
            _lfm2_vl_processor,
            image_size=40,
        ),
        "idefics2": _Recipe(
            "idefics2",
            _IDEFICS2_TOK,
            _chat_template(prefix="{{ bos_token }}", **_IDEFICS_TEMPLATE),
            _idefics2_config,
            _idefics2_processor,
            text_model_attr="text_model",
        ),
    }
    return r


_RECIPES = _recipes()

# Generic types we know how to build; GENERIC_TINY_TYPES keeps those the installed transformers has.
CANDIDATE_GENERIC_TYPES: tuple[str, ...] = (
    "llava_next",
    "llava_onevision",
    "paligemma",
    "aya_vision",
    "internvl",
    "glm4v",
    "lfm2_vl",
    "idefics2",
)


def _available(model_type: str) -> bool:
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    except Exception:  # pragma: no cover
        return False
    return model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


GENERIC_TINY_TYPES: tuple[str, ...] = tuple(t for t in CANDIDATE_GENERIC_TYPES if _available(t))
ALL_TINY_TYPES: tuple[str, ...] = NAMED_TINY_TYPES + GENERIC_TINY_TYPES


def _recipe(name: str) -> _Recipe:
    try:
        return _RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown tiny type {name!r}; known: {', '.join(_RECIPES)}") from None


def model_type_of(name: str) -> str:
    """transformers ``model_type`` of a tiny name (``llava_pixtral`` -> ``llava``)."""
    return _recipe(name).model_type


def text_model_attr(name: str) -> str:
    """Attribute of ``model.model`` that holds the language model (``text_model`` or ``language_model``)."""
    return _recipe(name).text_model_attr


def missing_dependencies(name: str) -> list[str]:
    """Python packages the processor of ``name`` needs that are not installed (empty when fine).

    Every image processor used here is the torchvision-backed class of transformers 5; SmolVLM's
    processor also needs ``num2words``.
    """
    return [mod for mod in ("torchvision",) + _recipe(name).requires if importlib.util.find_spec(mod) is None]


def _check_requirements(name: str) -> None:
    missing = missing_dependencies(name)
    if missing:
        raise ImportError(f"tiny {name!r} processor needs {', '.join(missing)} (pip install {' '.join(missing)})")


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def tiny_tokenizer(name: str):
    """A from-scratch byte-level BPE tokenizer with all special tokens of ``name``."""
    rec = _recipe(name)
    return _build_tokenizer(rec.tok, rec.template)


def tiny_config(name: str):
    """Tiny random config of ``name`` whose token ids agree with :func:`tiny_tokenizer`."""
    rec = _recipe(name)
    ids = _tok_ids(rec.tok)
    cfg = rec.config(ids, rec.tok)
    _set_token_ids(cfg, ids, rec.tok)
    return cfg


def tiny_processor(name: str):
    """The real processor class of ``name``, built offline for tiny images."""
    rec = _recipe(name)
    _check_requirements(name)
    tokenizer = _build_tokenizer(rec.tok, rec.template)
    return rec.processor(tokenizer, rec.template)


def tiny_model_and_processor(name: str, seed: int = 0):
    """``(model, processor)``: fp32 model from ``AutoModelForImageTextToText.from_config``."""
    import torch
    from transformers import AutoModelForImageTextToText

    processor = tiny_processor(name)
    config = tiny_config(name)
    with torch.random.fork_rng(devices=[]):  # deterministic weights without touching the global RNG
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    open_zero_gates(model)
    model.eval()
    return model, processor


ZERO_GATE_VALUE = 0.5


def open_zero_gates(model, value: float = ZERO_GATE_VALUE) -> int:
    """Scalar tanh gates that ``from_config`` initialises to 0 (Mllama's cross-attention and tile/position
    embedding gates) cut the image off from the loss: no gradient would reach the vision tower, and tests of
    vision-side patches would compare zeros. Trained checkpoints have them open; so do the tiny ones and the
    benchmarks' random-weight models (``value``). Returns how many gates were set."""
    import torch

    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1].endswith("gate") and p.numel() <= 16 and not bool(p.ne(0).any()):
                p.fill_(value)
                n += 1
    return n


_COLORS = ((220, 30, 30), (30, 180, 60), (40, 60, 220), (230, 200, 20), (160, 40, 200), (20, 200, 200))
_COLOR_NAMES = ("red", "green", "blue", "yellow", "purple", "cyan")


def tiny_images(n: int = 1, size: int = 32):
    """``n`` small RGB PIL images: a coloured square on a light background (sizes vary a bit)."""
    from PIL import Image, ImageDraw

    images = []
    for i in range(n):
        w = size + 8 * (i % 2)
        h = size
        img = Image.new("RGB", (w, h), (245, 245, 240))
        draw = ImageDraw.Draw(img)
        c = _COLORS[i % len(_COLORS)]
        m = max(2, size // 5)
        draw.rectangle([m, m, w - m - 1, h - m - 1], fill=c)
        images.append(img)
    return images


def sample_messages(name: str, n: int = 1, with_answer: bool = True) -> list[list[dict]]:
    """``n`` conversations, each with one small image, a question and (optionally) an answer."""
    size = _recipe(name).image_size
    convs = []
    for i, img in enumerate(tiny_images(n, size=size)):
        question = "what is the color of the square?" if i % 2 == 0 else "what is this?"
        conv = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": question}]}]
        if with_answer:
            answer = f"the square is {_COLOR_NAMES[i % len(_COLOR_NAMES)]}."
            conv.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        convs.append(conv)
    return convs


def sample_batch(processor, name: str, n: int = 1, with_labels: bool = True):
    """Processor output (``BatchFeature`` of torch tensors) for ``n`` one-image conversations.

    With ``with_labels`` the conversations include the assistant answer and ``labels`` is
    ``input_ids`` with padding set to -100; without, they end with the generation prompt
    (ready for ``model.generate``).  Everything the processor returns (``mm_token_type_ids``,
    ``token_type_ids``, ``image_grid_thw``, ``cross_attention_mask``, ...) is kept.
    """
    convs = sample_messages(name, n=n, with_answer=with_labels)
    processor_kwargs: dict[str, Any] = {"padding": True}
    add_generation_prompt = not with_labels
    if model_type_of(name) == "paligemma" and with_labels:
        # PaliGemma's prefix-LM format: the answer goes in as `suffix` so that token_type_ids mark it
        # (prefix tokens attend bidirectionally, suffix tokens causally).
        processor_kwargs["suffix"] = [conv[-1]["content"][0]["text"] for conv in convs]
        convs = [conv[:-1] for conv in convs]
    batch = processor.apply_chat_template(
        convs,
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs=processor_kwargs,
    )
    batch.pop("labels", None)  # PaliGemma builds its own (prefix-masked) labels; we use ours
    if with_labels:
        labels = batch["input_ids"].clone()
        if "attention_mask" in batch:
            labels[batch["attention_mask"] == 0] = -100
        pad_id = processor.tokenizer.pad_token_id
        if pad_id is not None:
            labels[labels == pad_id] = -100
        batch["labels"] = labels
    return batch
