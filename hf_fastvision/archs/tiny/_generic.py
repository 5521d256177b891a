"""Tiny configs and processors of generic image-text-to-text types.

Llava-OneVision, Aya Vision, InternVL, GLM-4.1V, LFM2-VL.
"""

from __future__ import annotations

from hf_fastvision.archs.tiny._base import (  # noqa: F401
    HEADS,
    HIDDEN,
    INTERMEDIATE,
    LAYERS,
    _TokSpec,
    _cls,
    _siglip_vision,
    _text_common,
    _vocab_size,
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


