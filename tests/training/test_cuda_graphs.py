"""CUDA-graphed checkpointed layers (`training/cuda_graphs.py`), on CPU through the emulated graph backend.

The emulation keeps a graph's contract (static input buffers, outputs written into the same tensors on replay),
so keys, buffers, gradients, offload boxes and fallbacks are exercised here; real capture runs in
`tests/gpu/test_cuda_graphs_gpu.py`.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_fastvision import FastVisionModel
from hf_fastvision.archs.tiny import NAMED_TINY_TYPES, missing_dependencies, sample_batch
from hf_fastvision.training.checkpointing import disable_checkpointing, enable_checkpointing
from hf_fastvision.training.cuda_graphs import GraphedLayers, _flatten_call, host_values


def _llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).float()
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.model.layers:  # trainable, like LoRA weights: a few projections per layer
        layer.self_attn.q_proj.weight.requires_grad_(True)
        layer.mlp.down_proj.weight.requires_grad_(True)
    model.model.embed_tokens.weight.requires_grad_(True)  # so the first layer's input needs a gradient too
    model.train()
    return model


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _graphs(model) -> GraphedLayers:
    from hf_fastvision.training.checkpointing import _STATE_ATTR

    layer = next(m for m in model.modules() if _STATE_ATTR in m.__dict__)
    return layer.__dict__[_STATE_ATTR].manager.graphs


def _train(model, batches, lr=0.05):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    out = []
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        out.append((loss.detach(), _grads(model)))
        opt.step()
    return out


def _eager_and_graphed(steps: int):
    """Two identical tiny Llamas, checkpointed eagerly and with emulated graphs, and ``steps`` equal batches."""
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    ref_model, model = _llama(), _llama()
    enable_checkpointing(ref_model, "unsloth", cuda_graphs=False)
    enable_checkpointing(model, "unsloth", cuda_graphs="emulate")
    return [{"input_ids": ids, "labels": ids}] * steps, ref_model, model


def _assert_same_training(ref, got):
    for (l_ref, g_ref), (l_got, g_got) in zip(ref, got):
        torch.testing.assert_close(l_got, l_ref, rtol=1e-5, atol=1e-6)
        assert g_ref.keys() == g_got.keys()
        for n in g_ref:
            torch.testing.assert_close(g_got[n], g_ref[n], rtol=1e-4, atol=1e-6, msg=n)


def test_emulated_graphs_match_eager_over_steps():
    batches, ref_model, model = _eager_and_graphed(4)
    ref, got = _train(ref_model, batches), _train(model, batches)
    stats = _graphs(model).stats
    # step 1: eager forward, each layer captured in its backward; steps 2-4 replay
    assert stats["captures"] == 3 and stats["replays"] == 9 and stats["eager_calls"] == 3, stats
    # the three layers share class and signature: one eager forward warm-up before their captures, not three
    assert stats["forward_warmups"] == 1, stats
    # gradients reach the layer weights and, through the layer inputs, the embeddings
    assert all("model.embed_tokens.weight" in grads for _, grads in got)
    _assert_same_training(ref, got)
    # the output and the input's gradient reuse the input's buffers: no separate "out" or hidden-"grad" buffer
    slots = [key[0] for key in _graphs(model)._buffers]
    assert 0 in slots and ("grad_out", 0) in slots
    assert ("out", 0) not in slots and ("grad", 0) not in slots, slots


def test_a_layer_whose_output_layout_differs_from_its_class_warm_up_is_graphed_too():
    """The forward warm-up runs once per layer class and signature; the other layers' captures take the output
    layout from their own eager first call, so one returning another layout (here: other strides) is graphed too."""
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    batches, ref_model, model = [{"input_ids": ids, "labels": ids}] * 2, _llama(), _llama()
    inner = type(model.model.layers[-1]).forward

    def other_layout(self, *args, **kwargs):
        return inner(self, *args, **kwargs).transpose(0, 1).contiguous().transpose(0, 1)

    for m, graphs in ((ref_model, False), (model, "emulate")):
        last = m.model.layers[-1]
        last.forward = other_layout.__get__(last)  # before checkpointing wraps it
        enable_checkpointing(m, "unsloth", cuda_graphs=graphs)
    ref, got = _train(ref_model, batches), _train(model, batches)
    stats = _graphs(model).stats
    assert stats["forward_warmups"] == 1 and stats["captures"] == 3 and stats["failures"] == 0, stats
    for (l_ref, _), (l_got, _) in zip(ref, got):
        torch.testing.assert_close(l_got, l_ref, rtol=1e-5, atol=1e-6)


def test_a_layer_changing_its_output_layout_between_calls_fails_its_capture_and_runs_eagerly():
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    batches, ref_model, model = [{"input_ids": ids, "labels": ids}] * 2, _llama(), _llama()
    calls = [0]
    inner = type(model.model.layers[0]).forward

    def toggling(self, *args, **kwargs):
        calls[0] += 1
        out = inner(self, *args, **kwargs)
        return out.transpose(0, 1).contiguous().transpose(0, 1) if calls[0] % 2 else out

    for m, graphs in ((ref_model, False), (model, "emulate")):
        first = m.model.layers[0]
        first.forward = toggling.__get__(first)
        enable_checkpointing(m, "unsloth", cuda_graphs=graphs)
    ref, got = _train(ref_model, batches), _train(model, batches)
    stats = _graphs(model).stats
    assert stats["failures"] >= 1 and stats["captures"] == 2, stats  # the other two layers stay graphed
    assert "differs from the eager call's" in _graphs(model).last_failure
    for (l_ref, _), (l_got, _) in zip(ref, got):
        torch.testing.assert_close(l_got, l_ref, rtol=1e-5, atol=1e-6)


def test_a_pass_through_layer_does_not_share_its_input_buffer():
    from hf_fastvision.training.cuda_graphs import _can_share

    buf = torch.zeros(2, 3)
    assert _can_share(torch.ones(2, 3), buf)
    assert not _can_share(buf[:], buf)  # a view of the input: copying it into its own buffer would be a no-op race
    assert not _can_share(torch.ones(3, 2).t(), buf)  # another layout
    assert not _can_share(torch.ones(2, 3, dtype=torch.float64), buf)


def test_new_shapes_capture_up_to_max_keys_then_run_eagerly():
    model = _llama()
    enable_checkpointing(model, "unsloth", cuda_graphs="emulate")
    graphs = _graphs(model)
    graphs.max_keys = 1
    batches = []
    for n in (8, 8, 12, 12, 8):
        ids = torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(n))
        batches.append({"input_ids": ids, "labels": ids})
    ref_model = _llama()
    enable_checkpointing(ref_model, "unsloth", cuda_graphs=False)
    for (l_ref, _), (l_got, _) in zip(_train(ref_model, batches), _train(model, batches)):
        torch.testing.assert_close(l_got, l_ref, rtol=1e-5, atol=1e-6)
    # length 8 captured at its 2nd call and replayed at its 3rd; length 12 never captured (one key per layer)
    assert graphs.stats["captures"] == 3 and graphs.stats["replays"] == 6, graphs.stats


def test_unsupported_arguments_run_eagerly():
    assert _flatten_call((object(),), {}) is None
    key, tensors = _flatten_call((torch.zeros(2),), {"mask": None, "pair": (torch.ones(1), torch.ones(2))})
    assert len(tensors) == 3 and key[1][0] == ("mask", ("v", "NoneType", None))


def test_host_values_serve_small_int_tensors_without_repeat_syncs():
    cu = torch.tensor([0, 4, 8], dtype=torch.int32)
    key, _ = _flatten_call((), {"cu_seqlens": cu})
    assert key[1][0][1][0] == "host" and key[1][0][1][2] == (0, 4, 8)  # the values are part of the key
    assert host_values(cu) == [0, 4, 8]
    cu[1] = 3  # in-place change bumps the version: re-read
    assert host_values(cu) == [0, 3, 8]


def test_plain_checkpointing_graphs_too_and_disable_drops_them():
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": ids, "labels": ids}] * 3
    ref_model, model = _llama(), _llama()
    enable_checkpointing(ref_model, True, cuda_graphs=False)
    enable_checkpointing(model, True, cuda_graphs="emulate")  # plain mode: the input stays where it is
    for (l_ref, g_ref), (l_got, g_got) in zip(_train(ref_model, batches), _train(model, batches)):
        torch.testing.assert_close(l_got, l_ref, rtol=1e-5, atol=1e-6)
        for n in g_ref:
            torch.testing.assert_close(g_got[n], g_ref[n], rtol=1e-4, atol=1e-6, msg=n)
    assert _graphs(model).stats["replays"] == 6, _graphs(model).stats  # steps 2 and 3, 3 layers
    disable_checkpointing(model)
    from hf_fastvision.training.checkpointing import _STATE_ATTR

    assert not any(_STATE_ATTR in m.__dict__ for m in model.modules())
    enable_checkpointing(model, True, cuda_graphs=False)
    assert _graphs(model) is None


_VARLEN = {"vision_attention_split": "varlen", "cross_attention_split": "varlen"}


@pytest.mark.parametrize("name,ref_patches,graphed_patches,samples",
                         [(n, None, None, 2) for n in ("qwen2_5_vl", "qwen2_vl", "mllama", "gemma3", "llava")]
                         + [("mllama", {"vision_attention_split": False}, None, 2),
                            ("mllama", None, {"cross_attention_split": True}, 2),
                            ("mllama", _VARLEN, None, 1)]
                         + [(n, {"mlp_lean_recompute": False}, {"mlp_lean_recompute": True}, 2)
                            for n in ("qwen2_5_vl", "mllama", "llava")])
def test_emulated_graphs_match_eager_on_tiny_4bit_lora(name, ref_patches, graphed_patches, samples, tiny_checkpoint,
                                                       monkeypatch):
    """Vision blocks (cu_seqlens read on the host), cross-attention layers and text layers, 4-bit + fused LoRA.
    With `ref_patches`, the eager reference runs with those flags (Mllama: the stock masked vision attention) and
    the graphed run with the defaults (the split), which must still match; `graphed_patches` likewise for the
    graphed run (Mllama: the cross-attention split, whose compact mask is a layer argument). One Mllama sample:
    the graphed run takes both dense splits, whose shapes come from host-known counts in the layers' keys."""
    if missing := missing_dependencies(name):
        pytest.skip(f"needs {missing}")
    assert name in NAMED_TINY_TYPES
    dense_calls = []
    if samples == 1:
        import hf_fastvision.archs._mllama_cross_attention as ca
        import hf_fastvision.archs._mllama_vision_attention as va

        for module, fn in ((va, "dense_split_attention"), (ca, "dense_cross_attention")):
            real_fn = getattr(module, fn)
            monkeypatch.setattr(module, fn, lambda *a, _f=real_fn, _n=fn, **k: dense_calls.append(_n) or _f(*a, **k))
    results = []
    for graphs in (False, "emulate"):
        extra = {"patches": ref_patches} if not graphs and ref_patches else {}
        if graphs and graphed_patches:
            extra = {"patches": graphed_patches}
        model, processor = FastVisionModel.from_pretrained(str(tiny_checkpoint(name)), max_seq_length=256, **extra)
        peft_model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing="unsloth")
        with torch.no_grad():
            for pname, param in peft_model.named_parameters():
                if "lora_B" in pname:
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(pname))) * 0.2)
        enable_checkpointing(peft_model.get_base_model(), "unsloth", cuda_graphs=graphs)
        batch = sample_batch(processor, name, samples)
        dense_calls.clear()
        results.append(_train(peft_model, [batch] * 3, lr=0.01))
        if samples == 1:  # the reference took the varlen calls, the graphed run the dense ones
            assert (set(dense_calls) == {"dense_split_attention", "dense_cross_attention"}) == bool(graphs)
        if graphs:
            from hf_fastvision.training.checkpointing import checkpointed_layers

            graphed = _graphs(peft_model.get_base_model())
            stats = graphed.stats
            assert stats["captures"] > 0 and stats["replays"] >= 2 * stats["captures"], stats
            # every checkpointed block is graphed, whichever keyword its hidden state comes by
            expected = {type(m).__name__ for m in checkpointed_layers(peft_model.get_base_model())}
            assert {type(m).__name__ for m in graphed._layers.keys()} == expected
            if graphed_patches and graphed_patches.get("mlp_lean_recompute"):  # the lean MLP ran in the graphs
                assert any(m.__dict__.get("_hffv_lean_out") for m in model.modules())
            elif graphed_patches:  # the compact mask really reached the graphed cross-attention layers
                text = next(m for m in peft_model.modules() if type(m).__name__ == "MllamaTextModel")
                assert text.__dict__.get("_hffv_cross_split_ready") is True
            if ref_patches and "vision_attention_split" in ref_patches:
                # the split really ran: its one-time mask check passed in every vision attention
                split = [m for m in model.modules() if type(m).__name__ == "MllamaVisionAttention"]
                assert split and all(m.__dict__.get("_hffv_split_mask_ok") for m in split)
    for (l_ref, g_ref), (l_got, g_got) in zip(*results):
        torch.testing.assert_close(l_got, l_ref, rtol=1e-4, atol=1e-5)
        assert g_ref.keys() == g_got.keys()
        for n in g_ref:
            torch.testing.assert_close(g_got[n], g_ref[n], rtol=1e-3, atol=1e-5, msg=n)


def test_dropout_keeps_layers_eager(tiny_checkpoint):
    """A graphed forward and its graphed recompute would draw different dropout masks: such layers run eagerly."""
    model, processor = FastVisionModel.from_pretrained(str(tiny_checkpoint("qwen2_5_vl")), max_seq_length=256)
    peft_model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, lora_dropout=0.1)
    enable_checkpointing(peft_model.get_base_model(), "unsloth", cuda_graphs="emulate")
    batch = sample_batch(processor, "qwen2_5_vl", 2)
    _train(peft_model, [batch] * 3)
    stats = _graphs(peft_model.get_base_model()).stats
    assert stats["captures"] == 0 and stats["replays"] == 0 and stats["refused"] > 0, stats


def _failing_capture(monkeypatch, failing: str) -> list[str]:
    """Emulated captures raise (as a host sync inside a real capture does) for layers of class `failing`."""
    import hf_fastvision.training.cuda_graphs as cg

    real, real_capture, attempts = cg._EmulatedGraph.capture, cg.GraphedLayers._capture, []

    def capture(self, fn):
        if attempts and attempts[-1] == failing:
            raise RuntimeError("operation not permitted when stream is capturing")
        return real(self, fn)

    def tracking(self, layer, *args, **kwargs):
        attempts.append(type(layer).__name__)
        return real_capture(self, layer, *args, **kwargs)

    monkeypatch.setattr(cg._EmulatedGraph, "capture", capture)
    monkeypatch.setattr(cg.GraphedLayers, "_capture", tracking)
    return attempts


def test_a_failed_capture_is_not_retried_by_layers_of_the_same_class_and_shape(monkeypatch):
    attempts = _failing_capture(monkeypatch, "LlamaDecoderLayer")
    batches, ref_model, model = _eager_and_graphed(3)
    ref, got = _train(ref_model, batches), _train(model, batches)
    stats = _graphs(model).stats
    assert attempts == ["LlamaDecoderLayer"] and stats["failures"] == 1 and stats["captures"] == 0, (attempts, stats)
    _assert_same_training(ref, got)


def test_a_failed_capture_leaves_other_layer_classes_graphed(tiny_checkpoint, monkeypatch):
    attempts = _failing_capture(monkeypatch, "Qwen2_5_VLVisionBlock")
    model, processor = FastVisionModel.from_pretrained(str(tiny_checkpoint("qwen2_5_vl")), max_seq_length=256)
    peft_model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8)
    enable_checkpointing(peft_model.get_base_model(), "unsloth", cuda_graphs="emulate")
    _train(peft_model, [sample_batch(processor, "qwen2_5_vl", 2)] * 3, lr=0.01)
    stats = _graphs(peft_model.get_base_model()).stats
    assert stats["failures"] == attempts.count("Qwen2_5_VLVisionBlock") > 0, (attempts, stats)
    assert stats["captures"] == attempts.count("Qwen2_5_VLDecoderLayer") > 0, (attempts, stats)


def _train_counting_captures(capture_at: str):
    """Eager and graphed training of 3 steps with the given schedule: (eager results, graphed results, graphs,
    the capture count when each step's final norm runs, the capture count after step 1)."""
    batches, ref_model, model = _eager_and_graphed(3)
    graphs = _graphs(model)
    graphs.capture_at = capture_at  # what `patches={"cuda_graphs_capture": ...}` builds
    seen = []
    real_forward = model.model.norm.forward

    def norm_forward(x):  # runs after every layer's forward of a step
        seen.append(graphs.stats["captures"])
        return real_forward(x)

    model.model.norm.forward = norm_forward
    got = _train(model, batches[:1])
    after_step_1 = graphs.stats["captures"]
    got += _train(model, batches[1:])
    return _train(ref_model, batches), got, graphs, seen, after_step_1


def test_graphs_are_captured_in_the_first_backward_and_match_eager():
    assert _graphs(_eager_and_graphed(1)[2]).capture_at == "first_backward"  # the default
    ref, got, graphs, seen, after_step_1 = _train_counting_captures("first_backward")
    # none in step 1's forward; all three in its backward, so step 2's forward already replays
    assert seen == [0, 3, 3] and after_step_1 == 3, (seen, after_step_1)
    assert graphs.stats["captures"] == graphs.stats["backward_captures"] == 3, graphs.stats
    assert graphs.stats["replays"] == 6 and graphs.stats["eager_calls"] == 3, graphs.stats
    _assert_same_training(ref, got)


def test_second_forward_capture_keeps_the_earlier_schedule():
    ref, got, graphs, seen, after_step_1 = _train_counting_captures("second_forward")
    # step 1 eager; step 2's forward captures (before its final norm runs)
    assert seen == [0, 3, 3] and after_step_1 == 0, (seen, after_step_1)
    assert graphs.stats["backward_captures"] == 0, graphs.stats
    assert graphs.stats["replays"] == 6, graphs.stats  # steps 2 and 3: captured in step 2's forward, then replayed
    _assert_same_training(ref, got)


def test_two_forwards_before_the_first_backward_capture_once():
    """A second forward with the key while its first call waits for its backward captures there; both backwards
    then replay that capture."""
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    losses, grads = [], []
    for graphs in (False, "emulate"):
        model = _llama()
        enable_checkpointing(model, "unsloth", cuda_graphs=graphs)
        loss = model(input_ids=ids, labels=ids).loss + 0.5 * model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(_grads(model))
    stats = _graphs(model).stats
    assert stats["captures"] == 3 and stats["backward_captures"] == 0 and stats["replays"] == 3, stats
    _assert_same_training([(losses[0], grads[0])], [(losses[1], grads[1])])


def test_a_failed_capture_in_the_first_backward_runs_that_backward_eagerly(monkeypatch):
    import hf_fastvision.training.cuda_graphs as cg

    real = cg._EmulatedGraph.capture
    calls = []

    def capture(self, fn):
        calls.append(fn.__name__)
        if fn.__name__ == "bwd":
            raise RuntimeError("operation not permitted when stream is capturing")
        return real(self, fn)

    monkeypatch.setattr(cg._EmulatedGraph, "capture", capture)
    batches, ref_model, model = _eager_and_graphed(3)
    ref, got = _train(ref_model, batches), _train(model, batches)
    stats = _graphs(model).stats
    # the first (last layer's) capture fails; the other two layers of that class and shape never try
    assert calls == ["fwd", "bwd"] and stats["failures"] == 1 and stats["captures"] == 0, (calls, stats)
    assert stats["replays"] == 0 and stats["eager_calls"] == 9, stats
    _assert_same_training(ref, got)


def test_a_layer_returning_a_tuple_runs_checkpointed_eagerly():
    from transformers.modeling_layers import GradientCheckpointingLayer

    class Block(GradientCheckpointingLayer):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, hidden_states):
            return (torch.tanh(self.proj(hidden_states)),)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Block(), Block()])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)[0]
            return x.square().sum()

    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    grads = []
    for graphs in (False, "emulate"):
        torch.manual_seed(0)
        net = Net().train()
        enable_checkpointing(net, "unsloth", cuda_graphs=graphs)
        for _ in range(2):
            net.zero_grad()
            net(x.clone().requires_grad_(True)).backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
    stats = _graphs(net).stats
    assert stats["captures"] == 0 and stats["refused"] == 2, stats
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)


def test_the_capture_flag_reaches_the_graphs_and_is_validated(tiny_checkpoint):
    model, _ = FastVisionModel.from_pretrained(str(tiny_checkpoint("qwen2_5_vl")), max_seq_length=256,
                                               patches={"cuda_graphs_capture": "second_forward"})
    peft_model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8)
    enable_checkpointing(peft_model.get_base_model(), "unsloth", cuda_graphs="emulate")
    assert _graphs(peft_model.get_base_model()).capture_at == "second_forward"
    with pytest.raises(ValueError, match="first_backward"):
        FastVisionModel.from_pretrained(str(tiny_checkpoint("qwen2_5_vl")), patches={"cuda_graphs_capture": "later"})
