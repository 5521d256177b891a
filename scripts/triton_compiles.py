"""Triton compilations counted and timed per thread (shared by `first_steps.py` and `bench_qlora.py`'s workers)."""

from __future__ import annotations

import collections
import threading
import time


class CompileTimer:
    """Times Triton's compilations (in-memory cache misses: a disk-cache hit still loads the binary) per thread,
    by wrapping ``JITFunction._do_compile``; inactive where Triton or that method is missing."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float]] = []  # (kernel, thread name, seconds)
        self._jit = self._real = None

    def __enter__(self) -> CompileTimer:
        try:
            from triton.runtime import jit
        except ImportError:
            return self
        real = getattr(jit.JITFunction, "_do_compile", None)
        if real is None:
            return self
        calls = self.calls

        def timed(fn_self, *args, **kwargs):
            t = time.perf_counter()
            try:
                return real(fn_self, *args, **kwargs)
            finally:
                name = getattr(fn_self, "__name__", None) or getattr(getattr(fn_self, "fn", None), "__name__", "?")
                calls.append((name, threading.current_thread().name, time.perf_counter() - t))

        self._jit, self._real = jit.JITFunction, real
        jit.JITFunction._do_compile = timed
        return self

    def __exit__(self, *exc: object) -> None:
        if self._jit is not None:
            self._jit._do_compile = self._real

    def summary(self) -> dict[str, object]:
        by_thread: collections.Counter[str] = collections.Counter()
        for _, thread, secs in self.calls:
            by_thread[thread] += secs
        return {"compiles": len(self.calls), "seconds": round(sum(c[2] for c in self.calls), 3),
                "seconds_by_thread": {k: round(v, 3) for k, v in by_thread.items()},
                "kernels": sorted({c[0] for c in self.calls})}
