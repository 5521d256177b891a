"""Mllama's vision encoders keep only the layer outputs the vision model reads (patch flag `vision_states`): the
same values and gradients, and the dropped outputs really are freed during the forward."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from hf_fastvision import FastVisionModel
from hf_fastvision.archs._mllama_vision_encoder import lean_encoder_forward, prepare_lean_encoder
from hf_fastvision.archs.tiny import lora_step, sample_batch, tiny_processor
from hf_fastvision.patching import _bind, original_forward, patched_modules

pytest.importorskip("bitsandbytes")


def _vision_model(**overrides):
    from transformers.models.mllama.configuration_mllama import MllamaVisionConfig
    from transformers.models.mllama.modeling_mllama import MllamaVisionModel

    cfg = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=6, num_global_layers=3, attention_heads=2,
               image_size=14, patch_size=7, max_num_tiles=2, supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
               intermediate_layers_indices=[1, -3], vision_output_dim=48)
    cfg.update(overrides)
    torch.manual_seed(0)
    model = MllamaVisionModel(MllamaVisionConfig(**cfg)).eval()
    model.config._attn_implementation = "sdpa"
    for gate in (model.gated_positional_embedding.gate, model.pre_tile_positional_embedding.gate,
                 model.post_tile_positional_embedding.gate):
        gate.data.fill_(0.5)
    return model


def _inputs(batch=2):
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(batch, 1, 2, 3, 14, 14, generator=g)
    ratio_ids = torch.tensor([[2]] * batch)
    ratio_mask = torch.ones(batch, 1, 2, dtype=torch.long)
    ratio_mask[0, 0, 1] = 0
    return pixels, ratio_ids, ratio_mask


def _bind_lean(model) -> dict[str, frozenset]:
    keeps = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "MllamaVisionEncoder":
            assert prepare_lean_encoder(module, name, model)
            assert _bind(module, "vision_states", lean_encoder_forward)
            keeps[name] = module.__dict__["_hffv_keep_states"]
    return keeps


def test_the_lean_encoders_give_the_stock_values_and_keep_only_the_read_outputs():
    stock, lean = _vision_model(), _vision_model()
    assert _bind_lean(lean) == {"transformer": frozenset({1, 3}), "global_transformer": frozenset()}
    pixels, ratio_ids, ratio_mask = _inputs()
    px = pixels.clone().requires_grad_(True)
    ref = stock(px, ratio_ids, ratio_mask).last_hidden_state
    px2 = pixels.clone().requires_grad_(True)
    got = lean(px2, ratio_ids, ratio_mask).last_hidden_state
    assert torch.equal(got, ref)
    g = torch.randn_like(ref)
    ref.backward(g)
    got.backward(g)
    assert torch.equal(px2.grad, px.grad)
    for (n, a), (_, b) in zip(stock.named_parameters(), lean.named_parameters()):
        assert (a.grad is None) == (b.grad is None), n
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad), n
    out = lean.transformer(torch.randn(1, 8, 16))
    assert len(out.hidden_states) == 6 and [i for i, h in enumerate(out.hidden_states) if h is not None] == [1, 3]


def _alive_outputs_at_the_last_global_layer(model) -> int:
    """Under no_grad, how many earlier vision-layer outputs are still alive when the last global layer runs."""
    refs, seen = [], []
    layers = list(model.transformer.layers) + list(model.global_transformer.layers)
    hooks = [layer.register_forward_hook(lambda m, a, out: refs.append(weakref.ref(out))) for layer in layers[:-1]]

    def count(m, args):
        gc.collect()
        seen.append(sum(r() is not None for r in refs))

    hooks.append(layers[-1].register_forward_pre_hook(count))
    with torch.no_grad():
        model(*_inputs(1))
    for h in hooks:
        h.remove()
    return seen[0]


def test_the_dropped_outputs_are_freed_during_the_forward():
    stock, lean = _vision_model(), _vision_model()
    _bind_lean(lean)
    # stock: all 6 local + 2 global outputs so far; lean: the 2 read local ones, the local encoder's last output
    # (the vision model holds its `last_hidden_state`) and the last global layer's input
    assert _alive_outputs_at_the_last_global_layer(stock) == 8
    assert _alive_outputs_at_the_last_global_layer(lean) == 4


def test_prepare_refuses_encoders_it_cannot_account_for():
    model = _vision_model(intermediate_layers_indices=[1, 9])  # an index past the layers: leave it stock
    assert not prepare_lean_encoder(model.transformer, "transformer", model)
    assert prepare_lean_encoder(model.global_transformer, "global_transformer", model)
    assert not prepare_lean_encoder(model.transformer.layers[0], "transformer.layers.0", model)


def test_a_checkpointed_4bit_lora_step_is_unchanged(tiny_checkpoint):
    folder = str(tiny_checkpoint("mllama"))
    lean, loss_l, grads_l = lora_step(folder, "mllama", None, autocast=torch.bfloat16)
    stock, loss_s, grads_s = lora_step(folder, "mllama", {"vision_states": False}, autocast=torch.bfloat16)
    # the two encoders and the model (which frees the vision output once projected)
    assert sorted(k for k in patched_modules(lean).values() if k == "vision_states") == ["vision_states"] * 3
    assert "vision_states" not in patched_modules(stock).values()
    assert torch.equal(loss_l, loss_s)
    assert [n for n in grads_s if "vision_model" in n] and set(grads_l) == set(grads_s)
    for n, g in grads_s.items():
        assert torch.equal(grads_l[n], g), n


def test_compact_vision_mask_stands_for_the_stock_mask_exactly():
    from hf_fastvision.archs._mllama_vision_attention import compact_vision_mask, expand_vision_mask, vision_mask

    for dtype in (torch.float32, torch.bfloat16):
        mask, real = vision_mask([1, 4, 0], 4, 5, 3, dtype)
        compact = compact_vision_mask(mask)
        assert compact is not None and compact.shape == real.shape and compact.dtype == dtype
        assert torch.equal(compact == 0, real)
        assert torch.equal(expand_vision_mask(compact), mask)
    other = mask.clone()
    other[0, 0, 0, 1] = torch.finfo(other.dtype).min  # a real pair masked: not the split form
    assert compact_vision_mask(other) is None
    assert compact_vision_mask(mask[:, 0]) is None and compact_vision_mask(None) is None


def _masks_seen_by_layers(model) -> list:
    seen = []

    def form(mask):  # the mask's rank, or for the compact form its rank and the counts of real patches
        if isinstance(mask, tuple):
            compact, counts, tag = mask
            assert tag == "real_first" and counts.dtype == torch.int32
            assert torch.equal(counts, (compact == 0).sum(-1).to(counts.dtype))
            # the rows arrive real-first: each image's real patches are a prefix
            prefix = torch.arange(compact.shape[-1])[None, :] < counts[:, None]
            assert torch.equal(compact == 0, prefix)
            return compact.dim(), tuple(counts.tolist())
        return mask.dim()

    for m in model.modules():
        if type(m).__name__ == "MllamaVisionAttention":
            m.register_forward_pre_hook(lambda mod, args, kw: seen.append(form(kw["attention_mask"])),
                                        with_kwargs=True)
    return seen


def test_the_encoder_hands_split_layers_the_compact_mask(tiny_checkpoint):
    folder = str(tiny_checkpoint("mllama"))
    batch = sample_batch(tiny_processor("mllama"), "mllama", n=2)
    seen = {}
    for label, patches in (("split", None), ("stock", {"vision_attention_split": False})):
        model, _ = FastVisionModel.from_pretrained(folder, load_in_4bit=True, dtype=torch.bfloat16, patches=patches)
        dims = _masks_seen_by_layers(model)
        with torch.no_grad():
            model(**batch)
        seen[label] = set(dims)
    assert seen["stock"] == {4} and len(seen["split"]) == 1
    rank, counts = seen["split"].pop()
    assert rank == 2 and len(counts) == batch["pixel_values"].shape[0] and min(counts) > 0


def test_a_split_layer_falling_back_rebuilds_the_exact_mask(tiny_checkpoint, monkeypatch):
    import hf_fastvision.archs._mllama_vision_attention as va

    model, _ = FastVisionModel.from_pretrained(str(tiny_checkpoint("mllama")), load_in_4bit=True, dtype=torch.float32)
    attn = next(m for m in model.modules() if type(m).__name__ == "MllamaVisionAttention")
    mask, _ = va.vision_mask([1, 2], 2, 7, 1, torch.float32)
    x = torch.randn(2, mask.shape[-1], attn.q_proj.in_features)
    monkeypatch.setattr(va, "_attention_dtype", lambda t: None)  # e.g. fp32 on CUDA: the stock path must run
    with torch.no_grad():
        got = attn(x, attention_mask=va.compact_vision_mask(mask))[0]
        with_counts = attn(x, attention_mask=va.with_real_counts(va.compact_vision_mask(mask)))[0]
        ref = original_forward(attn)(x, attention_mask=mask)[0]
    assert torch.equal(got, ref) and torch.equal(with_counts, ref)
