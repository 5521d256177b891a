"""`scripts/bench_qlora.py` end to end on the tiny model (CPU, offline): a smoke test of the script the GPU runs
spend their time on, not a timing. Ours and the plain recipe train in their own processes on the same folder
and batch; the CSV holds every column the README table is made of, the load phases, and the per-step losses,
which agree at step 1 (same weights, same batch). Flags reach our worker (`--ours-patches`)."""

from __future__ import annotations

import ast
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_qlora.py"


def test_the_benchmark_runs_ours_and_the_plain_recipe_on_the_tiny_model(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--model", "tiny", "--seqs", "128", "--systems", "ours", "hf", "--steps", "2",
           "--budget", "240", "--out", str(out), "--workdir", str(tmp_path / "work"),
           "--ours-patches", '{"mlp_lean_recompute": true}']
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["system"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert set(rows) == {"ours", "hf"}
    for system, row in rows.items():
        assert row["status"] == "ok", (system, row["error"])
        for column in ("step_s", "tokens_per_s", "first_step_s", "load_s"):
            assert float(row[column]) > 0, (system, column)
        assert row["load_parts"].startswith("{'from_pretrained'"), row["load_parts"]
        assert row["first_step_triton"].startswith("{'compiles': "), row["first_step_triton"]
        gc_s = ast.literal_eval(row["gc_s"])  # the cyclic collector's seconds in the load and in step 1
        assert set(gc_s) == {"load", "load_full", "step1", "step1_full"} and gc_s["load"] >= 0, gc_s
        assert len(row["losses"].split()) == 2
        probe = ast.literal_eval(row["host_probe_ms"])  # the host's speed as the load starts and around the steps
        assert set(probe) == {"load", "before", "after"} and all(v > 0 for v in probe.values()), probe
    # ours' LoRA set-up timed by part; the recipe's phases one by one
    splits = ast.literal_eval(rows["ours"]["load_splits"])  # a dict's repr, as the CSV writes it
    assert set(splits) == {"targets", "peft", "lora_plan", "lora_draw_wait", "lora_allocate", "lora_materialize", "lora_patches",
                           "for_training", "lora_total", "lora_draw_wall", "lora_draw_cpu"} and all(v >= 0 for v in splits.values())
    assert list(ast.literal_eval(rows["hf"]["load_parts"])) == ["from_pretrained", "processor", "prepare", "checkpointing", "peft"]
    first = [float(rows[s]["losses"].split()[0]) for s in ("ours", "hf")]
    assert abs(first[0] - first[1]) < 1e-2 * abs(first[1]), first
    assert rows["ours"]["n_lora"] == rows["hf"]["n_lora"] and int(rows["ours"]["n_lora"]) > 0
    table = (out / "results.md").read_text()
    assert "| tiny qwen2_5_vl | 128 | ours |" in table and "| tiny qwen2_5_vl | 128 | hf |" in table
    # each system ran with its own cache folders (`--caches fresh`, the default)
    for system in ("ours", "hf"):
        assert (tmp_path / "work" / "caches" / system / "triton_cache_dir").is_dir()
    assert "caches: fresh per system" in done.stdout


def test_fresh_caches_are_empty_per_process_and_the_worker_env_carries_them(script_module, tmp_path):
    bq = script_module("bench_qlora")
    first = bq._fresh_caches(tmp_path, "ours")
    assert set(first) == set(bq.CACHE_VARS)
    (Path(first["TRITON_CACHE_DIR"]) / "kernel.cubin").write_text("x")
    again = bq._fresh_caches(tmp_path, "ours")  # a rerun starts empty again
    assert again == first and not any(Path(again["TRITON_CACHE_DIR"]).iterdir())
    other = bq._fresh_caches(tmp_path, "hf")
    assert all(other[v] != first[v] for v in bq.CACHE_VARS)
    env = bq._worker_env(other)
    assert env["CUDA_CACHE_PATH"] == other["CUDA_CACHE_PATH"] and env["HF_HUB_OFFLINE"] == "1"
    assert bq._worker_env().get("CUDA_CACHE_PATH") == os.environ.get("CUDA_CACHE_PATH")  # shared: untouched


def test_a_row_with_only_the_warm_up_step_reports_no_step_time(script_module):
    steady_step = script_module("bench_qlora").steady_step
    # Unsloth's first Llama step compiled for 89 s and the budget ended there: that is not a step time
    step_s, median_of, status, err = steady_step([89.5], 6, "ok", "time budget: 1 of 6 steps")
    assert (step_s, median_of, status) == (None, "step 1", "incomplete") and "only step 1 of 6" in err
    assert steady_step([3.0, 2.0, 1.0, 1.2, 1.1], 5, "ok", None)[:3] == (1.1, "steps 3..5", "ok")
    assert steady_step([3.0, 2.0], 6, "ok", None)[:3] == (2.0, "steps 2..2", "ok")
    assert steady_step([0.5], 1, "ok", None)[:3] == (0.5, "step 1", "ok")  # one step asked for, one step given
    assert steady_step([], 6, "OOM", "step 1: OOM")[:3] == (None, "none", "OOM")


def test_the_warm_up_runs_its_code_from_a_file_with_throwaway_caches(script_module, tmp_path, monkeypatch, capsys):
    bq = script_module("bench_qlora")
    # the real code needs CUDA; this stand-in checks what the real one relies on: a file (Triton reads a
    # kernel's source) and its own cache folders
    monkeypatch.setattr(bq, "WARMUP_CODE", "import inspect, os\n"
                        "def f():\n    pass\n"
                        "assert inspect.getsource(f)\n"
                        "assert os.environ['TRITON_CACHE_DIR'].endswith('warmup/triton_cache_dir')\n")
    seconds = bq.warm_machine(tmp_path)
    assert seconds is not None and seconds >= 0
    monkeypatch.setattr(bq, "WARMUP_CODE", "raise SystemExit('no GPU here')\n")
    assert bq.warm_machine(tmp_path) is None
    assert "warm-up process failed" in capsys.readouterr().out


def test_the_header_says_whether_the_warm_up_ran_failed_or_was_off(script_module):
    bq = script_module("bench_qlora")
    meta = {"model_label": "tiny", "device_name": "cpu", "versions": {"torch": "x"}, "batch": 1, "steps": 2,
            "seqs": [64], "caches": "fresh"}
    assert "warm-up process none" in bq._header_text(meta)
    assert "warm-up process 7.1 s before the first system" in bq._header_text({**meta, "warmup_s": 7.1})
    assert "warm-up process FAILED" in bq._header_text({**meta, "warmup_s": None})
