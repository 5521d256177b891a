"""The README's main job, shortened: accuracy goes from near chance to >= 90%, and the saved adapter reloads."""

from __future__ import annotations

from hf_fastvision.demo import COLOURS, run_demo


def test_demo_teaches_a_new_visual_task(tmp_path, capsys):
    result = run_demo(quick=True, output_dir=str(tmp_path))
    chance = 1 / len(COLOURS)
    assert result["before"] <= chance + 0.25, result
    assert result["after"] >= 0.9, result
    assert result["reloaded"] >= 0.9, result
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    out = capsys.readouterr().out
    assert "accuracy before fine-tuning" in out and "accuracy after" in out
