"""The `rope` patch: each text attention of a named architecture runs transformers' own forward with its
`apply_rotary_pos_emb` resolved to the fused kernel (Triton, here under the interpreter), and the Qwen-VL towers'
grouped vision attention takes the kernel for its rotary. Same logits and gradients
as with the flag off; the kernel runs once per self-attention layer and forward; transformers' modules are not
touched (a second, unpatched model of the same class still calls the stock function); unpatch restores."""

from __future__ import annotations

import functools
import importlib
import sys

import pytest
import torch

from hf_fastvision import AutoFastVisionModel
from hf_fastvision.archs._vision_attention import grouped_chunk_attention_forward
from hf_fastvision.archs.tiny import NAMED_TINY_TYPES, sample_batch, tiny_processor
from hf_fastvision.kernels import rope as rope_kernels
from hf_fastvision.patching import _with_global, patched_modules, unpatch
from hf_fastvision.tolerances import assert_close


def _self_attentions(model) -> list[str]:
    """Text attention modules whose class's modeling module defines `apply_rotary_pos_emb` (the cross-attention of
    Mllama has none to call)."""
    names = []
    for name, module in model.named_modules():
        if not type(module).__name__.endswith("Attention") or "vision" in name or "visual" in name:
            continue
        forward = type(module).forward
        while hasattr(forward, "__wrapped__"):  # decorators: transformers' kwarg checks, `kernels`' func routing
            forward = forward.__wrapped__
        if "apply_rotary_pos_emb" in forward.__code__.co_names:
            names.append(name)
    return names


@pytest.mark.parametrize("name", NAMED_TINY_TYPES)
def test_rope_patch_matches_the_stock_rotary_and_runs_the_kernel(name, tiny_checkpoint, monkeypatch):
    folder = tiny_checkpoint(name)
    stock = AutoFastVisionModel.from_pretrained(folder, load_in_16bit=True, patches={"rope": False})
    fast = AutoFastVisionModel.from_pretrained(folder, load_in_16bit=True)
    expected = _self_attentions(fast)
    assert expected, "every named architecture has rotary text attention"
    kinds = patched_modules(fast)
    assert sorted(n for n, k in kinds.items() if k == "rope") == sorted(expected)
    assert "rope" not in patched_modules(stock).values()

    calls = []
    launch = rope_kernels._apply_triton

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return launch(*args, **kwargs)

    monkeypatch.setattr(rope_kernels, "_apply_triton", counted)
    monkeypatch.delenv("HF_FASTVISION_DISABLE_TRITON", raising=False)  # the kernel itself, under the interpreter
    kernel_runs = rope_kernels.use_triton(torch.zeros(1))  # False on a CUDA machine: CPU tensors take the reference
    batch = sample_batch(tiny_processor(name), name, n=2)
    stock.train(), fast.train()
    out_stock, out_fast = stock(**batch), fast(**batch)
    # the Qwen-VL towers' grouped attention takes the kernel for its rotary too (one call per vision layer)
    vision = [n for n, k in kinds.items()
              if k == "vision_attention" and fast.get_submodule(n).forward.__func__ is grouped_chunk_attention_forward]
    assert bool(vision) == name.startswith("qwen"), vision
    assert len(calls) == (len(expected) + len(vision) if kernel_runs else 0), (len(calls), expected, vision)
    assert_close(out_fast.loss, out_stock.loss, dtype=torch.float32)
    out_stock.loss.backward()
    out_fast.loss.backward()
    for (n, p_stock), (_, p_fast) in zip(stock.named_parameters(), fast.named_parameters()):
        if p_stock.grad is not None:
            torch.testing.assert_close(p_fast.grad, p_stock.grad, rtol=1e-4, atol=1e-5, msg=n)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        assert_close(fast(**inputs).logits, stock(**inputs).logits, dtype=torch.float32)

    modeling = sys.modules[type(fast.get_submodule(expected[0])).__module__]
    assert modeling.apply_rotary_pos_emb is not rope_kernels.apply_rotary_pos_emb  # transformers left as it was
    unpatch(fast)
    assert "rope" not in patched_modules(fast).values()
    assert all("forward" not in fast.get_submodule(n).__dict__ for n in expected)


def _wraps(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs) + 100

    return wrapper


def _reads_global(x):
    return torch_free_helper(x) * 2  # noqa: F821  (the global the copy gets)


def test_with_global_rebuilds_through_decorators():
    module = importlib.import_module(__name__)
    module.torch_free_helper = lambda x: x + 1
    decorated = _wraps(_wraps(_reads_global))
    copy = _with_global(decorated, "torch_free_helper", lambda x: x + 10)
    assert copy(1) == (1 + 10) * 2 + 200
    assert decorated(1) == (1 + 1) * 2 + 200  # the original still reads the module's global
    assert copy.__wrapped__.__wrapped__ is not _reads_global and copy.__name__ == "_reads_global"
    assert _with_global(_reads_global, "not_read_here", None) is None
    assert _with_global(decorated, "not_read_here", None) is None

    def no_cell_wrapper(*args):  # wraps without holding the wrapped function in a closure cell
        return args

    no_cell_wrapper.__wrapped__ = _reads_global
    assert _with_global(no_cell_wrapper, "torch_free_helper", None) is None
    del module.torch_free_helper
