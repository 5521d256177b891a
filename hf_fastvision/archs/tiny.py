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

__all__ = [
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
HIDDEN = 64
INTERMEDIATE = 128
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
LAYERS = 2
MAX_POS = 2048

# A few whole words get their own BPE tokens (the rest is spelled out byte by byte).
_WORDS = ("the", "image", "what", "this", "is", "a", "red", "green", "blue", "square", "color", "user", "assistant")


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _TokSpec:
    specials: tuple[str, ...]  # ids 0..len-1, in this order
    bos: str | None = None
    eos: str | None = None
    pad: str | None = None
    unk: str | None = None
    # attributes like tokenizer.image_token (transformers "extra special tokens")
    extra: tuple[tuple[str, str], ...] = ()
    # extra non-special added tokens (e.g. row/col markers that are normal added tokens upstream)
    added: tuple[str, ...] = ()
    padding_side: str = "left"


@functools.lru_cache(maxsize=None)
def _bpe_vocab_and_merges(specials: tuple[str, ...]) -> tuple[dict, list]:
    from tokenizers import pre_tokenizers

    vocab: dict[str, int] = {}
    for tok in specials:
        vocab.setdefault(tok, len(vocab))
    # bytes_to_unicode alphabet, sorted by byte value for readability
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda c: _unicode_to_byte().get(c, 0))
    for ch in byte_chars:
        vocab.setdefault(ch, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        for form in (word, "\u0120" + word):  # "Ġ" marks a leading space in byte-level BPE
            prefix = form[0]
            for ch in form[1:]:
                merged = prefix + ch
                if merged not in vocab:
                    merges.append((prefix, ch))
                    vocab[merged] = len(vocab)
                prefix = merged
    return vocab, merges


@functools.lru_cache(maxsize=None)
def _unicode_to_byte() -> dict[str, int]:
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _build_tokenizer(spec: _TokSpec, chat_template: str | None = None):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _bpe_vocab_and_merges(spec.specials)
    tok = Tokenizer(models.BPE(vocab=dict(vocab), merges=list(merges), unk_token=spec.unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec.specials])
    if spec.added:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec.added])
    kwargs: dict[str, Any] = {}
    for role in ("bos", "eos", "pad", "unk"):
        value = getattr(spec, role)
        if value is not None:
            kwargs[f"{role}_token"] = value
    if spec.extra:
        kwargs["extra_special_tokens"] = dict(spec.extra)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=MAX_POS,
        padding_side=spec.padding_side,
        clean_up_tokenization_spaces=False,
        **kwargs,
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def _tok_ids(spec: _TokSpec) -> dict[str, int]:
    vocab, _ = _bpe_vocab_and_merges(spec.specials)
    ids = dict(vocab)
    n = len(vocab)
    for t in spec.added:
        if t not in ids:
            ids[t] = n
            n += 1
    return ids


def _vocab_size(spec: _TokSpec, extra: int = 0) -> int:
    """Size of the embedding table: ``len(tokenizer)`` (``extra``: tokens the processor adds) rounded up
    to a multiple of 8, like the padded vocabularies of real checkpoints (Qwen2-VL: 151936 > 151665).
    Every tokenizer id is < vocab_size; ids in [len(tokenizer), vocab_size) are valid but unused."""
    n = len(_tok_ids(spec)) + extra
    return (n + 7) // 8 * 8


# --------------------------------------------------------------------------------------------
# chat templates
# --------------------------------------------------------------------------------------------
def _lit(text: str) -> str:
    """Jinja for a literal string (``{{ bos_token }}``-style snippets pass through)."""
    if "{{" in text or "{%" in text or not text:
        return text
    return "{{ '" + text.replace("\n", "\\n") + "' }}"


def _by_role(spec: str | dict[str, str], role_expr: str) -> str:
    """Jinja for a per-turn snippet: a string (may use ``{role}``) or a ``{role: string}`` dict."""
    if isinstance(spec, dict):
        out = ""
        for i, (role, text) in enumerate(spec.items()):
            kw = "if" if i == 0 else "elif"
            out += "{%- " + kw + " message['role'] == '" + role + "' -%}" + _lit(text)
        return out + "{%- endif -%}"
    if "{role}" in spec:
        return "{{ '" + spec.replace("\n", "\\n").replace("{role}", "' + " + role_expr + " + '") + "' }}"
    return _lit(spec)


def _chat_template(
    *,
    turn_start: str | dict[str, str],
    turn_end: str | dict[str, str],
    generation_prompt: str,
    image: str,
    prefix: str = "",
    roles: dict[str, str] | None = None,
    video: str | None = None,
) -> str:
    """A small Jinja chat template.

    ``turn_start``/``turn_end`` are strings (``{role}`` is replaced by the role, mapped through
    ``roles``) or ``{role: string}`` dicts; ``image``/``video`` is what such a content item becomes;
    ``prefix`` is emitted once (e.g. ``"{{ bos_token }}"``).
    """
    role_expr = "message['role']"
    for src, dst in (roles or {}).items():
        role_expr = f"('{dst}' if message['role'] == '{src}' else {role_expr})"
    video_branch = ""
    if video is not None:
        video_branch = "{%- elif item['type'] == 'video' -%}" + _lit(video)
    return (
        prefix
        + "{%- for message in messages -%}"
        + _by_role(turn_start, role_expr)
        + "{%- if message['content'] is string -%}{{ message['content'] }}"
        + "{%- else -%}{%- for item in message['content'] -%}"
        + "{%- if item['type'] == 'image' -%}"
        + _lit(image)
        + video_branch
        + "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
        + "{%- endif -%}{%- endfor -%}{%- endif -%}"
        + _by_role(turn_end, role_expr)
        + "{%- endfor -%}"
        + "{%- if add_generation_prompt -%}"
        + _lit(generation_prompt)
        + "{%- endif -%}"
    )


# --------------------------------------------------------------------------------------------
# per-architecture recipes
# --------------------------------------------------------------------------------------------
@dataclass
class _Recipe:
    model_type: str
    tok: _TokSpec
    template: str
    config: Callable[[dict[str, int], _TokSpec], Any]
    processor: Callable[[Any, str], Any]
    image_size: int = 32  # size of the sample images
    text_model_attr: str = "language_model"
    requires: tuple[str, ...] = field(default_factory=tuple)


def _cls(name: str):
    import transformers

    return getattr(transformers, name)


def _text_common(ids: dict[str, int], spec: _TokSpec, vocab_size: int, **extra) -> dict:
    d = dict(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POS,
    )
    for role in ("bos", "eos", "pad"):
        tok = getattr(spec, role)
        d[f"{role}_token_id"] = ids[tok] if tok is not None else None
    d.update(extra)
    return d


def _siglip_vision(image_size: int, patch_size: int, **extra) -> dict:
    d = dict(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=image_size,
        patch_size=patch_size,
    )
    d.update(extra)
    return d


def _set_token_ids(cfg, ids: dict[str, int], spec: _TokSpec) -> None:
    """Mirror bos/eos/pad on the top-level config (used by generate and by our loader)."""
    for role in ("bos", "eos", "pad"):
        tok = getattr(spec, role)
        if tok is None:
            continue
        try:
            setattr(cfg, f"{role}_token_id", ids[tok])
        except Exception:  # some configs refuse unknown attributes
            pass


# ---- Mllama ---------------------------------------------------------------------------------
_MLLAMA_TOK = _TokSpec(
    specials=(
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|finetune_right_pad_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
        "<|image|>",
    ),
    bos="<|begin_of_text|>",
    eos="<|eot_id|>",
    pad="<|finetune_right_pad_id|>",
    extra=(("image_token", "<|image|>"),),
)
_LLAMA3_TEMPLATE = dict(
    prefix="{{ bos_token }}",
    turn_start="<|start_header_id|>{role}<|end_header_id|>\n\n",
    turn_end="<|eot_id|>",
    generation_prompt="<|start_header_id|>assistant<|end_header_id|>\n\n",
)
_MLLAMA_TILE = 28
_MLLAMA_MAX_TILES = 2


def _mllama_config(ids, spec):
    ratios = [
        [w, h]
        for w in range(1, _MLLAMA_MAX_TILES + 1)
        for h in range(1, _MLLAMA_MAX_TILES + 1)
        if w * h <= _MLLAMA_MAX_TILES
    ]
    intermediate_layers = [1]
    vision = dict(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_global_layers=1,
        attention_heads=HEADS,
        image_size=_MLLAMA_TILE,
        patch_size=7,
        max_num_tiles=_MLLAMA_MAX_TILES,
        supported_aspect_ratios=ratios,
        intermediate_layers_indices=intermediate_layers,
        vision_output_dim=HIDDEN * (len(intermediate_layers) + 1),
    )
    text = _text_common(
        ids,
        spec,
        _vocab_size(spec),
        cross_attention_layers=[1],  # layer 0 self-attention, layer 1 cross-attention
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024,
        },
    )
    text.pop("head_dim")
    cfg = _cls("MllamaConfig")(vision_config=vision, text_config=text, image_token_index=ids["<|image|>"])
    return cfg


def _mllama_processor(tokenizer, template):
    ip = _cls("MllamaImageProcessor")(
        size={"height": _MLLAMA_TILE, "width": _MLLAMA_TILE}, max_image_tiles=_MLLAMA_MAX_TILES
    )
    return _cls("MllamaProcessor")(image_processor=ip, tokenizer=tokenizer, chat_template=template)


# ---- Qwen2-VL / Qwen2.5-VL / Qwen3-VL ---------------------------------------------------------
_QWEN_TOK = _TokSpec(
    specials=(
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ),
    bos=None,
    eos="<|im_end|>",
    pad="<|endoftext|>",
    extra=(
        ("image_token", "<|image_pad|>"),
        ("video_token", "<|video_pad|>"),
        ("vision_start_token", "<|vision_start|>"),
        ("vision_end_token", "<|vision_end|>"),
    ),
)
_QWEN_TEMPLATE = dict(
    turn_start="<|im_start|>{role}\n",
    turn_end="<|im_end|>\n",
    generation_prompt="<|im_start|>assistant\n",
)
_QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
_QWEN_VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


def _qwen_ids(ids) -> dict:
    return dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def _qwen_text(ids, spec, **extra):
    text = _text_common(ids, spec, _vocab_size(spec), **extra)
    # the Qwen configs use bos = <|endoftext|>
    text["bos_token_id"] = ids["<|endoftext|>"]
    return text


# M-RoPE: head_dim 16 -> 8 rotary frequencies split (temporal, height, width) = (2, 3, 3)
_MROPE_SECTION = [2, 3, 3]


def _qwen2_vl_config(ids, spec):
    text = _qwen_text(
        ids,
        spec,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": list(_MROPE_SECTION)},
    )
    text.pop("head_dim")
    vision = dict(
        depth=LAYERS,
        embed_dim=HIDDEN,
        hidden_size=HIDDEN,
        num_heads=HEADS,
        mlp_ratio=2,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    return _cls("Qwen2VLConfig")(text_config=text, vision_config=vision, **_qwen_ids(ids))


def _qwen2_5_vl_config(ids, spec):
    text = _qwen_text(
        ids,
        spec,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": list(_MROPE_SECTION)},
    )
    text.pop("head_dim")
    vision = dict(
        depth=LAYERS,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_heads=HEADS,
        out_hidden_size=HIDDEN,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,  # 2x2 merged patches per window
        fullatt_block_indexes=[1],  # layer 0 windowed, layer 1 full attention
    )
    return _cls("Qwen2_5_VLConfig")(text_config=text, vision_config=vision, **_qwen_ids(ids))


def _qwen3_vl_config(ids, spec):
    text = _qwen_text(
        ids,
        spec,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": list(_MROPE_SECTION),
            "mrope_interleaved": True,
        },
    )
    vision = dict(
        depth=LAYERS,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_heads=HEADS,
        out_hidden_size=HIDDEN,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=16,  # 4x4 learned position grid (interpolated)
        deepstack_visual_indexes=[0],
    )
    return _cls("Qwen3VLConfig")(text_config=text, vision_config=vision, **_qwen_ids(ids))


def _qwen_processor(processor_cls, video_cls, patch_size):
    def build(tokenizer, template):
        factor = patch_size * 2
        pixels = (2 * factor) ** 2  # every image becomes 2x2 merged tokens (4x4 patches)
        common = dict(
            size={"shortest_edge": pixels, "longest_edge": pixels},
            patch_size=patch_size,
            temporal_patch_size=2,
            merge_size=2,
        )
        ip = _cls("Qwen2VLImageProcessor")(**common)
        vp = _cls(video_cls)(**common)
        return _cls(processor_cls)(image_processor=ip, tokenizer=tokenizer, video_processor=vp, chat_template=template)

    return build


# ---- Llava (CLIP) / Llava-Next ----------------------------------------------------------------
_LLAVA_TOK = _TokSpec(
    specials=("<unk>", "<s>", "</s>", "<image>", "<pad>"),
    bos="<s>",
    eos="</s>",
    pad="<pad>",
    unk="<unk>",
    extra=(("image_token", "<image>"),),
)
_LLAVA_TEMPLATE = dict(
    prefix="{{ bos_token }}",
    turn_start="{role}: ",
    turn_end={"assistant": "{{ eos_token }}", "user": " ", "system": " "},
    generation_prompt="ASSISTANT:",
    roles={"user": "USER", "assistant": "ASSISTANT", "system": "SYSTEM"},
)
_CLIP_SIZE = 28
_CLIP_PATCH = 7


def _clip_vision() -> dict:
    return dict(
        model_type="clip_vision_model",
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        projection_dim=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=_CLIP_SIZE,
        patch_size=_CLIP_PATCH,
    )


def _llava_config(ids, spec):
    text = _text_common(ids, spec, _vocab_size(spec), model_type="llama")
    return _cls("LlavaConfig")(
        vision_config=_clip_vision(),
        text_config=text,
        image_token_index=ids["<image>"],
        image_seq_length=(_CLIP_SIZE // _CLIP_PATCH) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )


def _llava_processor(tokenizer, template):
    ip = _cls("CLIPImageProcessor")(
        size={"shortest_edge": _CLIP_SIZE}, crop_size={"height": _CLIP_SIZE, "width": _CLIP_SIZE}
    )
    return _cls("LlavaProcessor")(
        image_processor=ip,
        tokenizer=tokenizer,
        patch_size=_CLIP_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token
        image_token="<image>",
        chat_template=template,
    )


_NEXT_PINPOINTS = [[_CLIP_SIZE, 2 * _CLIP_SIZE], [2 * _CLIP_SIZE, _CLIP_SIZE], [2 * _CLIP_SIZE, 2 * _CLIP_SIZE]]
_LLAVA_NEXT_TEMPLATE = dict(
    prefix="{{ bos_token }}",
    turn_start={"user": "[INST] ", "system": "[INST] "},
    turn_end={"user": " [/INST] ", "system": " [/INST] ", "assistant": "{{ eos_token }}"},
    generation_prompt="",
)


def _llava_next_config(ids, spec):
    text = _text_common(ids, spec, _vocab_size(spec), model_type="mistral")
    return _cls("LlavaNextConfig")(
        vision_config=_clip_vision(),
        text_config=text,
        image_token_index=ids["<image>"],
        image_grid_pinpoints=[list(p) for p in _NEXT_PINPOINTS],
        image_seq_length=(_CLIP_SIZE // _CLIP_PATCH) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )


def _llava_next_processor(tokenizer, template):
    ip = _cls("LlavaNextImageProcessor")(
        size={"shortest_edge": _CLIP_SIZE},
        crop_size={"height": _CLIP_SIZE, "width": _CLIP_SIZE},
        image_grid_pinpoints=[list(p) for p in _NEXT_PINPOINTS],
    )
    return _cls("LlavaNextProcessor")(
        image_processor=ip,
        tokenizer=tokenizer,
        patch_size=_CLIP_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=template,
    )


# ---- Pixtral (Llava) / Mistral3 ----------------------------------------------------------------
_PIXTRAL_TOK = _TokSpec(
    specials=(
        "<unk>",
        "<s>",
        "</s>",
        "[INST]",
        "[/INST]",
        "[SYSTEM_PROMPT]",
        "[/SYSTEM_PROMPT]",
        "[IMG]",
        "[IMG_BREAK]",
        "[IMG_END]",
        "<pad>",
    ),
    bos="<s>",
    eos="</s>",
    pad="<pad>",
    unk="<unk>",
    extra=(("image_token", "[IMG]"), ("image_break_token", "[IMG_BREAK]"), ("image_end_token", "[IMG_END]")),
)
_PIXTRAL_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}[SYSTEM_PROMPT]{{ message['content'] if message['content'] is string "
    "else message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') }}"
    "[/SYSTEM_PROMPT]"
    "{%- elif message['role'] == 'user' -%}[INST]"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}[IMG]{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}[/INST]"
    "{%- else -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{{ eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
_PIXTRAL_SIZE = 32
_PIXTRAL_PATCH = 8


def _pixtral_vision() -> dict:
    return dict(
        model_type="pixtral",
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        head_dim=HEAD_DIM,
        image_size=_PIXTRAL_SIZE,
        patch_size=_PIXTRAL_PATCH,
    )


def _llava_pixtral_config(ids, spec):
    text = _text_common(ids, spec, _vocab_size(spec), model_type="mistral")
    return _cls("LlavaConfig")(
        vision_config=_pixtral_vision(),
        text_config=text,
        image_token_index=ids["[IMG]"],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
    )


def _mistral3_config(ids, spec):
    text = _text_common(ids, spec, _vocab_size(spec), model_type="mistral")
    return _cls("Mistral3Config")(
        vision_config=_pixtral_vision(),
        text_config=text,
        image_token_index=ids["[IMG]"],
        spatial_merge_size=2,
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        multimodal_projector_bias=False,
        tie_word_embeddings=False,  # as Mistral-Small-3.1 (the class default ties)
    )


def _pixtral_processor(spatial_merge_size):
    def build(tokenizer, template):
        ip = _cls("PixtralImageProcessor")(
            size={"longest_edge": _PIXTRAL_SIZE},
            patch_size={"height": _PIXTRAL_PATCH, "width": _PIXTRAL_PATCH},
        )
        return _cls("PixtralProcessor")(
            image_processor=ip,
            tokenizer=tokenizer,
            patch_size=_PIXTRAL_PATCH,
            spatial_merge_size=spatial_merge_size,
            image_token="[IMG]",
            image_break_token="[IMG_BREAK]",
            image_end_token="[IMG_END]",
            chat_template=template,
        )

    return build


# ---- Gemma3 / PaliGemma ------------------------------------------------------------------------
_GEMMA3_TOK = _TokSpec(
    specials=(
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
        "<start_of_turn>",
        "<end_of_turn>",
        "<start_of_image>",
        "<end_of_image>",
        "<image_soft_token>",
    ),
    bos="<bos>",
    eos="<end_of_turn>",
    pad="<pad>",
    unk="<unk>",
    extra=(("boi_token", "<start_of_image>"), ("eoi_token", "<end_of_image>"), ("image_token", "<image_soft_token>")),
)
_GEMMA_TEMPLATE = dict(
    prefix="{{ bos_token }}",
    turn_start="<start_of_turn>{role}\n",
    turn_end="<end_of_turn>\n",
    generation_prompt="<start_of_turn>model\n",
    roles={"assistant": "model"},
)
_GEMMA3_SIZE = 32
_GEMMA3_PATCH = 8
_GEMMA3_MM_TOKENS = 4  # 4x4 patches pooled to 2x2


def _gemma3_config(ids, spec):
    text = _text_common(
        ids,
        spec,
        _vocab_size(spec),
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=HEAD_DIM,
    )
    vision = dict(
        model_type="siglip_vision_model", vision_use_head=False, **_siglip_vision(_GEMMA3_SIZE, _GEMMA3_PATCH)
    )
    return _cls("Gemma3Config")(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=_GEMMA3_MM_TOKENS,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )


def _gemma3_processor(tokenizer, template):
    ip = _cls("Gemma3ImageProcessor")(size={"height": _GEMMA3_SIZE, "width": _GEMMA3_SIZE}, do_pan_and_scan=False)
    return _cls("Gemma3Processor")(
        image_processor=ip, tokenizer=tokenizer, image_seq_length=_GEMMA3_MM_TOKENS, chat_template=template
    )


_PALIGEMMA_TOK = _TokSpec(
    specials=("<pad>", "<eos>", "<bos>", "<unk>", "<image>"),
    bos="<bos>",
    eos="<eos>",
    pad="<pad>",
    unk="<unk>",
    extra=(("image_token", "<image>"),),
)
# PaliGemma has no chat format: "<image>...<image>" + bos + prompt + "\n" (the processor adds bos and "\n").
_PALIGEMMA_TEMPLATE = (
    "{%- for message in messages -%}{%- if message['content'] is not string -%}"
    "{%- for item in message['content'] -%}{%- if item['type'] == 'image' -%}<image>{%- endif -%}{%- endfor -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}{%- if item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{ eos_token }}{%- elif not loop.last -%}{{ '\\n' }}{%- endif -%}"
    "{%- endfor -%}"
)
_PALIGEMMA_SIZE = 32
_PALIGEMMA_PATCH = 8


def _paligemma_n_extra() -> int:
    # PaliGemmaProcessor adds 1024 <locXXXX> and 128 <segXXX> tokens to the tokenizer.
    return 1024 + 128


def _paligemma_config(ids, spec):
    vocab = _vocab_size(spec, extra=_paligemma_n_extra())
    text = _text_common(ids, spec, vocab, model_type="gemma")
    vision = dict(
        model_type="siglip_vision_model",
        vision_use_head=False,
        projection_dim=HIDDEN,
        **_siglip_vision(_PALIGEMMA_SIZE, _PALIGEMMA_PATCH),
    )
    return _cls("PaliGemmaConfig")(
        text_config=text,
        vision_config=vision,
        image_token_index=ids["<image>"],
        projection_dim=HIDDEN,
        hidden_size=HIDDEN,
    )


def _paligemma_processor(tokenizer, template):
    ip = _cls("SiglipImageProcessor")(size={"height": _PALIGEMMA_SIZE, "width": _PALIGEMMA_SIZE})
    ip.image_seq_length = (_PALIGEMMA_SIZE // _PALIGEMMA_PATCH) ** 2
    return _cls("PaliGemmaProcessor")(image_processor=ip, tokenizer=tokenizer, chat_template=template)


# ---- Idefics3 / SmolVLM / Idefics2 ---------------------------------------------------------------
_ROWCOL = tuple(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6))
_IDEFICS3_TOK = _TokSpec(
    specials=(
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<pad>",
        "<fake_token_around_image>",
        "<image>",
        "<end_of_utterance>",
        "<global-img>",
    )
    + _ROWCOL,
    bos="<|begin_of_text|>",
    eos="<end_of_utterance>",
    pad="<pad>",
)
_IDEFICS_TEMPLATE = dict(
    turn_start="{role}:",
    turn_end="<end_of_utterance>\n",
    generation_prompt="Assistant:",
    roles={"user": "User", "assistant": "Assistant", "system": "System"},
    image="<image>",
)
_IDEFICS3_TILE = 32
_IDEFICS3_PATCH = 8
_IDEFICS3_SCALE = 2
_IDEFICS3_SEQ = (_IDEFICS3_TILE // _IDEFICS3_PATCH) ** 2 // _IDEFICS3_SCALE**2  # 4


def _idefics3_like_config(cls_name, vision_type):
    def build(ids, spec):
        text = _text_common(ids, spec, _vocab_size(spec), model_type="llama")
        vision = dict(model_type=vision_type, **_siglip_vision(_IDEFICS3_TILE, _IDEFICS3_PATCH))
        cfg = _cls(cls_name)(
            vision_config=vision,
            text_config=text,
            image_token_id=ids["<image>"],
            scale_factor=_IDEFICS3_SCALE,
            pad_token_id=ids[spec.pad],
        )
        return cfg

    return build


def _idefics3_image_processor(cls_name):
    # longest edge resized to 2 tiles, split into <= 2x2 tiles of 32 px + one global 32 px image
    return _cls(cls_name)(
        size={"longest_edge": 2 * _IDEFICS3_TILE},
        max_image_size={"longest_edge": _IDEFICS3_TILE},
        do_image_splitting=True,
    )


def _idefics3_processor(tokenizer, template):
    return _cls("Idefics3Processor")(
        image_processor=_idefics3_image_processor("Idefics3ImageProcessor"),
        tokenizer=tokenizer,
        image_seq_len=_IDEFICS3_SEQ,
        chat_template=template,
    )


_SMOLVLM_TOK = _TokSpec(
    specials=(
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<pad>",
        "<fake_token_around_image>",
        "<image>",
        "<end_of_utterance>",
        "<global-img>",
        "<video>",
    )
    + _ROWCOL,
    bos="<|im_start|>",
    eos="<end_of_utterance>",
    pad="<pad>",
    unk="<|endoftext|>",
    extra=(
        ("fake_image_token", "<fake_token_around_image>"),
        ("image_token", "<image>"),
        ("end_of_utterance_token", "<end_of_utterance>"),
        ("global_image_token", "<global-img>"),
        ("video_token", "<video>"),
    ),
)


def _smolvlm_processor(tokenizer, template):
    vp = _cls("SmolVLMVideoProcessor")(
        size={"longest_edge": 2 * _IDEFICS3_TILE}, max_image_size={"longest_edge": _IDEFICS3_TILE}
    )
    return _cls("SmolVLMProcessor")(
        image_processor=_idefics3_image_processor("SmolVLMImageProcessor"),
        tokenizer=tokenizer,
        video_processor=vp,
        image_seq_len=_IDEFICS3_SEQ,
        chat_template=template,
    )


_IDEFICS2_TOK = _TokSpec(
    specials=("<unk>", "<s>", "</s>", "<pad>", "<fake_token_around_image>", "<image>", "<end_of_utterance>"),
    bos="<s>",
    eos="<end_of_utterance>",
    pad="<pad>",
    unk="<unk>",
    extra=(("image_token", "<image>"), ("image_boundary_token", "<fake_token_around_image>")),
)
_IDEFICS2_SIZE = 28
_IDEFICS2_PATCH = 7
_IDEFICS2_LATENTS = 4


def _idefics2_config(ids, spec):
    text = _text_common(ids, spec, _vocab_size(spec), model_type="mistral")
    vision = dict(model_type="idefics2_vision", **_siglip_vision(_IDEFICS2_SIZE, _IDEFICS2_PATCH))
    perceiver = dict(
        hidden_act="silu",
        resampler_n_latents=_IDEFICS2_LATENTS,
        resampler_depth=1,
        resampler_n_heads=HEADS,
        resampler_head_dim=HEAD_DIM,
        num_key_value_heads=KV_HEADS,
    )
    return _cls("Idefics2Config")(
        vision_config=vision,
        perceiver_config=perceiver,
        text_config=text,
        image_token_id=ids["<image>"],
    )


def _idefics2_processor(tokenizer, template):
    ip = _cls("Idefics2ImageProcessor")(
        size={"shortest_edge": _IDEFICS2_SIZE, "longest_edge": _IDEFICS2_SIZE}, do_image_splitting=False
    )
    return _cls("Idefics2Processor")(
        image_processor=ip, tokenizer=tokenizer, image_seq_len=_IDEFICS2_LATENTS, chat_template=template
    )


# ---- Llava-OneVision ------------------------------------------------------------------------------
_QWEN_LLAVA_TOK = _TokSpec(
    specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"),
    eos="<|im_end|>",
    pad="<|endoftext|>",
    extra=(("image_token", "<image>"), ("video_token", "<video>")),
)
_OV_SIZE = 28
_OV_PATCH = 7
_OV_PINPOINTS = [[_OV_SIZE, _OV_SIZE], [_OV_SIZE, 2 * _OV_SIZE], [2 * _OV_SIZE, _OV_SIZE], [2 * _OV_SIZE, 2 * _OV_SIZE]]


def _llava_onevision_config(ids, spec):
    text = _text_common(ids, spec, _vocab_size(spec), model_type="qwen2")
    text.pop("head_dim")
    vision = dict(model_type="siglip_vision_model", vision_use_head=False, **_siglip_vision(_OV_SIZE, _OV_PATCH))
    return _cls("LlavaOnevisionConfig")(
        vision_config=vision,
        text_config=text,
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        image_grid_pinpoints=[list(p) for p in _OV_PINPOINTS],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )


def _llava_onevision_processor(tokenizer, template):
    ip = _cls("LlavaOnevisionImageProcessor")(
        size={"height": _OV_SIZE, "width": _OV_SIZE}, image_grid_pinpoints=[list(p) for p in _OV_PINPOINTS]
    )
    vp = _cls("LlavaOnevisionVideoProcessor")(size={"height": _OV_SIZE, "width": _OV_SIZE})
    return _cls("LlavaOnevisionProcessor")(
        image_processor=ip,
        tokenizer=tokenizer,
        video_processor=vp,
        num_image_tokens=(_OV_SIZE // _OV_PATCH) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=template,
    )


# ---- Aya Vision ----------------------------------------------------------------------------------
_AYA_TOK = _TokSpec(
    specials=(
        "<PAD>",
        "<UNK>",
        "<BOS_TOKEN>",
        "<EOS_TOKEN>",
        "<|START_OF_TURN_TOKEN|>",
        "<|END_OF_TURN_TOKEN|>",
        "<|USER_TOKEN|>",
        "<|CHATBOT_TOKEN|>",
        "<|SYSTEM_TOKEN|>",
        "<|START_RESPONSE|>",
        "<|END_RESPONSE|>",
        "<image>",
        "<|START_OF_IMG|>",
        "<|END_OF_IMG|>",
        "<|IMG_PATCH|>",
        "<|IMG_LINE_BREAK|>",
    ),
    bos="<BOS_TOKEN>",
    eos="<|END_OF_TURN_TOKEN|>",
    pad="<PAD>",
    unk="<UNK>",
)
_AYA_SIZE = 28
_AYA_PATCH = 7
_AYA_DOWNSAMPLE = 2


def _aya_vision_config(ids, spec):
    text = _text_common(
        ids,
        spec,
        _vocab_size(spec),
        model_type="cohere2",
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    )
    vision = dict(model_type="siglip_vision_model", vision_use_head=False, **_siglip_vision(_AYA_SIZE, _AYA_PATCH))
    return _cls("AyaVisionConfig")(
        vision_config=vision,
        text_config=text,
        downsample_factor=_AYA_DOWNSAMPLE,
        image_token_index=ids["<|IMG_PATCH|>"],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )


def _aya_vision_processor(tokenizer, template):
    ip = _cls("GotOcr2ImageProcessor")(
        size={"height": _AYA_SIZE, "width": _AYA_SIZE}, crop_to_patches=True, min_patches=1, max_patches=2
    )
    return _cls("AyaVisionProcessor")(
        image_processor=ip,
        tokenizer=tokenizer,
        patch_size=_AYA_PATCH,
        img_size=_AYA_SIZE,
        downsample_factor=_AYA_DOWNSAMPLE,
        image_token="<image>",
        chat_template=template,
    )


# ---- InternVL --------------------------------------------------------------------------------------
_INTERNVL_TOK = _TokSpec(
    specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"),
    eos="<|im_end|>",
    pad="<|endoftext|>",
    extra=(
        ("start_image_token", "<img>"),
        ("end_image_token", "</img>"),
        ("context_image_token", "<IMG_CONTEXT>"),
        ("video_token", "<video>"),
    ),
)
_INTERNVL_SIZE = 28
_INTERNVL_PATCH = 7
_INTERNVL_SEQ = (_INTERNVL_SIZE // _INTERNVL_PATCH) ** 2 // 4  # downsample_ratio 0.5


def _internvl_config(ids, spec):
    text = _text_common(ids, spec, _vocab_size(spec), model_type="qwen2")
    text.pop("head_dim")
    vision = dict(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=[_INTERNVL_SIZE, _INTERNVL_SIZE],
        patch_size=[_INTERNVL_PATCH, _INTERNVL_PATCH],
    )
    return _cls("InternVLConfig")(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["<IMG_CONTEXT>"],
        image_seq_length=_INTERNVL_SEQ,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )


def _internvl_processor(tokenizer, template):
    ip = _cls("GotOcr2ImageProcessor")(
        size={"height": _INTERNVL_SIZE, "width": _INTERNVL_SIZE}, crop_to_patches=True, min_patches=1, max_patches=2
    )
    vp = _cls("InternVLVideoProcessor")(size={"height": _INTERNVL_SIZE, "width": _INTERNVL_SIZE})
    return _cls("InternVLProcessor")(
        image_processor=ip,
        tokenizer=tokenizer,
        video_processor=vp,
        image_seq_length=_INTERNVL_SEQ,
        chat_template=template,
    )


# ---- GLM-4.1V --------------------------------------------------------------------------------------
_GLM4V_TOK = _TokSpec(
    specials=(
        "<|endoftext|>",
        "[gMASK]",
        "<sop>",
        "<|system|>",
        "<|user|>",
        "<|assistant|>",
        "<|begin_of_image|>",
        "<|end_of_image|>",
        "<|image|>",
        "<|begin_of_video|>",
        "<|end_of_video|>",
        "<|video|>",
        "<|pad|>",
    ),
    eos="<|endoftext|>",
    pad="<|pad|>",
    extra=(("image_token", "<|image|>"), ("video_token", "<|video|>")),
)


def _glm4v_config(ids, spec):
    text = _text_common(
        ids,
        spec,
        _vocab_size(spec),
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [1, 1, 2],  # head_dim 16 * partial_rotary_factor 0.5 -> 4 frequencies
            "partial_rotary_factor": 0.5,
        },
    )
    text.pop("head_dim")
    vision = dict(
        depth=LAYERS,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_heads=HEADS,
        out_hidden_size=HIDDEN,
        image_size=56,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    return _cls("Glm4vConfig")(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image|>"],
        video_token_id=ids["<|video|>"],
        image_start_token_id=ids["<|begin_of_image|>"],
        image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"],
        video_end_token_id=ids["<|end_of_video|>"],
    )


def _glm4v_processor(tokenizer, template):
    # GLM's smart_resize budgets temporal_patch_size frames: 2 x 56 x 56 -> 4x4 patches -> 2x2 tokens
    pixels = 2 * 56 * 56
    common = dict(
        size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=14, temporal_patch_size=2, merge_size=2
    )
    ip = _cls("Glm4vImageProcessor")(**common)
    vp = _cls("Glm4vVideoProcessor")(**common)
    return _cls("Glm4vProcessor")(image_processor=ip, tokenizer=tokenizer, video_processor=vp, chat_template=template)


# ---- LFM2-VL ---------------------------------------------------------------------------------------
_LFM2_TOK = _TokSpec(
    specials=(
        "<|pad|>",
        "<|startoftext|>",
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<image>",
        "<|image_start|>",
        "<|image_end|>",
        "<|img_thumbnail|>",
    )
    + tuple(f"<|img_row_{i + 1}_col_{j + 1}|>" for i in range(4) for j in range(4)),
    bos="<|startoftext|>",
    eos="<|im_end|>",
    pad="<|pad|>",
    extra=(
        ("image_token", "<image>"),
        ("image_start_token", "<|image_start|>"),
        ("image_end_token", "<|image_end|>"),
        ("image_thumbnail_token", "<|img_thumbnail|>"),
    ),
)
_LFM2_PATCH = 8


def _lfm2_vl_config(ids, spec):
    text = _text_common(
        ids,
        spec,
        _vocab_size(spec),
        model_type="lfm2",
        layer_types=["conv", "full_attention"],
        conv_L_cache=3,
        block_multiple_of=16,
        block_ffn_dim_multiplier=1.0,
        block_auto_adjust_ff_dim=False,
    )
    text.pop("head_dim")
    vision = dict(
        model_type="siglip2_vision_model",
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        patch_size=_LFM2_PATCH,
        num_patches=16,
        vision_use_head=False,
    )
    return _cls("Lfm2VlConfig")(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["<image>"],
        downsample_factor=2,
        projector_hidden_size=HIDDEN,
    )


def _lfm2_vl_processor(tokenizer, template):
    ip = _cls("Lfm2VlImageProcessor")(
        patch_size=_LFM2_PATCH,
        downsample_factor=2,
        do_image_splitting=True,
        min_tiles=2,
        max_tiles=4,
        use_thumbnail=True,
        min_image_tokens=4,
        max_image_tokens=16,
        encoder_patch_size=_LFM2_PATCH,
        tile_size=32,
        max_pixels_tolerance=2.0,
        max_num_patches=64,
    )
    return _cls("Lfm2VlProcessor")(image_processor=ip, tokenizer=tokenizer, chat_template=template)


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
    model.eval()
    return model, processor


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
