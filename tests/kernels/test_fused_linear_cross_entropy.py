import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.loss.loss_utils import ForCausalLMLoss

from hf_fastvision.kernels import (
    FusedLinearCrossEntropyFunction,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_ref,
)
from hf_fastvision.tolerances import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _flce(hidden, weight, labels, bias=None, ignore_index=-100, num_items_in_batch=None, chunk_size=None,
          logit_softcapping=None, kernel=True):
    return FusedLinearCrossEntropyFunction.apply(
        hidden, weight, labels, bias, ignore_index, num_items_in_batch, chunk_size, logit_softcapping,
        kernel, torch.is_grad_enabled(),
    )


def _inputs(n, h, v, dtype, device, bias=False, n_ignored=2):
    hidden = torch.randn(n, h, device=device, dtype=dtype)
    weight = (torch.randn(v, h, device=device) * h**-0.5 * 3).to(dtype)
    b = torch.randn(v, device=device, dtype=dtype) if bias else None
    labels = torch.randint(0, v, (n,), device=device)
    labels[torch.randperm(n, device=device)[:n_ignored]] = -100
    return hidden, weight, b, labels


def _check(dtype, device, *, kernel=True, bias=False, num_items=None, chunk_size=4, softcap=None,
           n=11, h=19, v=37, grad_scale=None, freeze_weight=False, n_ignored=2):
    hidden, weight, b, labels = _inputs(n, h, v, dtype, device, bias, n_ignored)
    n_valid = int((labels != -100).sum())
    # upstream grad ~ #tokens so that gradients are O(1) and the tolerance table is meaningful
    grad_scale = grad_scale if grad_scale is not None else float(num_items or n_valid)
    params = [hidden, weight] + ([b] if bias else [])
    fused_leaves = [p.clone().requires_grad_(not (freeze_weight and i == 1)) for i, p in enumerate(params)]
    # reference in fp32 on the same (rounded) values: fp16 matmul on CPU is not a reference
    ref_leaves = [p.float().clone().requires_grad_(not (freeze_weight and i == 1)) for i, p in enumerate(params)]

    def split(leaves):
        return leaves[0], leaves[1], (leaves[2] if bias else None)

    hf, wf, bf = split(fused_leaves)
    loss = _flce(hf, wf, labels, bf, -100, num_items, chunk_size, softcap, kernel)
    hr, wr, br = split(ref_leaves)
    loss_ref = fused_linear_cross_entropy_ref(hr, wr, labels, br, -100, num_items, None, softcap)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss, loss_ref, dtype=dtype)
    (loss * grad_scale).backward()
    (loss_ref * grad_scale).backward()
    for i, (a, r) in enumerate(zip(fused_leaves, ref_leaves)):
        if freeze_weight and i == 1:
            assert a.grad is None
            continue
        assert a.grad.dtype == a.dtype
        assert_close(a.grad, r.grad, dtype=dtype, msg=lambda m, i=i: f"grad {i}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_items", [None, 7])
def test_triton_matches_ref(device, dtype, num_items):
    _check(dtype, device, num_items=num_items)


def test_fp16_large_num_items_no_underflow(device):
    # gradient accumulation over many tokens: softmax / num_items ~ 1e-7 is subnormal in fp16;
    # the 1/num_items factor must be applied after the fp16 matmul, not before
    _check(torch.float16, device, num_items=200_000, v=64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_softcap(device, dtype):
    _check(dtype, device, bias=True, softcap=3.0)


@pytest.mark.parametrize("chunk_size", [1, 3, 64, None])
def test_chunk_sizes(device, chunk_size):
    _check(torch.float32, device, chunk_size=chunk_size, n=9, v=70)


def test_frozen_weight_and_grad_scale(device):
    _check(torch.bfloat16, device, freeze_weight=True, grad_scale=2.5)


def test_torch_chunk_path(device):
    # the no-triton CUDA fallback: same Function, per-chunk loss/grad in plain torch
    _check(torch.float32, device, kernel=False, bias=True, softcap=3.0, num_items=5)


def test_num_items_tensor_and_3d_input(device):
    hidden, weight, _, labels = _inputs(2 * 6, 16, 40, torch.float32, device)
    n_items = torch.tensor(9, device=device)
    a = fused_linear_cross_entropy(hidden.view(2, 6, 16), weight, labels.view(2, 6), num_items_in_batch=n_items,
                                   chunk_size=5)
    b = fused_linear_cross_entropy_ref(hidden, weight, labels, num_items_in_batch=9)
    assert_close(a, b, dtype=torch.float32)


def test_no_grad_forward(device):
    hidden, weight, _, labels = _inputs(8, 16, 40, torch.float32, device)
    hidden.requires_grad_()
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=3)
    assert not loss.requires_grad
    assert_close(loss, fused_linear_cross_entropy_ref(hidden, weight, labels), dtype=torch.float32)


def test_extreme_logits(device):
    # large logits must not overflow the online log-sum-exp
    hidden, weight, _, labels = _inputs(6, 8, 33, torch.float32, device)
    hidden = hidden * 200
    _check_vals = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=4)
    assert torch.isfinite(_check_vals)
    assert_close(_check_vals, fused_linear_cross_entropy_ref(hidden, weight, labels), dtype=torch.float32)


class _MaxNumel(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_no_full_logits(device):
    n, h, v, chunk = 64, 16, 50, 8
    hidden, weight, _, labels = _inputs(n, h, v, torch.float32, device)
    hidden.requires_grad_()
    weight.requires_grad_()
    with _MaxNumel() as mode:
        loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=chunk)
        loss.backward()
    assert mode.max_numel < n * v, f"a tensor of {mode.max_numel} elements >= full logits ({n * v})"
    assert mode.max_numel >= chunk * v  # the chunk logits themselves


@pytest.mark.parametrize("num_items", [None, 13])
def test_ref_matches_transformers_causal_lm_loss(device, num_items):
    bsz, seq, h, v = 2, 5, 16, 40
    hidden = torch.randn(bsz, seq, h, device=device)
    weight = torch.randn(v, h, device=device) * 0.3
    labels = torch.randint(0, v, (bsz, seq), device=device)
    labels[0, :2] = -100
    logits = hidden @ weight.t()
    expected = ForCausalLMLoss(logits, labels, v, num_items_in_batch=num_items)
    shift = F.pad(labels, (0, 1), value=-100)[..., 1:]
    ref = fused_linear_cross_entropy_ref(hidden.view(-1, h), weight, shift.reshape(-1), num_items_in_batch=num_items)
    torch.testing.assert_close(ref, expected, rtol=1e-6, atol=1e-6)
    fused = fused_linear_cross_entropy(hidden.view(-1, h), weight, shift.reshape(-1), num_items_in_batch=num_items,
                                       chunk_size=3)
    assert_close(fused, expected, dtype=torch.float32)
    if num_items is None:
        ce = torch.nn.CrossEntropyLoss()(logits.view(-1, v), shift.reshape(-1))
        torch.testing.assert_close(ref, ce, rtol=1e-6, atol=1e-6)


class _LogitRows(TorchDispatchMode):
    """Counts the rows of every ``[rows, vocab]`` matmul (the logits chunks)."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) and out.shape[-1] == self.vocab:
            self.rows += out.shape[0]
        return out


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("n_ignored", [0, 9, 36])
def test_ignored_rows_are_skipped(device, kernel, n_ignored):
    """Prompt-masked data: rows with an ignored label get no logits at all, and the loss and every gradient are
    still the reference's (ignored rows' hidden gradient exactly zero)."""
    n, h, v = 40, 19, 37
    _check(torch.float32, device, kernel=kernel, n=n, h=h, v=v, n_ignored=n_ignored, chunk_size=3, bias=True)
    hidden, weight, _, labels = _inputs(n, h, v, torch.float32, device, n_ignored=n_ignored)
    hidden.requires_grad_(True)
    counter = _LogitRows(v)
    with counter:
        loss = _flce(hidden, weight, labels, chunk_size=3, kernel=kernel)
    assert counter.rows == n - n_ignored
    loss.backward()
    assert (hidden.grad[labels == -100] == 0).all()


def test_every_row_ignored_gives_the_references_result(device):
    hidden, weight, _, labels = _inputs(6, 8, 11, torch.float32, device, n_ignored=6)
    got = _flce(hidden, weight, labels)
    ref = fused_linear_cross_entropy_ref(hidden, weight, labels)
    assert torch.isnan(got) == torch.isnan(ref)
    got_sum = _flce(hidden, weight, labels, num_items_in_batch=4)
    assert got_sum.item() == 0.0
