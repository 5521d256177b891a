"""`hf-fastvision info`: resolution, architecture, plan and memory from the config alone; errors exit 2."""

from __future__ import annotations

import json

import torch

from hf_fastvision.cli import main


def test_info_text_and_json(tiny_checkpoint, capsys, monkeypatch):
    folder = tiny_checkpoint("qwen2_5_vl")
    loads = []
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", lambda *a, **k: loads.append(1))
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "qwen2_5_vl" in out and "local folder" in out and "lm_head" in out and "model.visual.merger" in out
    assert "4-bit nf4" in out and "weights memory" in out
    assert main(["info", str(folder), "--json", "--keep-vision-16bit"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["arch"] == "qwen2_5_vl" and data["plan"]["keep_vision_16bit"]
    assert not any(n.startswith("model.visual.blocks") for n in data["plan"]["quantized"])
    assert data["memory"]["total_gib"] > 0
    assert not loads  # no weights were loaded


def test_info_errors_exit_2(capsys, tmp_path):
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_pull_from_cache_offline(tiny_checkpoint, tmp_path, capsys):
    from hf_fastvision import AutoFastVisionModel

    sha = "b" * 40
    repo = tmp_path / "cache" / "models--someone--tiny-bnb-4bit"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    AutoFastVisionModel.from_pretrained(tiny_checkpoint("qwen2_vl")).save_pretrained(repo / "snapshots" / sha)
    assert main(["pull", "someone/tiny-bnb-4bit", "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "bitsandbytes 4-bit checkpoint" in out and sha in out
    assert main(["pull", "someone/not-cached", "--cache-dir", str(tmp_path / "cache")]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err
