"""The single numerical tolerance table of the project, keyed by dtype.

Use it everywhere a result is compared with a reference::

    from hf_fastvision.tolerances import TOLERANCES, assert_close
    assert_close(out, ref)                  # dtype inferred (least precise of the two)
    assert_close(out, ref, dtype=torch.bfloat16)

Rationale: a fused kernel computes in fp32 and rounds once, whereas a pure-torch
reference in half precision rounds after every op; the difference is a few ulps of the
storage dtype (bf16 ulp = 2**-8 relative, fp16 ulp = 2**-11 relative). fp32 entries leave
room for a different summation order in reductions.
"""

from __future__ import annotations

import torch

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=2e-3, rtol=4e-3),
}

# Least precise first: used to choose the dtype when two tensors of different dtypes meet.
_PRECISION_ORDER = (torch.bfloat16, torch.float16, torch.float32)


def get_tolerance(dtype: torch.dtype) -> dict[str, float]:
    """``dict(atol=..., rtol=...)`` for ``dtype`` (float64 uses the fp32 entry)."""
    if dtype == torch.float64:
        dtype = torch.float32
    try:
        return dict(TOLERANCES[dtype])
    except KeyError:
        raise KeyError(f"no tolerance for dtype {dtype}; known: {list(TOLERANCES)}") from None


def _least_precise(*dtypes: torch.dtype) -> torch.dtype:
    for d in _PRECISION_ORDER:
        if d in dtypes:
            return d
    return torch.float32


def assert_close(actual, expected, dtype: torch.dtype | None = None, msg: str | None = None) -> None:
    """``torch.testing.assert_close`` with the tolerance of ``dtype``.

    ``dtype`` defaults to the least precise floating dtype among ``actual`` and ``expected``.
    Both sides are compared in float32 on the CPU-or-device of ``actual``, so a half precision
    result can be checked against an fp32 reference.
    """
    actual_t = torch.as_tensor(actual)
    expected_t = torch.as_tensor(expected)
    if dtype is None:
        dtype = _least_precise(actual_t.dtype, expected_t.dtype)
    tol = get_tolerance(dtype)
    a = actual_t.detach().to(torch.float32)
    e = expected_t.detach().to(device=a.device, dtype=torch.float32)
    torch.testing.assert_close(a, e, check_dtype=False, msg=msg, **tol)
