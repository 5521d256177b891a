"""`scripts/bench_text_attention.py` on CPU: every variant it can run here (torch's default dispatch and the math
backend, with the key/value heads passed grouped and repeated) computes the same causal attention and the same
input gradients; the FLOP count is the causal one. The timings are a GPU matter and not checked."""

from __future__ import annotations

import json


def test_every_cpu_variant_matches_the_default_dispatch(tmp_path, script_module):
    bta = script_module("bench_text_attention")
    assert bta.main(["--device", "cpu", "--seqs", "33", "48", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                     "--repeats", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "text_attention.json").read_text())["rows"]
    assert [(r["seq"], r["variant"]) for r in rows] == [
        (s, v) for s in (33, 48) for v in ("default_gqa", "default_repeat", "math_gqa", "math_repeat")]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["max_err_out"] < 1e-5 and r["max_err_grad"] < 1e-5, r
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
    assert "| 48 | math_repeat |" in (tmp_path / "text_attention.md").read_text()


def test_the_flop_count_is_the_lower_triangle(script_module):
    # QK^T and PV: 2 matmuls x 2 FLOPs per multiply-add, over half of the seq x seq scores
    assert script_module("bench_text_attention").causal_flops(1, 32, 8192, 128) == 4.0 * 32 * 8192 * 8192 * 128 / 2
