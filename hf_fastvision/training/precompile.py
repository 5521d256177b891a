"""Compile the patched model's Triton kernels in background threads before the first step needs them.

Why: with empty caches a QLoRA model's first step compiles ~11 Triton specializations (RMSNorm, SwiGLU/GeGLU and
the loss kernel, forward and backward, per hidden width): 2.1-2.4 s of an H200 first step (`bench_qlora.py`'s
``first_step_triton``), part of it waiting on ``ptxas`` subprocesses, which release the GIL. Compiled in 4
threads started before peft's injection they overlap the injection, the first forward and each other.

Opt-in (``patches={"precompile": True}``). Measured on an H200 (Qwen2.5-VL-7B at 2048,
`scripts/results/h200_2026-12-02l_seventeenth/` against `h200_2026-12-02j_fifteenth/`): step 1 took 9.7 s instead
of 13.4 s and compiled 4 kernels instead of 11 (Triton's one-time start-up moved out of it too), but peft's
injection took 3.8 s instead of 1.5 s: much of a compile holds the GIL. Load + first step 17.6 s against 19.0 s.
Off by default while the load (which must not exceed the plain recipe's) is the target it would miss; a compile
in a helper process (warming Triton's disk cache without sharing the GIL) is the next thing to try.

How: `plan_jobs` reads the bound patches (`patching.py`) and builds one job per distinct specialization: the
patched op run forward and backward on 16 rows of dummy data with the module's own widths, dtype and frozen
weights, so Triton compiles exactly the variants the real step launches (the GPU test checks that the real step
then compiles none of them). `get_peft_model` starts them before peft's injection (with the weights as they will
be: frozen), so they overlap it; `for_training` adds any others (e.g. a norm kept trainable). Jobs run on a side stream, never raise (a failure only means the step compiles as
before) and never touch the model's state or a random generator (constant dummy data: the user's seeds keep their
streams). `wait` joins them; CUDA graph captures call it first, so no
background launch overlaps a capture.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

__all__ = ["plan_jobs", "precompile", "wait", "ROWS"]

logger = logging.getLogger(__name__)

ROWS = 16  # dummy rows per job: a multiple of 16, as Triton's integer specialization sees the real sizes
_DONE = "_hffv_precompiled"  # per model: the job keys already started
_PENDING: list[Future] = []
_LOCK = threading.Lock()


def _half(t: torch.Tensor) -> torch.dtype:
    from hf_fastvision.kernels import preferred_half_dtype

    return t.dtype if t.dtype in (torch.bfloat16, torch.float16) else preferred_half_dtype(t.device)


def _rms_job(module: nn.Module, frozen: bool) -> tuple[Any, Callable[[], None]]:
    weight = module.weight.detach() if frozen else module.weight
    eps, offset = module.__dict__["_hffv_eps"], module.__dict__["_hffv_offset"]
    dtype = _half(weight)
    key = ("rms_norm", weight.shape[-1], dtype, weight.dtype, weight.requires_grad, offset, weight.device)

    def run() -> None:
        from hf_fastvision.kernels import rms_norm

        x = torch.full((ROWS, weight.shape[-1]), 0.5, dtype=dtype, device=weight.device, requires_grad=True)
        out = rms_norm(x, weight, eps, offset=offset)
        torch.autograd.grad(out, [x], torch.ones_like(out))

    return key, run


def _gated_job(module: nn.Module) -> tuple[Any, Callable[[], None]]:
    act = module.__dict__["_hffv_act"]
    width = getattr(module.up_proj, "out_features", None) or module.up_proj.weight.shape[0]
    device = next(p.device for p in module.parameters())
    dtype = _half(torch.empty(0, device=device))
    key = ("gated_mlp", act, dtype, device)  # the kernels are elementwise: one specialization per dtype

    def run() -> None:
        from hf_fastvision.kernels import geglu, swiglu

        op = swiglu if act == "silu" else geglu
        gate, up = (torch.full((ROWS, width), 0.5, dtype=dtype, device=device, requires_grad=True) for _ in range(2))
        out = op(gate, up)
        torch.autograd.grad(out, [gate, up], torch.ones_like(out))

    return key, run


def _loss_job(model: nn.Module, frozen: bool) -> tuple[Any, Callable[[], None]] | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        return None
    weight = weight.detach() if frozen else weight
    softcap = model.__dict__.get("_hffv_softcap")
    dtype = _half(weight)
    key = ("fused_loss", tuple(weight.shape), dtype, weight.dtype, weight.requires_grad, bool(softcap),
           weight.device)

    def run() -> None:
        from hf_fastvision.kernels import fused_linear_cross_entropy

        hidden = torch.full((ROWS, weight.shape[1]), 0.5, dtype=dtype, device=weight.device, requires_grad=True)
        labels = torch.zeros(ROWS, dtype=torch.long, device=weight.device)
        loss = fused_linear_cross_entropy(hidden, weight, labels, bias=getattr(head, "bias", None),
                                          logit_softcapping=softcap)
        torch.autograd.grad(loss, [hidden])

    return key, run


def plan_jobs(model: nn.Module, frozen: bool = False) -> dict[Any, Callable[[], None]]:
    """One job per distinct kernel specialization the bound patches will launch: ``{key: run}``. ``frozen``: as
    after a LoRA set-up, with every weight frozen (`get_peft_model` starts the jobs before injecting)."""
    from hf_fastvision.patching import _KIND

    jobs: dict[Any, Callable[[], None]] = {}
    for module in model.modules():
        kind = module.__dict__.get(_KIND)
        try:
            if kind == "rms_norm" and "_hffv_eps" in module.__dict__:
                key, run = _rms_job(module, frozen)
            elif kind == "mlp" and "_hffv_act" in module.__dict__:
                key, run = _gated_job(module)
            elif kind == "fused_loss":
                job = _loss_job(module, frozen)
                if job is None:
                    continue
                key, run = job
            else:
                continue
        except Exception as exc:  # an unexpected module layout: that kernel compiles in the step, as before
            logger.debug("precompile: skipping %s (%s)", type(module).__name__, exc)
            continue
        jobs.setdefault(key, run)
    return jobs


def _guarded(key: Any, run: Callable[[], None], device: torch.device | None) -> None:
    try:
        if device is not None and device.type == "cuda":
            with torch.cuda.device(device), torch.cuda.stream(torch.cuda.Stream(device)):
                run()
                torch.cuda.current_stream().synchronize()  # its temporaries are freed after its kernels ran
        else:
            run()
    except Exception as exc:  # never fail training set-up over a warm-up
        logger.debug("precompile: %s failed (%s: %s); it compiles in the step instead", key[0], type(exc).__name__, exc)


def precompile(model: nn.Module, *, background: bool = True, max_workers: int = 4, cpu: bool = False,
               frozen: bool = False) -> int:
    """Start compiling the model's Triton kernels (jobs not started before for this model); returns how many.

    Only on CUDA (``cpu=True`` runs the jobs on CPU too, through the torch references: for tests). With
    ``background=False`` the jobs run here, one after another.
    """
    from hf_fastvision.kernels import HAS_TRITON

    done: set = model.__dict__.setdefault(_DONE, set())
    jobs = {k: run for k, run in plan_jobs(model, frozen).items() if k not in done}
    if not cpu:
        jobs = {k: run for k, run in jobs.items() if HAS_TRITON and k[-1].type == "cuda"}
    if not jobs:
        return 0
    done.update(jobs)
    if not background:
        for key, run in jobs.items():
            _guarded(key, run, key[-1])
        return len(jobs)
    pool = ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(jobs))), thread_name_prefix="hffv-precompile")
    futures = [pool.submit(_guarded, key, run, key[-1]) for key, run in jobs.items()]
    pool.shutdown(wait=False)
    with _LOCK:
        _PENDING[:] = [f for f in _PENDING if not f.done()] + futures
    return len(jobs)


def wait(timeout: float | None = 120.0) -> None:
    """Block until the background jobs started so far have finished (or `timeout` seconds passed)."""
    with _LOCK:
        pending = list(_PENDING)
    for future in pending:
        try:
            future.result(timeout=timeout)
        except Exception:  # a timeout: the capture goes ahead; `_guarded` already swallows job errors
            return
    with _LOCK:
        _PENDING[:] = [f for f in _PENDING if not f.done()]
