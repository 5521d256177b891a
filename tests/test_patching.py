"""Patched vs unpatched tiny models of every named architecture: same loss, logits and gradients."""

from __future__ import annotations

import pytest
import torch

from hf_fastvision import AutoFastVisionModel
from hf_fastvision.archs.tiny import NAMED_TINY_TYPES, sample_batch, tiny_processor
from hf_fastvision.patching import PatchOptions, apply_patches, patched_modules, unpatch
from hf_fastvision.tolerances import assert_close


def _pair(folder):
    plain = AutoFastVisionModel.from_pretrained(folder, load_in_16bit=True, patches=False)
    fast = AutoFastVisionModel.from_pretrained(folder, load_in_16bit=True)
    return plain, fast


@pytest.mark.parametrize("name", NAMED_TINY_TYPES)
def test_patched_matches_unpatched(name, tiny_checkpoint):
    folder = tiny_checkpoint(name)
    plain, fast = _pair(folder)
    kinds = set(patched_modules(fast).values())
    assert {"rms_norm", "fused_loss"} <= kinds or {"mlp", "fused_loss"} <= kinds, kinds
    assert not patched_modules(plain)
    batch = sample_batch(tiny_processor(name), name, n=2)
    plain.train(), fast.train()
    out_plain, out_fast = plain(**batch), fast(**batch)
    assert_close(out_fast.loss, out_plain.loss, dtype=torch.float32)
    out_plain.loss.backward()
    out_fast.loss.backward()
    grads_plain = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    grads_fast = {n: p.grad for n, p in fast.named_parameters() if p.grad is not None}
    assert grads_plain.keys() == grads_fast.keys()
    for n in grads_plain:
        torch.testing.assert_close(grads_fast[n], grads_plain[n], rtol=1e-4, atol=1e-5, msg=n)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        assert_close(fast(**inputs).logits, plain(**inputs).logits, dtype=torch.float32)


def test_num_items_in_batch_matches_transformers(tiny_checkpoint):
    plain, fast = _pair(tiny_checkpoint("qwen2_5_vl"))
    batch = sample_batch(tiny_processor("qwen2_5_vl"), "qwen2_5_vl", n=2)
    n_items = torch.tensor(37)
    assert_close(fast(**batch, num_items_in_batch=n_items).loss, plain(**batch, num_items_in_batch=n_items).loss,
                 dtype=torch.float32)


def test_idempotent_flags_and_unpatch(tiny_checkpoint):
    folder = tiny_checkpoint("gemma3")
    model = AutoFastVisionModel.from_pretrained(folder, load_in_16bit=True, patches={"fused_loss": False})
    assert "fused_loss" not in set(patched_modules(model).values())
    assert apply_patches(model, options={"fused_loss": False}) == {"rms_norm": 0, "rope": 0, "mlp": 0,
                                                                   "fused_loss": 0, "vision_attention": 0,
                                                                   "vision_states": 0, "cross_attention": 0}
    n = len(patched_modules(model))
    assert unpatch(model) == n and not patched_modules(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    with pytest.raises(ValueError, match="valid"):
        PatchOptions.from_value({"flash": True})


def test_generic_path_is_left_alone(tiny_checkpoint):
    model = AutoFastVisionModel.from_pretrained(tiny_checkpoint("llava_next"), load_in_16bit=True)
    assert not patched_modules(model)


def test_unpatched_context_restores_and_rebinds(tiny_checkpoint):
    from hf_fastvision.patching import unpatched

    model = AutoFastVisionModel.from_pretrained(tiny_checkpoint("qwen2_5_vl"), load_in_16bit=True)
    before = patched_modules(model)
    with unpatched(model):
        assert all("forward" not in m.__dict__ for m in model.modules() if "_hffv_patch" in m.__dict__)
    assert patched_modules(model) == before
    assert all("forward" in m.__dict__ for m in model.modules() if "_hffv_patch" in m.__dict__)


def test_for_inference_suspends_and_for_training_resumes(tiny_checkpoint):
    """Generation runs the stock forwards (what compile graphs and what `generate` is compared with); training
    gets the kernels back. The suspended state survives `unpatched()` and a second `for_inference`."""
    from hf_fastvision import FastVisionModel
    from hf_fastvision.patching import patches_active, unpatched

    model, _processor = FastVisionModel.from_pretrained(str(tiny_checkpoint("qwen2_5_vl")), load_in_4bit=False,
                                                        load_in_16bit=True)
    stock = type(model).forward
    bound = {n: m.__dict__["forward"] for n, m in model.named_modules() if "_hffv_patch" in m.__dict__}
    assert bound and patches_active(model)
    FastVisionModel.for_inference(model)
    FastVisionModel.for_inference(model)  # idempotent
    assert not patches_active(model)
    assert all("forward" not in m.__dict__ for m in model.modules() if "_hffv_patch" in m.__dict__)
    assert model.forward.__func__ is stock
    with unpatched(model):  # nothing to swap while suspended, and nothing re-bound on exit
        pass
    assert not patches_active(model)
    FastVisionModel.for_training(model)
    assert patches_active(model)
    now = {n: m.__dict__["forward"] for n, m in model.named_modules() if "_hffv_patch" in m.__dict__}
    assert now == bound


def _bound_forwards(model):
    return {n: m.__dict__.get("forward") for n, m in model.named_modules() if "_hffv_patch" in m.__dict__}


@pytest.mark.parametrize("name", ["qwen2_5_vl", "mllama", "gemma3"])
def test_patches_survive_train_and_eval_switches(name, tiny_checkpoint):
    # transformers >= 5.25 re-kernelizes its Hub-kernel layers (RMSNorm, ...) at every train()/eval() when
    # use_kernels is on (its default where `kernels` is installed), popping instance forwards: ours are kept
    model = AutoFastVisionModel.from_pretrained(tiny_checkpoint(name), load_in_16bit=True)
    before = _bound_forwards(model)
    assert before and all(f is not None for f in before.values())
    assert not getattr(model, "use_kernels", False)
    batch = sample_batch(tiny_processor(name), name, n=1)
    for mode in (True, False, True):
        model.train(mode)
        with torch.no_grad():
            model(**batch)
    assert _bound_forwards(model) == before


def test_patches_applied_to_a_model_transformers_loaded(tiny_checkpoint):
    # a model from plain transformers (Hub kernels on by default from 5.25) patched by apply_patches
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint("qwen2_5_vl"))
    apply_patches(model)
    before = _bound_forwards(model)
    assert before and not getattr(model, "use_kernels", False)
    model.train()
    model.eval()
    assert _bound_forwards(model) == before


def test_use_kernels_with_patches_is_refused(tiny_checkpoint):
    with pytest.raises(ValueError, match="patches=False"):
        AutoFastVisionModel.from_pretrained(tiny_checkpoint("qwen2_5_vl"), load_in_16bit=True, use_kernels=True)
