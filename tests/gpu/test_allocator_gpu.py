"""Expandable segments deferred to training (GPU machine): with ``HF_FASTVISION_EXPANDABLE_SEGMENTS=train`` the
load's allocations land in fixed-size segments, and `enable_for_training` switches the running allocator so that
later ones land in expandable segments (fresh processes: the mode is read at import)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SCRIPT = textwrap.dedent("""
    import json, torch
    import hf_fastvision
    from hf_fastvision import allocator

    def expandable(t):
        base = t.untyped_storage().data_ptr()
        for seg in torch.cuda.memory._snapshot()["segments"]:
            if seg["address"] <= base < seg["address"] + seg["total_size"]:
                return bool(seg.get("is_expandable", False))
        raise AssertionError("no segment holds the tensor")

    before = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    freed = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    del freed
    reserved_with_freed = torch.cuda.memory_reserved()
    import warnings
    warnings.simplefilter("error", FutureWarning)  # a deprecated setter would fail the switch, not just warn
    switch = allocator.enable_for_training()
    reserved_after_switch = torch.cuda.memory_reserved()
    after = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    print(json.dumps({"setup": hf_fastvision.ALLOCATOR_SETUP, "switch": switch, "before": expandable(before),
                      "after": expandable(after), "released": reserved_with_freed - reserved_after_switch}))
""")


def _run(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    env["HF_FASTVISION_EXPANDABLE_SEGMENTS"] = mode
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_train_mode_switches_the_running_allocator():
    got = _run("train")
    assert got["setup"] == "deferred to training" and got["switch"] == "switched at training"
    assert got["before"] is False and got["after"] is True
    assert got["released"] >= 256 << 20  # the freed block's segment went back before the switch


def test_import_mode_is_expandable_from_the_start():
    got = _run("import")
    assert got["setup"] == "set" and got["switch"] == "nothing deferred"
    assert got["before"] is True and got["after"] is True
