"""`hf-fastvision quantize` without a server: --dry-run, --local-dir (atomic), verification before publishing."""

from __future__ import annotations

import json
import runpy
import shutil
import sys
from pathlib import Path

import pytest

from hf_fastvision import quantize as q
from hf_fastvision.hub import _front_matter, inspect_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_prints_the_plan_without_weights(tiny_checkpoint, tmp_path, capsys):
    src = tmp_path / "config-only"
    shutil.copytree(tiny_checkpoint("qwen2_vl"), src)
    for weights in src.glob("*.safetensors"):
        weights.unlink()  # a dry run must not need them
    assert q.quantize_command([str(src), "me/x-bnb-4bit", "--dry-run", "--json", "--keep", r"layers\.1\.mlp"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["arch"] == "qwen2_vl" and plan["plan"]["quant_type"] == "nf4" and plan["plan"]["double_quant"]
    assert "lm_head" in plan["kept_modules"] and "model.visual.merger" in plan["kept_modules"]
    assert any("layers.1.mlp" in m for m in plan["kept_modules"])
    assert 0 < plan["size_4bit_estimate"] < plan["size_16bit"]
    assert q.quantize_command([str(src), "--dry-run", "--quant-type", "fp4", "--no-double-quant"]) == 0
    out = capsys.readouterr().out
    assert "4-bit fp4" in out and "double quant" not in out and "kept 16-bit lm_head" in out


def test_local_dir_is_written_atomically_and_verified(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    src = tiny_checkpoint("gemma3")
    dest = tmp_path / "out" / "gemma3-bnb-4bit"
    argv = [str(src), "me/tiny-gemma3-bnb-4bit", "--local-dir", str(dest), "--base-model", "tiny-org/gemma3",
            "--no-progress"]

    # A checkpoint that does not reproduce the in-memory model is not published, and no folder is left behind.
    real = q.stable_logits
    calls = []

    def drifting(model, inputs):
        calls.append(1)
        logits = real(model, inputs)
        return logits + 1e-3 if len(calls) == 2 else logits  # 1: the in-memory 4-bit model, 2: the reload

    monkeypatch.setattr(q, "stable_logits", drifting)
    assert q.quantize_command(argv) == 1
    assert "does not reproduce" in capsys.readouterr().err
    assert not dest.exists() and not dest.parent.exists()  # the folders the failed save made are gone too
    monkeypatch.setattr(q, "stable_logits", real)

    assert q.quantize_command(argv) == 0
    out = capsys.readouterr().out
    assert "identical logits" in out and "logit error" in out
    assert list(dest.parent.iterdir()) == [dest]  # no temporary folder left
    info = inspect_checkpoint(dest)
    assert info.model_type == "gemma3" and info.quant_type == "nf4"
    assert {"tokenizer.json", "chat_template.jinja", "README.md"} <= set(info.files)
    meta = _front_matter(dest / "README.md")
    assert meta["base_model"] == "tiny-org/gemma3" and "gemma3" in meta["tags"]
    assert "top-1 token agreement" in (dest / "README.md").read_text()

    # An earlier save of ours is replaced (atomically); the user's own files beside it are kept.
    (dest / "notes.txt").write_text("mine")
    assert q.quantize_command(argv) == 0
    capsys.readouterr()
    assert (dest / "notes.txt").read_text() == "mine" and sorted(p.name for p in dest.parent.iterdir()) == [dest.name]
    # A file of the same name that we did not write is refused without --force (checked before any work).
    (dest / ".hf_fastvision_save.json").unlink()
    assert q.quantize_command(argv) == 1
    assert "did not write" in capsys.readouterr().err and (dest / "notes.txt").read_text() == "mine"


def test_script_entry_point(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["quantize_and_push.py", "--help"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(ROOT / "scripts" / "quantize_and_push.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "--local-dir" in out and "--dry-run" in out and "REPO_ID" in out.upper()


@pytest.mark.parametrize("argv", [[], ["only-source"]])
def test_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        q.quantize_command(argv)
    assert exc.value.code == 2
