"""Background compilation of the bound Triton kernels (`training/precompile.py`), on CPU through the references.

On CPU nothing is compiled; these tests check which jobs a patched model plans (one per specialization), that each
job runs the op forward and backward without touching the model, and the opt-out. The GPU test
(`tests/gpu/test_precompile_gpu.py`) checks that the real first step then compiles none of those kernels.
"""

from __future__ import annotations

import pytest
import torch

from hf_fastvision import AutoFastVisionModel, FastVisionModel
from hf_fastvision.training import precompile as pc


@pytest.mark.parametrize("name", ["qwen2_5_vl", "gemma3"])
def test_jobs_are_one_per_specialization_and_run_without_touching_the_model(name, tiny_checkpoint):
    model = AutoFastVisionModel.from_pretrained(tiny_checkpoint(name), load_in_16bit=True)
    jobs = pc.plan_jobs(model)
    kinds = sorted({key[0] for key in jobs})
    assert "fused_loss" in kinds and ("rms_norm" in kinds), kinds
    norms = [m for m in model.modules() if m.__dict__.get("_hffv_patch") == "rms_norm"]
    widths = {m.weight.shape[-1] for m in norms}
    assert len([k for k in jobs if k[0] == "rms_norm"]) == len(
        {(m.weight.shape[-1], m.weight.requires_grad, m.__dict__["_hffv_offset"]) for m in norms}
    )  # one per (width, trainable, offset), not one per module
    assert len(norms) > len(widths)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    assert pc.precompile(model, background=False, cpu=True) == len(jobs)
    assert torch.equal(torch.get_rng_state(), rng)  # no random draws: the user's seeded streams are untouched
    assert all(p.grad is None for p in model.parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert pc.precompile(model, background=False, cpu=True) == 0  # each specialization once per model


def test_frozen_plans_the_weights_as_a_lora_set_up_leaves_them(tiny_checkpoint):
    model = AutoFastVisionModel.from_pretrained(tiny_checkpoint("qwen2_5_vl"), load_in_16bit=True,
                                                patches={"precompile": True})
    assert any(p.requires_grad for p in model.parameters())  # transformers' load leaves them trainable
    trainable = {k[4] for k in pc.plan_jobs(model) if k[0] in ("rms_norm", "fused_loss")}
    frozen = {k[4] for k in pc.plan_jobs(model, frozen=True) if k[0] in ("rms_norm", "fused_loss")}
    assert trainable == {True} and frozen == {False}
    calls = []
    real = pc.precompile
    try:  # get_peft_model starts the frozen plan before injecting, for_training adds what differs
        pc.precompile = lambda m, **kw: calls.append(kw.get("frozen", False)) or 0
        FastVisionModel.get_peft_model(model, r=4, lora_alpha=8)
    finally:
        pc.precompile = real
    assert calls == [True, False]


def test_on_cpu_nothing_starts_and_the_flag_turns_it_on(tiny_checkpoint):
    model = AutoFastVisionModel.from_pretrained(tiny_checkpoint("qwen2_5_vl"), load_in_16bit=True)
    assert pc.plan_jobs(model)
    assert pc.precompile(model) == 0  # CPU tensors: no Triton kernels to compile
    off = AutoFastVisionModel.from_pretrained(tiny_checkpoint("qwen2_5_vl"), load_in_16bit=True)  # the default
    calls = []
    real = pc.precompile
    try:
        pc.precompile = lambda m, **kw: calls.append(m) or 0
        FastVisionModel.for_training(off)
        assert calls == []
        on = AutoFastVisionModel.from_pretrained(tiny_checkpoint("qwen2_5_vl"), load_in_16bit=True,
                                                 patches={"precompile": True})
        FastVisionModel.for_training(on)
        assert calls == [on]
    finally:
        pc.precompile = real


def test_a_failing_job_is_swallowed_and_background_jobs_are_joined(tiny_checkpoint, caplog):
    model = AutoFastVisionModel.from_pretrained(tiny_checkpoint("qwen2_5_vl"), load_in_16bit=True)
    ran = []

    def boom() -> None:
        ran.append("boom")
        raise RuntimeError("no compiler")

    key = ("rms_norm", 1, torch.bfloat16, torch.device("cpu"))
    pc._guarded(key, boom, torch.device("cpu"))  # logs, does not raise
    assert ran == ["boom"]
    model.__dict__.pop(pc._DONE, None)
    assert pc.precompile(model, cpu=True) == len(pc.plan_jobs(model))  # background threads on CPU tensors
    pc.wait(timeout=60)
    assert not any(not f.done() for f in pc._PENDING)
