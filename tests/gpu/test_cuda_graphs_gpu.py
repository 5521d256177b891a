"""Real CUDA-graph capture of checkpointed layers (GPU machine): graphed training equals eager training."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _stats(model):
    from hf_fastvision.training.checkpointing import _STATE_ATTR

    for m in model.modules():
        state = m.__dict__.get(_STATE_ATTR)
        if state is not None:
            graphs = state.manager.graphs
            return None if graphs is None else {**graphs.stats, "last_failure": graphs.last_failure}
    return None


def _train(model, batch, steps=5, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses, grads = [], []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()  # graphs must read the updated weights on the next replay
    return losses, grads


@pytest.mark.parametrize("name,mode,patches", [("qwen2_5_vl", "unsloth", None), ("qwen3_vl", "unsloth", None),
                                               ("mllama", "unsloth", None), ("gemma3", "unsloth", None),
                                               ("idefics3", "unsloth", None), ("qwen2_5_vl", True, None),
                                               ("mllama", "unsloth", {"cuda_graphs_capture": "second_forward",
                                                                      "cross_attention_split": True}),
                                               ("qwen2_5_vl", "unsloth", {"cuda_graphs_capture": "second_forward"}),
                                               ("qwen2_5_vl", "unsloth", {"mlp_lean_recompute": True}),
                                               ("mllama", "unsloth", {"mlp_lean_recompute": True})])
def test_graphed_qlora_equals_eager(name, mode, patches, tiny_checkpoint):
    from hf_fastvision import FastVisionModel
    from hf_fastvision.archs.tiny import missing_dependencies, sample_batch
    from hf_fastvision.training.checkpointing import enable_checkpointing

    if missing := missing_dependencies(name):
        pytest.skip(f"needs {missing}")
    # the eager reference: the defaults, and the plain MLP where the graphed run asks for the lean one
    reference = {"mlp_lean_recompute": False} if patches and patches.get("mlp_lean_recompute") else None
    runs = []
    for graphs in (False, True):
        model, processor = FastVisionModel.from_pretrained(
            str(tiny_checkpoint(name)), max_seq_length=256, dtype=torch.bfloat16,
            patches=patches if graphs else reference)
        peft_model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8)
        with torch.no_grad():
            for pname, param in peft_model.named_parameters():
                if "lora_B" in pname:
                    g = torch.Generator().manual_seed(len(pname))
                    param.copy_(torch.randn(param.shape, generator=g).to(param.device) * 0.2)
        enable_checkpointing(peft_model.get_base_model(), mode, cuda_graphs=graphs)
        batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in sample_batch(processor, name, 2).items()}
        runs.append(_train(peft_model, batch))
        if graphs:
            stats = _stats(peft_model.get_base_model())
            assert stats["failures"] == 0 and stats["captures"] > 0, stats
            assert stats["replays"] >= 3 * stats["captures"], stats
            # the default captures in the first backward (the autograd engine's thread), the option in the forward
            second = bool(patches and patches.get("cuda_graphs_capture") == "second_forward")
            assert stats["backward_captures"] == (0 if second else stats["captures"]), stats
    (ref_losses, ref_grads), (losses, grads) = runs
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=2e-2, atol=2e-2)
    for g_ref, g in zip(ref_grads, grads):
        assert g.keys() == g_ref.keys()
        num = sum((g[n] - g_ref[n]).norm() ** 2 for n in g) ** 0.5
        den = sum(g_ref[n].norm() ** 2 for n in g) ** 0.5
        assert num <= 0.05 * den + 1e-6, (float(num), float(den))
