"""The lean MLP recompute (`training/lean_mlp.py`, patch flag `mlp_lean_recompute`): in checkpointed layers whose
MLP output only enters the residual add, the gated MLP saves only its input, returns zeros in the recompute and
recomputes gate/up per chunk in its backward. The loss and every gradient equal the plain MLP's; the path
really runs (skipped recomputes, several chunks, the fused down-projection backward); layers outside the spec's
list and calls outside checkpointing keep the plain MLP. The emulated CUDA-graph case is in test_cuda_graphs.py."""

from __future__ import annotations

import pytest
import torch

import hf_fastvision.training.lean_mlp as lean
from hf_fastvision import FastVisionModel
from hf_fastvision.archs.tiny import lora_step

pytest.importorskip("bitsandbytes")

LEAN = {"mlp_lean_recompute": True}
PLAIN = {"mlp_lean_recompute": False}  # the reference: the plain fused MLP (the lean one is the default)


class _Spy:
    """Counts what the lean path does: skipped recomputes, which backward ran (graph-free or through autograd),
    and the fused 4-bit LoRA gradient calls (per chunk: down, gate, up graph-free; down only through autograd)."""

    def __init__(self, monkeypatch) -> None:
        self.calls = self.skipped = self.graph_free = self.autograd = self.lora_grads = 0
        import hf_fastvision.kernels.lora_linear_4bit as k

        real_apply, real_grads = lean._LeanMLPFunction.apply, k.lora_linear_4bit_grads
        real_free, real_autograd = lean._backward_fused, lean._backward_autograd

        def apply(*args):
            self.calls += 1
            self.skipped += args[4] is not None
            return real_apply(*args)

        def grads(*a, **kw):
            self.lora_grads += 1
            return real_grads(*a, **kw)

        def graph_free(*a, **kw):
            self.graph_free += 1
            return real_free(*a, **kw)

        def through_autograd(*a, **kw):
            self.autograd += 1
            return real_autograd(*a, **kw)

        monkeypatch.setattr(lean._LeanMLPFunction, "apply", apply)
        monkeypatch.setattr(k, "lora_linear_4bit_grads", grads)
        monkeypatch.setattr(lean, "_backward_fused", graph_free)
        monkeypatch.setattr(lean, "_backward_autograd", through_autograd)


def _chunk(size: int):
    def configure(model) -> None:
        for module in model.modules():
            if "_hffv_lean_chunk" in module.__dict__:
                module.__dict__["_hffv_lean_chunk"] = size
    return configure


def _assert_same(loss, grads, loss_ref, grads_ref):
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert set(grads) == set(grads_ref)
    for n, g in grads_ref.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "mllama", "llava", "mistral3", "idefics3"])
def test_a_checkpointed_4bit_lora_step_equals_the_plain_mlp(name, tiny_checkpoint, monkeypatch):
    folder = str(tiny_checkpoint(name))
    ref, loss_ref, grads_ref = lora_step(folder, name, PLAIN, dtype=torch.float32)
    spy = _Spy(monkeypatch)
    model, loss, grads = lora_step(folder, name, LEAN, dtype=torch.float32, configure=_chunk(5))
    n_lean = sum("_hffv_lean_chunk" in m.__dict__ for m in model.modules())
    assert n_lean > 0
    # every lean MLP skipped its recompute once and ran the graph-free backward (LoRA on its three 4-bit
    # projections) in several chunks of 5 rows: three fused gradient calls per chunk
    assert spy.calls == 2 * n_lean and spy.skipped == n_lean, (spy.calls, spy.skipped, n_lean)
    assert spy.graph_free == n_lean and spy.autograd == 0, (spy.graph_free, spy.autograd, n_lean)
    assert spy.lora_grads % 3 == 0 and spy.lora_grads // 3 > n_lean, (spy.lora_grads, n_lean)
    assert [n for n in grads_ref if "mlp" in n and "lora_" in n]
    _assert_same(loss, grads, loss_ref, grads_ref)


@pytest.mark.parametrize("name", ["qwen2_5_vl", "mllama"])
def test_one_chunk_returns_its_own_output_and_gradient(name, tiny_checkpoint, monkeypatch):
    """Rows that fit one chunk (the default chunk at these sizes): no buffer, no copy, the same values."""
    folder = str(tiny_checkpoint(name))
    _, loss_ref, grads_ref = lora_step(folder, name, PLAIN, dtype=torch.float32)
    spy = _Spy(monkeypatch)
    copies = []
    real_empty = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda t, *a, **k: copies.append(a) or real_empty(t, *a, **k))
    model, loss, grads = lora_step(folder, name, LEAN, dtype=torch.float32)
    n_lean = sum("_hffv_lean_chunk" in m.__dict__ for m in model.modules())
    assert spy.graph_free == n_lean > 0 and spy.lora_grads == 3 * n_lean  # one chunk each: down, gate, up once
    assert not copies  # `_chunked` made no output buffer
    _assert_same(loss, grads, loss_ref, grads_ref)


@pytest.mark.parametrize("name", ["qwen2_5_vl", "mllama"])
def test_the_autograd_backward_equals_it_too(name, tiny_checkpoint, monkeypatch):
    """An activation op without a graph-free backward: autograd per chunk, `down`'s backward still fused."""
    folder = str(tiny_checkpoint(name))
    _, loss_ref, grads_ref = lora_step(folder, name, PLAIN, dtype=torch.float32)
    monkeypatch.setattr(lean, "_act_grads", lambda op: None)
    spy = _Spy(monkeypatch)
    model, loss, grads = lora_step(folder, name, LEAN, dtype=torch.float32, configure=_chunk(6))
    n_lean = sum("_hffv_lean_chunk" in m.__dict__ for m in model.modules())
    assert spy.autograd == n_lean > 0 and spy.graph_free == 0, (spy.autograd, spy.graph_free, n_lean)
    assert spy.lora_grads > n_lean  # down's fused backward, once per chunk
    _assert_same(loss, grads, loss_ref, grads_ref)


def test_a_cuda_graph_capture_takes_only_the_graph_free_backward(tiny_checkpoint, monkeypatch):
    """While a CUDA graph captures, a lean MLP whose backward would need autograd runs plain instead (captured
    nested autograd kept an activation per layer allocated on the GPU); one with the graph-free backward stays."""
    folder = str(tiny_checkpoint("qwen2_5_vl"))
    model, _ = FastVisionModel.from_pretrained(folder, load_in_4bit=True, dtype=torch.float32, patches=LEAN)
    model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, lora_dropout=0.0, random_state=0)
    model.train()
    mlp = next(m for n, m in model.named_modules() if n.endswith("language_model.layers.0.mlp"))
    x = torch.randn(1, 9, mlp.gate_proj.in_features, requires_grad=True)
    with lean.checkpoint_pass(False):
        mlp(x)
    monkeypatch.setattr(lean, "_capturing", lambda t: True)
    spy = _Spy(monkeypatch)
    with lean.checkpoint_pass(True):
        mlp(x)
    assert spy.calls == 1
    monkeypatch.setattr(lean, "_act_grads", lambda op: None)
    with lean.checkpoint_pass(True):
        out = mlp(x)
    assert spy.calls == 1 and out.abs().sum() > 0  # the plain MLP: its real output


def test_plain_checkpointing_too(tiny_checkpoint, monkeypatch):
    """`use_gradient_checkpointing=True` (torch's checkpoint, no offload box): the pass is told by call order."""
    folder = str(tiny_checkpoint("qwen2_5_vl"))

    def plain(model) -> None:
        model._hf_fastvision_checkpointing = True
        _chunk(5)(model)

    def stock_plain(model) -> None:
        model._hf_fastvision_checkpointing = True

    _, loss_ref, grads_ref = lora_step(folder, "qwen2_5_vl", PLAIN, dtype=torch.float32, configure=stock_plain)
    spy = _Spy(monkeypatch)
    model, loss, grads = lora_step(folder, "qwen2_5_vl", LEAN, dtype=torch.float32, configure=plain)
    from hf_fastvision.training.checkpointing import checkpointing_mode

    assert checkpointing_mode(model) == "plain"
    n_lean = sum("_hffv_lean_chunk" in m.__dict__ for m in model.modules())
    assert spy.calls == 2 * n_lean and spy.skipped == n_lean > 0, (spy.calls, spy.skipped, n_lean)
    _assert_same(loss, grads, loss_ref, grads_ref)


def test_under_bf16_autocast_too(tiny_checkpoint):
    folder = str(tiny_checkpoint("qwen2_5_vl"))
    _, loss_ref, grads_ref = lora_step(folder, "qwen2_5_vl", PLAIN, autocast=torch.bfloat16)
    _, loss, grads = lora_step(folder, "qwen2_5_vl", LEAN, autocast=torch.bfloat16, configure=_chunk(7))
    torch.testing.assert_close(loss, loss_ref, rtol=2e-2, atol=2e-2)
    for n, g in grads_ref.items():
        torch.testing.assert_close(grads[n], g, rtol=5e-2, atol=5e-3, msg=n)


def test_only_the_listed_layers_get_it(tiny_checkpoint):
    model, _ = FastVisionModel.from_pretrained(str(tiny_checkpoint("mllama")), load_in_4bit=True,
                                               dtype=torch.float32, patches=LEAN)
    lean_parents = set()
    for name, module in model.named_modules():
        if "_hffv_lean_chunk" in module.__dict__:
            lean_parents.add(type(model.get_submodule(name.rpartition(".")[0])).__name__)
    # the cross-attention layers scale their MLP output by a weight: lean only while it is frozen (checked per call)
    assert lean_parents == {"MllamaSelfAttentionDecoderLayer", "MllamaCrossAttentionDecoderLayer"}
    default, _ = FastVisionModel.from_pretrained(str(tiny_checkpoint("gemma3")), load_in_4bit=True, patches=LEAN)
    assert not any("_hffv_lean_chunk" in m.__dict__ for m in default.modules())  # Gemma 3: post-MLP norm


def test_a_trained_mllama_mlp_gate_keeps_its_layer_plain(tiny_checkpoint, monkeypatch):
    """The gate's gradient reads the MLP output's value: with the gate trainable, that layer's MLP runs plain."""
    folder = str(tiny_checkpoint("mllama"))

    def train_gates(model) -> None:
        for m in model.modules():
            if type(m).__name__ == "MllamaCrossAttentionDecoderLayer":
                m.cross_attn_mlp_gate.requires_grad_(True)

    _, loss_ref, grads_ref = lora_step(folder, "mllama", PLAIN, dtype=torch.float32, after_lora=train_gates)
    spy = _Spy(monkeypatch)
    model, loss, grads = lora_step(folder, "mllama", LEAN, dtype=torch.float32, after_lora=train_gates)
    n_cross = sum(type(m).__name__ == "MllamaCrossAttentionDecoderLayer" for m in model.modules())
    n_lean = sum("_hffv_lean_chunk" in m.__dict__ for m in model.modules())
    assert n_cross > 0 and spy.skipped == n_lean - n_cross > 0, (spy.skipped, n_lean, n_cross)
    assert [n for n in grads if "cross_attn_mlp_gate" in n]
    _assert_same(loss, grads, loss_ref, grads_ref)


def test_mlps_without_adapters_take_the_graph_free_backward_too(tiny_checkpoint, monkeypatch):
    """LoRA on attention only: the MLP's frozen 4-bit projections give only input gradients, still graph-free."""
    folder = str(tiny_checkpoint("qwen2_5_vl"))
    attention_only = {"finetune_mlp_modules": False}
    _, loss_ref, grads_ref = lora_step(folder, "qwen2_5_vl", PLAIN, dtype=torch.float32, lora=attention_only)
    spy = _Spy(monkeypatch)
    model, loss, grads = lora_step(folder, "qwen2_5_vl", LEAN, dtype=torch.float32, lora=attention_only,
                                   configure=_chunk(5))
    n_lean = sum("_hffv_lean_chunk" in m.__dict__ for m in model.modules())
    assert not [n for n in grads if "mlp" in n]
    assert spy.graph_free == n_lean > 0 and spy.autograd == 0, (spy.graph_free, spy.autograd, n_lean)
    _assert_same(loss, grads, loss_ref, grads_ref)


def test_lora_dropout_keeps_the_plain_mlp(tiny_checkpoint, monkeypatch):
    """With an active dropout in the MLP (peft's ``lora_dropout``) the backward could not redraw the forward's
    masks: those MLPs run plain, the same step as with the flag off."""
    folder = str(tiny_checkpoint("qwen2_5_vl"))

    def dropout(model) -> None:
        for module in model.modules():
            if hasattr(module, "lora_dropout") and "default" in module.lora_dropout:
                module.lora_dropout["default"] = torch.nn.Dropout(0.2)

    torch.manual_seed(1)
    _, loss_ref, grads_ref = lora_step(folder, "qwen2_5_vl", PLAIN, dtype=torch.float32, after_lora=dropout)
    spy = _Spy(monkeypatch)
    chunked = []
    real_chunked = lean._chunked
    monkeypatch.setattr(lean, "_chunked", lambda *a: chunked.append(1) or real_chunked(*a))
    torch.manual_seed(1)
    model, loss, grads = lora_step(folder, "qwen2_5_vl", LEAN, dtype=torch.float32, after_lora=dropout)
    assert spy.calls == 0 and not chunked  # nor the graph forward's chunked path
    mlp = next(m for n, m in model.named_modules() if n.endswith("language_model.layers.0.mlp"))
    with torch.no_grad(), lean.checkpoint_pass(False):
        mlp(torch.randn(1, 3, mlp.gate_proj.in_features))
    assert not chunked
    _assert_same(loss, grads, loss_ref, grads_ref)


def test_outside_checkpointing_the_plain_mlp_runs(tiny_checkpoint, monkeypatch):
    spy = _Spy(monkeypatch)
    folder = str(tiny_checkpoint("qwen2_5_vl"))

    def no_checkpointing(model) -> None:
        model._hf_fastvision_checkpointing = False

    _, loss, grads = lora_step(folder, "qwen2_5_vl", LEAN, dtype=torch.float32, configure=no_checkpointing)
    assert spy.calls == 0
    _, loss_ref, grads_ref = lora_step(folder, "qwen2_5_vl", PLAIN, dtype=torch.float32, configure=no_checkpointing)
    _assert_same(loss, grads, loss_ref, grads_ref)


def test_an_int_sets_the_chunk_and_bad_values_are_refused(tiny_checkpoint):
    model, _ = FastVisionModel.from_pretrained(str(tiny_checkpoint("qwen2_5_vl")), load_in_4bit=True,
                                               patches={"mlp_lean_recompute": 6})
    chunks = {m.__dict__["_hffv_lean_chunk"] for m in model.modules() if "_hffv_lean_chunk" in m.__dict__}
    assert chunks == {6}
    assert lean.chunk_tokens(True) == lean.DEFAULT_CHUNK_TOKENS
    for bad in (0, -3, 2.5, "4096"):
        with pytest.raises(ValueError, match="positive number of tokens"):
            lean.chunk_tokens(bad)


def test_the_pass_flag_nests_and_resets():
    assert lean.current_pass() is None
    with lean.checkpoint_pass(False):
        assert lean.current_pass() is False
        with lean.checkpoint_pass(True):
            assert lean.current_pass() is True
        assert lean.current_pass() is False
    assert lean.current_pass() is None


def test_in_the_recompute_only_the_input_is_saved(tiny_checkpoint):
    """What the recomputed MLP leaves for its backward: its input alone with the lean path, its intermediates too
    without it (they are the memory the lean path frees)."""
    saved_bytes = {}
    for patches in (LEAN, PLAIN):
        model, _ = FastVisionModel.from_pretrained(str(tiny_checkpoint("qwen2_5_vl")), load_in_4bit=True,
                                                   dtype=torch.float32, patches=patches)
        model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, lora_dropout=0.0, random_state=0)
        model.train()
        mlp = next(m for n, m in model.named_modules() if n.endswith("language_model.layers.0.mlp"))
        x = torch.randn(1, 37, mlp.gate_proj.in_features, requires_grad=True)
        with lean.checkpoint_pass(False):
            mlp(x)  # the checkpoint's first forward (the lean path learns the output's shape and dtype)
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), lean.checkpoint_pass(True):
            out = mlp(x)
        out.sum().backward()
        saved_bytes["lean" if patches is LEAN else "plain"] = sum(sizes)
    x_bytes = x.numel() * x.element_size()
    assert saved_bytes["lean"] == x_bytes, saved_bytes
    assert saved_bytes["plain"] > 3 * x_bytes, saved_bytes


@pytest.mark.parametrize("name", ["qwen2_5_vl", "mllama"])
def test_full_finetuning_in_16_bit_equals_the_plain_mlp(name, tiny_checkpoint, monkeypatch):
    """No 4-bit, no adapters: every weight trains; the lean MLP takes the autograd backward and equals the plain."""
    from hf_fastvision.archs.tiny import open_zero_gates, sample_batch, tiny_processor

    folder = str(tiny_checkpoint(name))
    results = []
    for patches in (PLAIN, LEAN):
        spy = _Spy(monkeypatch)
        model, _ = FastVisionModel.from_pretrained(folder, load_in_4bit=False, load_in_16bit=True,
                                                   dtype=torch.float32, full_finetuning=True, patches=patches)
        open_zero_gates(model)
        FastVisionModel.for_training(model)
        batch = sample_batch(tiny_processor(name), name, n=2)
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                        spy.autograd))
        monkeypatch.undo()
    (loss_ref, grads_ref, _), (loss, grads, n_autograd) = results
    assert n_autograd > 0 and [n for n in grads if "mlp.down_proj.weight" in n]
    _assert_same(loss, grads, loss_ref, grads_ref)
