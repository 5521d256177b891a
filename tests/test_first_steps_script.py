"""scripts/first_steps.py's stack sampler (the GPU runs happen on the GPU machine)."""

from __future__ import annotations

import threading
import time


def _spin_here(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        time.sleep(0.0005)  # releases the GIL, as CUDA launches and syncs do


def _worker(seconds: float) -> None:
    _spin_here(seconds)


def test_the_sampler_counts_every_thread_and_the_innermost_frame_of_ours(script_module):
    fs = script_module("first_steps")
    with fs.StackSampler(0.002, ours="test_first_steps_script") as sampler:
        other = threading.Thread(target=_worker, args=(0.15,))
        other.start()
        _spin_here(0.15)
        other.join()
    assert sampler.samples > 10
    spin = [k for k in sampler.own if k.endswith(":_spin_here")]
    assert spin and all(k.startswith("tests/test_first_steps_script.py:") for k in spin)
    # both threads wait in `_spin_here`: the sampler sees both stacks at each tick
    assert sum(sampler.own[k] for k in spin) > sampler.samples
    top = sampler.top(3)
    assert top["innermost_of_ours"][0][0] in spin and top["innermost_of_ours"][0][1] > 0


def test_the_compile_timer_records_triton_compilations_per_thread_and_restores_triton(script_module, monkeypatch):
    jit = __import__("pytest").importorskip("triton.runtime.jit")
    fs = script_module("first_steps")

    def fake_compile(self, *args, **kwargs):  # stands in for a real compilation
        time.sleep(0.01)
        return "kernel"

    monkeypatch.setattr(jit.JITFunction, "_do_compile", fake_compile)

    class Kernel:
        __name__ = "_rms_norm_fwd_kernel"

    with fs.CompileTimer() as timer:
        assert jit.JITFunction._do_compile(Kernel()) == "kernel"
        worker = threading.Thread(target=jit.JITFunction._do_compile, args=(Kernel(),), name="autograd-like")
        worker.start()
        worker.join()
    assert jit.JITFunction._do_compile is fake_compile
    summary = timer.summary()
    assert summary["compiles"] == 2 and summary["kernels"] == ["_rms_norm_fwd_kernel"]
    assert set(summary["seconds_by_thread"]) == {"MainThread", "autograd-like"} and summary["seconds"] >= 0.02
