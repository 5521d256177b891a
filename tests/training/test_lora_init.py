"""The fast LoRA set-up (`training/lora_init.py`) gives every adapter the very tensors peft's own path gives it."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from hf_fastvision import FastVisionModel
from hf_fastvision.archs.tiny import NAMED_TINY_TYPES
from hf_fastvision.training import lora_init


def _adapters(peft_model):
    return {n: p for n, p in peft_model.named_parameters() if "lora_" in n}


def _both(folder, **kwargs):
    out, load = [], kwargs.pop("load", {})
    for fast in (False, True):
        model, _ = FastVisionModel.from_pretrained(str(folder), **load)
        out.append(FastVisionModel.get_peft_model(model, fast_lora_init=fast, **kwargs))
    return out


def _assert_same(ref, fast):
    a, b = _adapters(ref), _adapters(fast)
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        x, y = a[name], b[name]
        assert (x.dtype, x.device, x.shape, x.requires_grad) == (y.dtype, y.device, y.shape, y.requires_grad), name
        assert torch.equal(x, y), name
    assert any(p.abs().sum() > 0 for n, p in a.items() if "lora_A" in n)  # not all zeros: A really is drawn
    assert all(not p.any() for n, p in a.items() if "lora_B" in n)
    # nothing else changed either: frozen weights, trainable flags, the peft config
    ref_frozen = {n: p for n, p in ref.named_parameters() if "lora_" not in n}
    fast_frozen = {n: p for n, p in fast.named_parameters() if "lora_" not in n}
    assert ref_frozen.keys() == fast_frozen.keys()
    assert all(not p.requires_grad for p in fast_frozen.values())
    assert ref.peft_config["default"].to_dict() == fast.peft_config["default"].to_dict()


@pytest.mark.parametrize("name", NAMED_TINY_TYPES)
def test_same_adapters_as_peft_4bit(name, tiny_checkpoint):
    ref, fast = _both(tiny_checkpoint(name), r=8, lora_alpha=16, random_state=1234)
    _assert_same(ref, fast)


@pytest.mark.parametrize("name", ["qwen2_vl", "mllama"])
def test_same_adapters_as_peft_16bit_and_rslora(name, tiny_checkpoint):
    # 16-bit base layers: peft casts each adapter to the base weight's dtype, then upcasts it to fp32
    ref, fast = _both(tiny_checkpoint(name), load={"load_in_16bit": True, "dtype": torch.bfloat16}, r=4,
                      lora_alpha=8, use_rslora=True, random_state=7)
    _assert_same(ref, fast)


def test_global_generator_untouched_and_seed_matters(tiny_checkpoint):
    folder = tiny_checkpoint("qwen2_vl")
    torch.manual_seed(99)
    expected = torch.rand(3)
    torch.manual_seed(99)
    model, _ = FastVisionModel.from_pretrained(str(folder))
    fast = FastVisionModel.get_peft_model(model, r=8, random_state=1)
    assert torch.equal(torch.rand(3), expected)  # the set-up drew from its own generator
    model2, _ = FastVisionModel.from_pretrained(str(folder))
    other = FastVisionModel.get_peft_model(model2, r=8, random_state=2)
    a1 = [p for n, p in fast.named_parameters() if "lora_A" in n][0]
    a2 = [p for n, p in other.named_parameters() if "lora_A" in n][0]
    assert not torch.equal(a1, a2)


def test_unsupported_configs_take_peft_path(tiny_checkpoint):
    model, _ = FastVisionModel.from_pretrained(str(tiny_checkpoint("qwen2_vl")))
    assert lora_init.supported(model, LoraConfig(r=8, target_modules=["q_proj"])) is None
    assert "use_dora" in lora_init.supported(model, LoraConfig(r=8, target_modules=["q_proj"], use_dora=True))
    assert "init_lora_weights" in lora_init.supported(
        model, LoraConfig(r=8, target_modules=["q_proj"], init_lora_weights="gaussian"))
    assert "bias" in lora_init.supported(model, LoraConfig(r=8, target_modules=["q_proj"], bias="all"))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert "default dtype" in lora_init.supported(model, LoraConfig(r=8, target_modules=["q_proj"]))
    finally:
        torch.set_default_dtype(previous)
    # through get_peft_model: DoRA (needs the base weights) still works, via peft's own path
    peft_model = FastVisionModel.get_peft_model(model, r=4, use_dora=True)
    assert all(p.device.type != "meta" for p in peft_model.parameters())


def test_draws_match_peft_layer_init():
    # the stream alignment on its own: peft's LoRA Linear creation order, reproduced by draw_lora_a
    from peft.tuners.lora import Linear as LoraLinear

    shapes = [(24, 40), (40, 24), (7, 5)]
    bases = [torch.nn.Linear(i, o) for i, o in shapes]  # built before seeding: their own init draws too
    torch.manual_seed(5)
    expected = []
    for base in bases:
        layer = LoraLinear(base, "default", config=LoraConfig(r=4, lora_alpha=4), r=4, lora_alpha=4)
        expected.append(layer.lora_A["default"].weight.detach().flatten())
    got = lora_init.draw_lora_a(shapes, r=4, seed=5)
    assert torch.equal(got, torch.cat(expected))


def test_fast_path_taken_when_peft_get_peft_model_is_wrapped(tiny_checkpoint, monkeypatch):
    # a timer or profiler around peft.get_peft_model (as bench_qlora's load splits do) must not switch it off
    import peft

    real = peft.get_peft_model
    monkeypatch.setattr(peft, "get_peft_model", lambda *a, **k: real(*a, **k))
    calls = []
    real_materialize = lora_init._materialize
    monkeypatch.setattr(lora_init, "_materialize", lambda *a, **k: calls.append(1) or real_materialize(*a, **k))
    model, _ = FastVisionModel.from_pretrained(str(tiny_checkpoint("qwen2_vl")))
    assert lora_init.supported(model, LoraConfig(r=8, target_modules=["q_proj"])) is None
    FastVisionModel.get_peft_model(model, r=8)
    assert calls == [1]


def test_non_linear_target_takes_peft_path_with_same_result(tiny_checkpoint):
    # Qwen2-VL's patch embedding is a Conv3d: peft wraps it with a conv LoRA the fast path does not model
    folder = tiny_checkpoint("qwen2_vl")
    targets = ["q_proj", "v_proj", "visual.patch_embed.proj"]
    model, _ = FastVisionModel.from_pretrained(str(folder))
    assert lora_init.inject(model, LoraConfig(r=4, target_modules=targets), seed=0) is None
    assert not hasattr(model, "peft_config") and not any("lora_" in n for n, _ in model.named_parameters())
    ref, fast = _both(folder, r=4, target_modules=targets, random_state=3)
    assert any("patch_embed.proj.lora_A" in n for n, _ in fast.named_parameters())
    _assert_same(ref, fast)



@pytest.mark.parametrize("r", [1, 4, 16])
def test_two_call_draw_equals_the_layer_by_layer_draw(r):
    # one uniform_ for the two discarded initialisations, one with kaiming's bounds: peft's stream bit for bit
    assert lora_init._two_calls_aligned()
    shapes = [(1, 1), (3, 7), (37, 11), (5, 300), (1280, 3420), (3584, 512), (11, 1)]
    for seed in (0, 3407, 2**33 + 5):  # a seed past 32 bits too
        assert torch.equal(lora_init.draw_lora_a(shapes, r, seed), lora_init.draw_lora_a_reference(shapes, r, seed))


def test_empty_plan_draws_nothing():
    assert lora_init.draw_lora_a([], 8, 0).numel() == 0


@pytest.mark.parametrize("where", ["thread", "inline"])
def test_inline_and_threaded_draws_give_peft_adapters(where, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("HF_FASTVISION_LORA_DRAW", where)
    ref, fast = _both(tiny_checkpoint("qwen2_vl"), r=8, lora_alpha=16, random_state=21)
    _assert_same(ref, fast)


def test_switch_interval_lowered_for_the_injection_then_restored(tiny_checkpoint, monkeypatch):
    # the drawing thread gets the GIL back quickly while peft's surgery runs; the user's setting returns after
    import sys

    import peft

    seen = []
    real = peft.get_peft_model
    monkeypatch.setattr(peft, "get_peft_model", lambda *a, **k: seen.append(sys.getswitchinterval()) or real(*a, **k))
    before = sys.getswitchinterval()
    model, _ = FastVisionModel.from_pretrained(str(tiny_checkpoint("qwen2_vl")))
    FastVisionModel.get_peft_model(model, r=8)
    assert len(seen) == 1 and seen[0] == pytest.approx(lora_init.SWITCH_INTERVAL) and sys.getswitchinterval() == before


@pytest.mark.parametrize("name", ["qwen2_5_vl", "mllama", "gemma3"])
def test_target_matcher_agrees_with_peft(name, tiny_checkpoint):
    # the plan's set lookups must select exactly the modules peft's own check selects (a wrong plan would only
    # cost a second draw, so the adapter tests above cannot see it)
    from peft.tuners.tuners_utils import check_target_module_exists

    from hf_fastvision.training.lora import lora_target_modules

    model, _ = FastVisionModel.from_pretrained(str(tiny_checkpoint(name)))
    names = [n for n, _ in model.named_modules() if n]
    full = lora_target_modules(model)
    configs = [
        LoraConfig(target_modules=full),  # what get_peft_model passes: full paths
        LoraConfig(target_modules=["q_proj", "v_proj", "mlp.down_proj", "layers.0.self_attn.o_proj"]),  # suffixes
        LoraConfig(target_modules=[full[0].rsplit(".", 1)[0], "nothing_here"]),  # a container's path
        LoraConfig(target_modules=r".*\.(q_proj|k_proj)"),  # a regex: peft's own check
        LoraConfig(target_modules=["q_proj", "k_proj"], exclude_modules=["k_proj"]),  # exclusions: peft's own
    ]
    for config in configs:
        matches = lora_init._target_matcher(config)
        expected = [n for n in names if (f := check_target_module_exists(config, n)) and type(f).__name__ != "_ExcludedModule"]
        assert [n for n in names if matches(n)] == expected, config.target_modules
        assert expected or config is configs[2]
    assert [n for n in names if lora_init._target_matcher(configs[0])(n)] == full


def test_set_up_runs_beside_a_slow_draw_and_waits_for_it(tiny_checkpoint, monkeypatch):
    # kernels and training set-up proceed while A is drawn; get_peft_model returns only once A holds its numbers
    import sys
    import time

    import hf_fastvision.training.lora as lora

    order = []
    real_draw, real_finish = lora_init.draw_lora_a, lora._finish_set_up
    monkeypatch.setattr(lora_init, "draw_lora_a", lambda *a: time.sleep(0.3) or order.append("drawn") or real_draw(*a))
    monkeypatch.setattr(lora, "_finish_set_up", lambda *a: order.append("set-up") or real_finish(*a))
    before = sys.getswitchinterval()
    ref, fast = _both(tiny_checkpoint("qwen2_vl"), r=8, lora_alpha=16, random_state=5)
    assert order == ["set-up", "set-up", "drawn"]  # peft's path (first) draws nothing through draw_lora_a
    _assert_same(ref, fast)
    assert lora_init.LAST_DRAW["wall_s"] >= 0.3 and sys.getswitchinterval() == before


def test_failed_set_up_still_joins_the_draw_and_restores_the_switch_interval(tiny_checkpoint, monkeypatch):
    import sys
    import threading

    import hf_fastvision.training.lora as lora

    before = sys.getswitchinterval()

    def boom(*args):
        raise RuntimeError("set-up failed")

    monkeypatch.setattr(lora, "_finish_set_up", boom)
    model, _ = FastVisionModel.from_pretrained(str(tiny_checkpoint("qwen2_vl")))
    with pytest.raises(RuntimeError, match="set-up failed"):
        FastVisionModel.get_peft_model(model, r=8)
    assert sys.getswitchinterval() == before
    assert not any(t.name == "hffv-lora-init" and t.is_alive() for t in threading.enumerate())
