"""Mllama's model frees the vision output once it is projected (patch flag `vision_states`, training only): the
fp32 vision output is gone before the text model runs, where stock keeps it; outside training the stock forward
runs. Same values: `test_mllama_vision_encoder.py::test_a_checkpointed_4bit_lora_step_is_unchanged`."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from hf_fastvision import FastVisionModel
from hf_fastvision.archs.tiny import lora_step, sample_batch, tiny_processor
from hf_fastvision.patching import patched_modules

pytest.importorskip("bitsandbytes")


def _lora_model(folder: str, patches=None):
    model, _ = FastVisionModel.from_pretrained(folder, load_in_4bit=True, dtype=torch.float32, patches=patches)
    return FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, lora_dropout=0.0, finetune_vision_layers=True,
                                          random_state=0)


def _vision_output_alive_at_the_text_model(model, batch) -> bool:
    base = model.get_base_model().model  # MllamaModel
    refs, alive = [], []

    def check(module, args) -> None:  # a pre-hook returning anything but None would replace the arguments
        gc.collect()
        alive.append(all(r() is not None for r in refs))

    hooks = [
        base.vision_model.register_forward_hook(lambda m, a, out: refs.append(weakref.ref(out.last_hidden_state))),
        base.language_model.register_forward_pre_hook(check),
    ]
    try:
        loss = model(**batch).loss
    finally:
        for h in hooks:
            h.remove()
    assert refs and len(alive) == 1
    if loss.requires_grad:
        loss.backward()
    return alive[0]


def test_in_training_the_vision_output_is_freed_before_the_text_model(tiny_checkpoint):
    folder = str(tiny_checkpoint("mllama"))
    batch = sample_batch(tiny_processor("mllama"), "mllama", n=2)
    lean, stock = _lora_model(folder), _lora_model(folder, {"vision_states": False})
    assert patched_modules(lean.get_base_model())["model"] == "vision_states"
    assert "model" not in patched_modules(stock.get_base_model())
    lean.train(), stock.train()
    assert _vision_output_alive_at_the_text_model(stock, batch)  # the stock frame keeps it: the test can tell
    assert not _vision_output_alive_at_the_text_model(lean, batch)
    # some vision LoRA weight still gets its gradient through the projected states
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lean.named_parameters()
               if "vision_model" in n and "lora_" in n)


def test_outside_training_the_stock_forward_runs(tiny_checkpoint):
    model = _lora_model(str(tiny_checkpoint("mllama")))
    model.eval()
    batch = sample_batch(tiny_processor("mllama"), "mllama", n=2)
    with torch.no_grad():
        assert _vision_output_alive_at_the_text_model(model, batch)


def test_conflicting_inputs_keep_the_stock_error(tiny_checkpoint):
    model = _lora_model(str(tiny_checkpoint("mllama")))
    model.train()
    batch = sample_batch(tiny_processor("mllama"), "mllama", n=2)
    states = torch.zeros(2, 4, model.get_base_model().config.text_config.hidden_size)
    with pytest.raises(ValueError, match="cannot be provided simultaneously"):
        model(**batch, cross_attention_states=states)


def test_the_prepared_cross_mask_is_freed_and_the_layers_get_the_compact_form(tiny_checkpoint, monkeypatch):
    import transformers.models.mllama.modeling_mllama as mm

    from hf_fastvision.archs._mllama_cross_attention import is_compact

    real = mm._prepare_cross_attention_mask
    prepared = []

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        prepared.append(weakref.ref(out[0]))
        return out

    monkeypatch.setattr(mm, "_prepare_cross_attention_mask", spy)
    folder = str(tiny_checkpoint("mllama"))
    batch = sample_batch(tiny_processor("mllama"), "mllama", n=2)
    for patches, freed in ((None, True), ({"vision_states": False}, False)):
        prepared.clear()
        model = _lora_model(folder, patches)
        model.train()
        base = model.get_base_model().model
        alive, layer_masks, handed = [], [], []

        def check(module, args, kwargs) -> None:
            gc.collect()
            alive.append([r() is not None for r in prepared])
            handed.append(kwargs.get("cross_attention_mask"))

        cross = next(m for m in base.language_model.modules() if type(m).__name__ == "MllamaTextCrossAttention")
        hooks = [base.language_model.register_forward_pre_hook(check, with_kwargs=True),
                 cross.register_forward_pre_hook(
                     lambda m, a, kw: layer_masks.append(kw.get("attention_mask")) and None, with_kwargs=True)]
        try:
            model(**batch).loss.backward()
        finally:
            for h in hooks:
                h.remove()
        assert len(alive) == 1 and len(alive[0]) == 1  # one prepared mask, by us or by the stock forward
        if freed:  # ours is dead before the text model runs, which is handed no mask (it gets the compact one)
            assert alive[0] == [False] and handed == [None], (alive, handed)
        else:  # stock hands the text model the full float mask (5.17: an indexed copy of the prepared one)
            assert handed[0].dim() == 4 and handed[0].is_floating_point()
        assert layer_masks and all(is_compact(m) for m in layer_masks)  # both ways the layers get (p, K)


def test_checkpointed_decoder_layers_get_none_for_inputs_they_never_read(tiny_checkpoint, monkeypatch):
    """The spec's ``unused_layer_kwargs``: in training the self-attention decoder layers get None for the
    cross-attention inputs they never read (nothing held, copied or keyed for them), the cross-attention layers
    None for the rotary inputs but their own; the step is unchanged."""
    from transformers.models.mllama import modeling_mllama as mm

    import hf_fastvision.training.checkpointing as ckpt

    seen = {"self": [], "cross": []}
    for cls, label in ((mm.MllamaSelfAttentionDecoderLayer, "self"), (mm.MllamaCrossAttentionDecoderLayer, "cross")):
        def record(self, *args, _forward=cls.forward, _label=label, **kwargs):
            cross = kwargs.get("cross_attention_states") is not None and kwargs.get("cross_attention_mask") is not None
            seen[_label].append((cross, kwargs.get("position_embeddings") is not None))
            return _forward(self, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", record)
    folder = str(tiny_checkpoint("mllama"))
    _, loss, grads = lora_step(folder, "mllama", dtype=torch.float32)
    assert set(seen["self"]) == {(False, True)} and set(seen["cross"]) == {(True, False)}
    monkeypatch.setattr(ckpt, "_spec_unused_kwargs", lambda model: {})
    seen["self"].clear()
    seen["cross"].clear()
    _, loss_ref, grads_ref = lora_step(folder, "mllama", dtype=torch.float32)
    assert set(seen["self"]) == set(seen["cross"]) == {(True, True)}  # without the entry: every input
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)
    assert set(grads) == set(grads_ref)
    for n, g in grads_ref.items():
        assert torch.equal(grads[n], g), n
