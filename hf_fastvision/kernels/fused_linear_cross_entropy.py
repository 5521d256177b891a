"""Fused linear + cross-entropy (``lm_head`` + loss) without materialising ``[N, V]`` logits.

The rows are processed in chunks: for each chunk the logits are computed with a torch matmul
(``[chunk, V]``, upcast to fp32), then a Triton kernel computes the per-row loss with an online
log-sum-exp and overwrites the logits with their gradient in place; the gradient of the hidden
states (and of the weight / bias when they require grad) is accumulated right away, in the
forward pass (as Liger-Kernel does). ``backward`` only scales the stored gradients by
``grad_output / denominator``: they are stored unreduced so that fp16 does not underflow.

Reduction follows transformers' ``fixed_cross_entropy``: mean over non-ignored tokens, or
``sum / num_items_in_batch`` when ``num_items_in_batch`` is given (gradient accumulation).
Labels are used as given (no shift): pass the already shifted labels of a causal LM. Once more than 3% of the rows
have an ignored label (a masked prompt), those rows are skipped (no logits at all; one host sync to count them):
their loss and gradients are zero either way.

``logit_softcapping`` (Gemma 2/3 ``final_logit_softcapping``): ``cap * tanh(logits / cap)``,
applied in fp32 (transformers applies it in the model dtype before upcasting).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._utils import HAS_TRITON, device_guarded, next_power_of_2, tl, triton, use_triton

__all__ = [
    "FusedLinearCrossEntropyFunction",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_ref",
    "default_chunk_size",
]

_MAX_BLOCK = 32768
_COMPACT_BELOW = 0.97  # skip ignored rows once fewer than this fraction of the rows count


# --------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------
def fused_linear_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int | None = None,
    logit_softcapping: float | None = None,
) -> torch.Tensor:
    """Pure torch: full logits, fp32 upcast, then transformers' ``fixed_cross_entropy``.

    ``chunk_size`` is accepted for signature compatibility and ignored.
    """
    del chunk_size
    logits = F.linear(hidden, weight, bias).float()
    if logit_softcapping:
        logits = torch.tanh(logits / logit_softcapping) * logit_softcapping
    logits = logits.reshape(-1, weight.shape[0])
    labels = labels.reshape(-1).to(logits.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)
    if reduction == "sum":
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


# --------------------------------------------------------------------------------------
# triton kernel: per-row loss + in-place gradient of the logits
# --------------------------------------------------------------------------------------
@triton.jit
def _tanh(x):
    # overflow-free tanh from exp(-2|x|); portable across triton versions and the interpreter
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _ce_fwd_bwd_kernel(
    LOGITS,
    logits_row_stride,
    LABELS,
    LOSS,
    n_cols,
    ignore_index,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    LOGITS += row * logits_row_stride
    y = tl.load(LABELS + row).to(tl.int64)
    offs = tl.arange(0, BLOCK_SIZE)

    if y == ignore_index:
        tl.store(LOSS + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, n_cols, BLOCK_SIZE):
                cols = start + offs
                tl.store(LOGITS + cols, tl.zeros((BLOCK_SIZE,), dtype=tl.float32), mask=cols < n_cols)
        return

    # pass 1: online max / sum-exp
    m = float("-inf")
    d = 0.0
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + offs
        mask = cols < n_cols
        z = tl.load(LOGITS + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)

    z_y = tl.load(LOGITS + y).to(tl.float32)
    if HAS_SOFTCAP:
        z_y = softcap * _tanh(z_y / softcap)
    tl.store(LOSS + row, lse - z_y)

    # pass 2: d loss_row / d logits = softmax - onehot [* softcap derivative]
    if COMPUTE_GRAD:
        for start in range(0, n_cols, BLOCK_SIZE):
            cols = start + offs
            mask = cols < n_cols
            z = tl.load(LOGITS + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t = _tanh(z / softcap)
                z = softcap * t
            g = tl.exp(z - lse) - tl.where(cols == y, 1.0, 0.0)
            if HAS_SOFTCAP:
                g = g * (1.0 - t * t)
            tl.store(LOGITS + cols, g, mask=mask)


def _ce_chunk_triton(logits, labels, loss_out, ignore_index, softcap, compute_grad):
    """logits: fp32 [c, V], contiguous rows; per-row loss into ``loss_out``; logits overwritten
    with the (unreduced) gradient of each row's loss if compute_grad (zero for ignored rows)."""
    n_rows, n_cols = logits.shape
    block = min(next_power_of_2(n_cols), _MAX_BLOCK)
    num_warps = 32 if block >= 16384 else (16 if block >= 4096 else (8 if block >= 1024 else 4))
    device_guarded(_ce_fwd_bwd_kernel)[(n_rows,)](
        logits, logits.stride(0), labels, loss_out, n_cols, ignore_index,
        float(softcap) if softcap else 1.0,
        HAS_SOFTCAP=bool(softcap), COMPUTE_GRAD=compute_grad, BLOCK_SIZE=block, num_warps=num_warps,
    )


def _ce_chunk_torch(logits, labels, loss_out, ignore_index, softcap, compute_grad):
    """Same contract as ``_ce_chunk_triton`` in plain torch (used without triton)."""
    if softcap:
        t = torch.tanh(logits / softcap)
        z = t * softcap
    else:
        z = logits
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(1)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    loss_out.copy_(((lse - z.gather(1, safe)).squeeze(1)) * valid)
    if compute_grad:
        g = torch.exp(z - lse)
        g.scatter_add_(1, safe, torch.full_like(lse, -1.0))
        if softcap:
            g.mul_(1.0 - t * t)
        g.mul_(valid.unsqueeze(1).to(g.dtype))
        logits.copy_(g)


def default_chunk_size(n_rows: int, hidden_size: int, vocab_size: int) -> int:
    """Liger's heuristic: a chunk of logits about as large as the hidden states, power of two."""
    inc = triton.cdiv(vocab_size, hidden_size) if HAS_TRITON else -(-vocab_size // hidden_size)
    rows = -(-n_rows // max(inc, 1))
    return max(1, next_power_of_2(rows))


def _kept_rows(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor | None, int]:
    """``(indices of the rows whose label counts, how many)``, or ``(None, n)`` when (nearly) every row counts:
    a few ignored rows (the shifted-out last position, an image token) are cheaper to compute than to gather
    around (the kernel gives them zero loss and gradient)."""
    if labels.is_cuda and torch.cuda.is_current_stream_capturing():  # no host sync inside a CUDA graph capture
        return None, labels.numel()
    keep = labels != ignore_index
    kept = int(keep.sum())
    if kept >= _COMPACT_BELOW * labels.numel():
        return None, labels.numel()
    return keep.nonzero().squeeze(1), kept


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """``apply(hidden[N,H], weight[V,H], labels[N], bias, ignore_index, num_items_in_batch,
    chunk_size, logit_softcapping, use_triton_kernel, grad_enabled)`` -> fp32 scalar loss.

    Gradients are computed during the forward pass (only for inputs that require grad and only
    if ``grad_enabled``) and merely scaled by ``grad_output`` in ``backward``.
    """

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        labels,
        bias=None,
        ignore_index=-100,
        num_items_in_batch=None,
        chunk_size=None,
        logit_softcapping=None,
        use_triton_kernel=True,
        grad_enabled=True,
    ):
        if hidden.shape[-1] != weight.shape[1]:
            raise ValueError(f"hidden {tuple(hidden.shape)} incompatible with weight {tuple(weight.shape)}")
        hidden_shape = hidden.shape
        h_size = hidden.shape[-1]
        vocab = weight.shape[0]
        hidden2 = hidden.reshape(-1, h_size)
        labels = labels.reshape(-1).to(device=hidden.device, dtype=torch.long)
        n_rows = hidden2.shape[0]
        if labels.shape[0] != n_rows:
            raise ValueError(f"{labels.shape[0]} labels for {n_rows} rows of hidden states")
        device = hidden.device

        if num_items_in_batch is None:
            denom = (labels != ignore_index).sum().to(torch.float32)
        else:
            denom = torch.as_tensor(num_items_in_batch, device=device).to(torch.float32)
        scale = (1.0 / denom).reshape(1).contiguous()

        # grad mode is off inside forward: the caller passes whether it was on
        need_h = grad_enabled and ctx.needs_input_grad[0]
        need_w = grad_enabled and ctx.needs_input_grad[1]
        need_b = grad_enabled and bias is not None and ctx.needs_input_grad[3]
        compute_grad = need_h or need_w or need_b

        mm_dtype = weight.dtype
        # All gradients are accumulated *unreduced* (without 1/denominator, which backward
        # applies together with grad_output): fp16 would flush softmax/num_items (~1e-9) to
        # zero. fp16 weight grads accumulate in fp32 (an fp16 sum over rows could overflow).
        grad_hidden = torch.empty_like(hidden2) if need_h else None
        w_acc_dtype = torch.float32 if weight.dtype == torch.float16 else weight.dtype
        grad_weight = torch.zeros_like(weight, dtype=w_acc_dtype) if need_w else None
        grad_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if need_b else None
        loss_rows = torch.empty(n_rows, dtype=torch.float32, device=device)

        # rows whose label is ignored add nothing to the loss or any gradient: only the others are multiplied
        # (prompt-masked fine-tuning data ignores most rows); one host sync for their number
        rows, kept = _kept_rows(labels, ignore_index)
        if rows is not None:
            loss_rows.zero_()
            if need_h:
                grad_hidden.zero_()
        n_kept = n_rows if rows is None else kept
        chunk = int(chunk_size) if chunk_size else default_chunk_size(n_kept, h_size, vocab)
        ce_chunk = _ce_chunk_triton if use_triton_kernel else _ce_chunk_torch
        for start in range(0, n_kept, chunk):
            end = min(start + chunk, n_kept)
            idx = None if rows is None else rows[start:end]
            h = hidden2[start:end] if idx is None else hidden2.index_select(0, idx)
            if h.dtype != mm_dtype:
                h = h.to(mm_dtype)
            logits = h @ weight.t()
            if bias is not None:
                logits = logits + bias
            logits = logits.float()
            if not logits.is_contiguous():
                logits = logits.contiguous()
            chunk_labels = labels[start:end] if idx is None else labels.index_select(0, idx)
            chunk_loss = loss_rows[start:end] if idx is None else torch.empty(end - start, dtype=torch.float32,
                                                                               device=device)
            ce_chunk(logits, chunk_labels, chunk_loss, ignore_index, logit_softcapping, compute_grad)
            if idx is not None:
                loss_rows.index_copy_(0, idx, chunk_loss)
            if not compute_grad:
                continue
            g = logits.to(mm_dtype)
            if need_h:
                if idx is None:
                    grad_hidden[start:end] = g @ weight
                else:
                    grad_hidden.index_copy_(0, idx, (g @ weight).to(grad_hidden.dtype))
            if need_w:
                if grad_weight.dtype == mm_dtype:
                    grad_weight.addmm_(g.t(), h)
                else:
                    grad_weight += (g.t() @ h).to(grad_weight.dtype)
            if need_b:
                grad_bias += logits.sum(0)
            del logits, g

        loss = loss_rows.sum() * scale[0]
        ctx.save_for_backward(
            grad_hidden if need_h else None,
            grad_weight if need_w else None,
            grad_bias if need_b else None,
            scale,
        )
        ctx.hidden_shape = hidden_shape
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias, scale = ctx.saved_tensors
        factor = grad_output.to(torch.float32) * scale[0]  # d loss / d (unreduced sum)
        if grad_hidden is not None:
            grad_hidden = (grad_hidden * factor).to(grad_hidden.dtype).view(ctx.hidden_shape)
        if grad_weight is not None:
            grad_weight = (grad_weight * factor).to(ctx.weight_dtype)
        if grad_bias is not None:
            grad_bias = (grad_bias * factor).to(ctx.bias_dtype)
        return grad_hidden, grad_weight, None, grad_bias, None, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int | None = None,
    logit_softcapping: float | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels`` -> fp32 scalar.

    ``hidden``: ``[N, H]`` (or ``[..., H]``), ``weight``: ``[V, H]``, ``labels``: ``[N]`` (or
    ``[...]``). Chunked with the Triton loss kernel on CUDA (or under ``TRITON_INTERPRET=1``);
    chunked in plain torch on CUDA without triton; full-logit reference otherwise (CPU).
    A frozen ``weight`` (``requires_grad=False``) gets no gradient and costs nothing extra.
    """
    if use_triton(hidden, weight):
        use_kernel = True
    elif hidden.is_cuda:
        use_kernel = False
    else:
        return fused_linear_cross_entropy_ref(
            hidden, weight, labels, bias, ignore_index, num_items_in_batch, chunk_size, logit_softcapping
        )
    return FusedLinearCrossEntropyFunction.apply(
        hidden, weight, labels, bias, ignore_index, num_items_in_batch, chunk_size, logit_softcapping,
        use_kernel, torch.is_grad_enabled(),
    )
