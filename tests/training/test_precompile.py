"""Compiling the bound Triton kernels ahead of the first step (`training/precompile.py`, `kernels/warmup.py`), on
CPU through the torch references.

On CPU nothing is compiled; these tests check which specs a patched model plans (one per specialization), that
each runs its op forward and backward without touching the model or a random generator, the helper process's
protocol, and the opt-in flag. The GPU test (`tests/gpu/test_precompile_gpu.py`) checks that the real first step
then compiles none of those kernels.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from hf_fastvision import AutoFastVisionModel, FastVisionModel
from hf_fastvision.kernels import warmup
from hf_fastvision.training import precompile as pc


@pytest.mark.parametrize("name", ["qwen2_5_vl", "gemma3"])
def test_specs_are_one_per_specialization_and_run_without_touching_the_model(name, tiny_checkpoint):
    model = AutoFastVisionModel.from_pretrained(tiny_checkpoint(name), load_in_16bit=True)
    specs = pc.job_specs(model)
    ops = sorted({s["op"] for s in specs})
    assert "fused_loss" in ops and "rms_norm" in ops, ops
    json.dumps(specs)  # plain data: the helper process gets them as JSON
    norms = [m for m in model.modules() if m.__dict__.get("_hffv_patch") == "rms_norm"]
    expected = {(m.weight.shape[-1], m.weight.requires_grad, m.__dict__["_hffv_offset"]) for m in norms}
    assert len([s for s in specs if s["op"] == "rms_norm"]) == len(expected) < len(norms)  # per width, not module
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    assert pc.precompile(model, background=False, cpu=True) == len(specs)
    assert torch.equal(torch.get_rng_state(), rng)  # no random draws: the user's seeded streams are untouched
    assert all(p.grad is None for p in model.parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert pc.precompile(model, background=False, cpu=True) == 0  # each specialization once per model


def test_every_spec_runs_its_op_forward_and_backward(tiny_checkpoint):
    model = AutoFastVisionModel.from_pretrained(tiny_checkpoint("gemma3"), load_in_16bit=True)
    ran = []
    real = warmup.run_spec
    for spec in pc.job_specs(model):
        real(spec, torch.device("cpu"))  # raises if a spec does not fit its op
        ran.append(spec["op"])
    assert {"rms_norm", "gated_mlp", "fused_loss", "rope"} <= set(ran), ran
    with pytest.raises(ValueError, match="unknown op"):
        real({"op": "nope", "dtype": "bfloat16"}, torch.device("cpu"))


def test_frozen_plans_the_weights_as_a_lora_set_up_leaves_them(tiny_checkpoint):
    model = AutoFastVisionModel.from_pretrained(tiny_checkpoint("qwen2_5_vl"), load_in_16bit=True,
                                                patches={"precompile": True})
    assert any(p.requires_grad for p in model.parameters())  # transformers' load leaves them trainable
    trains = {s["trains"] for s in pc.job_specs(model) if s["op"] in ("rms_norm", "fused_loss")}
    frozen = {s["trains"] for s in pc.job_specs(model, frozen=True) if s["op"] in ("rms_norm", "fused_loss")}
    assert trains == {True} and frozen == {False}
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
    assert pc.job_specs(model)
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
        process = AutoFastVisionModel.from_pretrained(tiny_checkpoint("qwen2_5_vl"), load_in_16bit=True,
                                                      patches={"precompile": "process"})
        FastVisionModel.for_training(process)  # the process mode starts at load (on CUDA), not in threads
        assert calls == [on]
    finally:
        pc.precompile = real
    with pytest.raises(ValueError, match="precompile must be"):
        AutoFastVisionModel.from_pretrained(tiny_checkpoint("qwen2_5_vl"), load_in_16bit=True,
                                            patches={"precompile": "threads"})


def test_a_failing_spec_is_swallowed_and_background_jobs_are_joined(tiny_checkpoint):
    warmup.guarded_run({"op": "nope", "dtype": "bfloat16"}, torch.device("cpu"))  # logs, does not raise
    model = AutoFastVisionModel.from_pretrained(tiny_checkpoint("qwen2_5_vl"), load_in_16bit=True)
    assert pc.precompile(model, cpu=True) == len(pc.job_specs(model))  # background threads on CPU tensors
    pc.wait(timeout=60)
    assert all(f.done() for f in pc._PENDING)


def test_the_helper_process_runs_the_specs_without_importing_the_package(tiny_checkpoint):
    """The helper (`warmup.helper_command`) reads JSON specs on stdin and exits 0, importing only the kernels."""
    model = AutoFastVisionModel.from_pretrained(tiny_checkpoint("gemma3"), load_in_16bit=True)
    specs = pc.job_specs(model, frozen=True)
    cmd = warmup.helper_command(0)
    cmd[2] = ("try:\n    " + cmd[2] + "\nfinally:\n    import os, sys\n"
              "    print(os.nice(0))\n"
              "    print(sorted(m for m in sys.modules if m.startswith('hf_fastvision')))")
    done = subprocess.run(cmd, input=json.dumps(specs), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    *_, niceness, modules = done.stdout.strip().splitlines()
    loaded = eval(modules)  # noqa: S307 - our own print
    assert "hf_fastvision.kernels" in loaded and "hf_fastvision.auto" not in loaded, loaded
    if hasattr(os, "nice"):  # it yields the CPU to the training process
        assert int(niceness) == min(19, os.nice(0) + warmup.NICENESS)


def test_start_process_patches_the_meta_model_and_hands_over_frozen_specs(tiny_checkpoint, monkeypatch):
    from transformers import AutoConfig

    from hf_fastvision.loading import arch_for
    from hf_fastvision.quantization import meta_model
    from hf_fastvision.registry import get_arch  # noqa: F401  (the registry the loader reads)

    folder = tiny_checkpoint("qwen2_5_vl")
    config = AutoConfig.from_pretrained(folder)
    model_class = type(AutoFastVisionModel.from_pretrained(folder, load_in_16bit=True))
    meta = meta_model(config, model_class)
    started = {}

    class FakePopen:
        def __init__(self, cmd, stdin=None, **kw):
            started["cmd"] = cmd
            self.stdin = self
            self.data = b""

        def write(self, data):
            started["specs"] = json.loads(data)

        def close(self):
            pass

        def poll(self):
            return None

    import hf_fastvision.kernels as kernels

    monkeypatch.setattr(pc.subprocess, "Popen", FakePopen)
    monkeypatch.setattr(kernels, "HAS_TRITON", True)
    proc = pc.start_process(meta, arch_for(config, folder), pc_options(), torch.device("cuda", 1), torch.bfloat16)
    assert isinstance(proc, FakePopen) and started["cmd"][-1] == "1"
    assert {s["op"] for s in started["specs"]} >= {"rms_norm", "fused_loss"}
    assert all(not s.get("trains", False) for s in started["specs"])  # as after the LoRA set-up
    # the meta model is fp32; the specs carry the load's dtype
    assert {s["dtype"] for s in started["specs"]} == {"bfloat16"}
    assert {s["weight_dtype"] for s in started["specs"] if "weight_dtype" in s} == {"bfloat16"}
    assert pc.start_process(meta, arch_for(config, folder), pc_options(), torch.device("cpu"), torch.bfloat16) is None
    # a nearly full device gets no second CUDA context
    started.clear()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (pc.MIN_FREE_BYTES - 1, 80 << 30))
    assert pc.start_process(meta, arch_for(config, folder), pc_options(), torch.device("cuda", 1), torch.bfloat16) is None
    assert "cmd" not in started
    pc._PROCESSES.clear()


def pc_options():
    from hf_fastvision.patching import PatchOptions

    return PatchOptions(precompile="process")


def test_the_norm_runs_both_row_count_variants(monkeypatch):
    """Triton specializes the backward's row count on divisibility by 16: the warm-up launches both variants."""
    import hf_fastvision.kernels as kernels

    rows = []

    def recording(x, weight, eps, offset=0.0):
        rows.append(x.shape[0])
        return x * weight

    monkeypatch.setattr(kernels, "rms_norm", recording)
    spec = {"op": "rms_norm", "width": 32, "dtype": "float32", "weight_dtype": "float32", "trains": True,
            "offset": 0.0, "eps": 1e-6}
    warmup.run_spec(spec, torch.device("cpu"))
    assert [r % 16 == 0 for r in rows] == [True, False]


@pytest.mark.parametrize("name", ["qwen2_5_vl", "mllama"])
def test_rope_specs_describe_the_real_rotary_calls(name, tiny_checkpoint, monkeypatch):
    """Each rotary call of a bf16 training forward (text: q/k views of their projections; Qwen-VL towers: slices
    of the fused qkv with fp32 cos/sin) matches one planned spec: heads, head dim, q and cos dtypes, layout."""
    import hf_fastvision.kernels.rope as rope

    model = FastVisionModel.from_pretrained(tiny_checkpoint(name), max_seq_length=256, dtype=torch.bfloat16,
                                            load_in_16bit=True)[0]
    planned = {(s["layout"], s["q_heads"], s["kv_heads"], s["head_dim"], s["dtype"], s["cos_dtype"])
               for s in pc.job_specs(model, frozen=True) if s["op"] == "rope"}
    seen = set()
    # the references: what the fused entry points call on CPU (the patched text forwards hold the entry point)
    for fn, layout in (("apply_rotary_pos_emb_ref", "text"), ("apply_rotary_pos_emb_vision_ref", "qkv")):
        def recording(q, k, cos, sin, *args, _real=getattr(rope, fn), _layout=layout, **kwargs):
            # heads are dim 1 of both layouts: [B, H, S, D] (text) and [S, H, D] (the towers)
            seen.add((_layout, q.shape[1], k.shape[1], q.shape[-1], str(q.dtype)[6:], str(cos.dtype)[6:]))
            return _real(q, k, cos, sin, *args, **kwargs)

        monkeypatch.setattr(rope, fn, recording)
    from hf_fastvision.archs.tiny import sample_batch, tiny_processor

    batch = sample_batch(tiny_processor(name), name, n=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(**batch).loss.backward()
    assert seen and seen == planned, (seen, planned)
    assert {layout for layout, *_ in planned} == ({"text", "qkv"} if name == "qwen2_5_vl" else {"text"})


def test_the_rope_warm_up_runs_both_layouts_and_row_variants(monkeypatch):
    import hf_fastvision.kernels.rope as rope

    calls = []
    for fn in ("apply_rotary_pos_emb", "apply_rotary_pos_emb_vision"):
        def recording(q, k, cos, sin, _real=getattr(rope, fn), _fn=fn):
            calls.append((_fn, tuple(q.shape), q.stride(), cos.dtype))
            return _real(q, k, cos, sin)

        monkeypatch.setattr(rope, fn, recording)
    base = {"op": "rope", "q_heads": 4, "kv_heads": 2, "head_dim": 16, "dtype": "bfloat16"}
    warmup.run_spec({**base, "layout": "text", "cos_dtype": "bfloat16"}, torch.device("cpu"))
    warmup.run_spec({**base, "kv_heads": 4, "layout": "qkv", "cos_dtype": "float32"}, torch.device("cpu"))
    assert [(fn, shape[2] if fn.endswith("emb") else shape[0]) for fn, shape, _, _ in calls] == [
        ("apply_rotary_pos_emb", 16), ("apply_rotary_pos_emb", 17),
        ("apply_rotary_pos_emb_vision", 16), ("apply_rotary_pos_emb_vision", 17)]
    assert calls[0][2] == (16 * 64, 16, 64, 1)  # q: a [B, S, H*D] projection viewed as [B, H, S, D]
    assert calls[2][2] == (3 * 64, 16, 1)  # q: a slice of the fused [S, 3, H, D] projection
    assert [c[3] for c in calls] == [torch.bfloat16] * 2 + [torch.float32] * 2
