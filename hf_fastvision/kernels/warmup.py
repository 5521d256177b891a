"""Run fused ops once on dummy data so Triton compiles their kernels (`training/precompile.py` plans the specs).

Imports only torch, triton and the kernel modules. Run as a file (`helper_command`: this file run as ``__main__``
with the device index as argument, specs as JSON on stdin) it is the helper process of
``patches={"precompile": "process"}``: it loads this package without the rest of hf_fastvision (whose import takes
seconds), lowers its own CPU priority (`NICENESS`), compiles the specs in 4 threads into Triton's on-disk cache
and exits.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

ROWS = 16  # dummy rows per job: a multiple of 16, as Triton's integer specialization sees the real sizes
_LOSS_HIDDEN = 64  # the loss kernel reads [rows, vocab] logits: the hidden width of its dummy matmul is free


def run_spec(spec: dict[str, Any], device: torch.device) -> None:
    """Run the spec's op forward and backward once on dummy data (compiles its kernels on CUDA)."""
    from hf_fastvision.kernels import fused_linear_cross_entropy, geglu, rms_norm, swiglu

    dtype = getattr(torch, spec["dtype"])
    if spec["op"] == "rms_norm":
        weight = torch.ones(spec["width"], dtype=getattr(torch, spec["weight_dtype"]), device=device,
                            requires_grad=spec["trains"])
        # the backward kernel takes the row count, which Triton specializes on divisibility by 16: both variants
        # (the nineteenth GPU command's tiny step rebuilt the backward for its odd row count)
        for rows in (ROWS, ROWS + 1):
            x = torch.full((rows, spec["width"]), 0.5, dtype=dtype, device=device, requires_grad=True)
            out = rms_norm(x, weight, spec["eps"], offset=spec["offset"])
            torch.autograd.grad(out, [x, weight] if spec["trains"] else [x], torch.ones_like(out))
    elif spec["op"] == "gated_mlp":
        op = swiglu if spec["act"] == "silu" else geglu
        gate, up = (torch.full((ROWS, 256), 0.5, dtype=dtype, device=device, requires_grad=True) for _ in range(2))
        out = op(gate, up)
        torch.autograd.grad(out, [gate, up], torch.ones_like(out))
    elif spec["op"] == "fused_loss":
        wdtype = getattr(torch, spec["weight_dtype"])
        weight = torch.full((spec["vocab"], _LOSS_HIDDEN), 0.01, dtype=wdtype, device=device,
                            requires_grad=spec["trains"])
        bias = torch.zeros(spec["vocab"], dtype=wdtype, device=device) if spec["bias"] else None
        hidden = torch.full((ROWS, _LOSS_HIDDEN), 0.5, dtype=dtype, device=device, requires_grad=True)
        labels = torch.zeros(ROWS, dtype=torch.long, device=device)
        loss = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, logit_softcapping=spec["softcap"])
        torch.autograd.grad(loss, [hidden, weight] if spec["trains"] else [hidden])
    elif spec["op"] == "rope":
        _run_rope(spec, dtype, device)
    else:
        raise ValueError(f"unknown op {spec['op']!r}")


def _run_rope(spec: dict[str, Any], dtype: torch.dtype, device: torch.device) -> None:
    """The rotary kernel on q/k laid out as the patched forward makes them: ``"text"``, views of one projection
    each (``[B, S, H*D]`` -> ``[B, H, S, D]``); ``"qkv"``, the Qwen-VL towers' slices of one fused projection
    (``[S, 3, H, D]``). The sequence length is a kernel argument Triton specializes on divisibility by 16: both
    variants, as for the norm."""
    from hf_fastvision.kernels.rope import apply_rotary_pos_emb, apply_rotary_pos_emb_vision

    hq, hk, d = spec["q_heads"], spec["kv_heads"], spec["head_dim"]
    cos_dtype = getattr(torch, spec["cos_dtype"])
    for rows in (ROWS, ROWS + 1):
        if spec["layout"] == "qkv":
            cos, sin = (torch.full((rows, d), v, dtype=cos_dtype, device=device) for v in (1.0, 0.0))
            qkv = torch.full((rows, 3 * hq * d), 0.5, dtype=dtype, device=device, requires_grad=True)
            q, k, _ = qkv.reshape(rows, 3, hq, d).permute(1, 0, 2, 3).unbind(0)
            outs, leaves = apply_rotary_pos_emb_vision(q, k, cos, sin), [qkv]
        else:
            cos, sin = (torch.full((1, rows, d), v, dtype=cos_dtype, device=device) for v in (1.0, 0.0))
            leaves = [torch.full((1, rows, h * d), 0.5, dtype=dtype, device=device, requires_grad=True)
                      for h in (hq, hk)]
            q, k = (t.view(1, rows, -1, d).transpose(1, 2) for t in leaves)
            outs = apply_rotary_pos_emb(q, k, cos, sin)
        torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])


def guarded_run(spec: dict[str, Any], device: torch.device) -> None:
    try:
        if device.type == "cuda":
            with torch.cuda.device(device), torch.cuda.stream(torch.cuda.Stream(device)):
                run_spec(spec, device)
                torch.cuda.current_stream().synchronize()  # its temporaries are freed after its kernels ran
        else:
            run_spec(spec, device)
    except Exception as exc:  # never fail training set-up over a warm-up
        logger.debug("precompile: %s failed (%s: %s); it compiles in the step instead", spec.get("op"),
                     type(exc).__name__, exc)


def helper_command(device_index: int) -> list[str]:
    """The helper process's command line (``-c``: the interpreter's path starts at the working directory, as the
    user's own process does, not in this folder, whose module names would shadow top-level ones)."""
    code = f"import runpy; runpy.run_path({str(Path(__file__).resolve())!r}, run_name='__main__')"
    return [sys.executable, "-c", code, str(device_index)]


def run_specs(specs: list[dict[str, Any]], device: torch.device, workers: int = 4) -> None:
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(lambda spec: guarded_run(spec, device), specs))


def _standalone_package() -> None:
    """Make ``hf_fastvision.kernels`` importable without running ``hf_fastvision/__init__.py`` (helper process)."""
    if "hf_fastvision" in sys.modules:
        return
    import types

    package = types.ModuleType("hf_fastvision")
    package.__path__ = [str(Path(__file__).resolve().parents[1])]
    sys.modules["hf_fastvision"] = package


NICENESS = 10  # the helper yields the CPU to the process it compiles for (its compiler subprocesses inherit it)


def _main(argv: list[str]) -> int:
    _standalone_package()
    try:  # in the bench its compiles overlapped peft's injection, which took 4-6x longer (cause not profiled)
        os.nice(NICENESS)
    except (AttributeError, OSError):  # no nice() on this platform
        pass
    specs = json.loads(sys.stdin.read() or "[]")
    device = torch.device("cuda", int(argv[0])) if argv and torch.cuda.is_available() else torch.device("cpu")
    run_specs(specs, device)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
