"""Shared pieces of the tiny models: sizes, the from-scratch BPE tokenizer, chat templates, recipe helpers."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

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


