"""Tiny configs and processors of the named families.

Mllama, Qwen2-VL / Qwen2.5-VL / Qwen3-VL, Llava (CLIP) / Llava-Next, Pixtral (Llava) / Mistral 3, Gemma 3 / PaliGemma,
Idefics3 / SmolVLM / Idefics2.
"""

from __future__ import annotations

from hf_fastvision.archs.tiny._base import (  # noqa: F401
    HEADS,
    HEAD_DIM,
    HIDDEN,
    INTERMEDIATE,
    KV_HEADS,
    LAYERS,
    _TokSpec,
    _cls,
    _siglip_vision,
    _text_common,
    _vocab_size,
)

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


