"""Saving never destroys data: refusals write nothing, the user's files survive, earlier saves are replaced atomically.

The writer is exercised through the real savers on a tiny model where it matters (adapter, merged 16-bit) and
directly (`SafeWriter` with a callback that writes a few files) for the crash states, which are produced by
killing a forked child at an exact point of the commit.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from hf_fastvision import writer
from hf_fastvision.errors import ManifestMismatchError, UnsafeDestinationError
from hf_fastvision.writer import MANIFEST, SafeWriter


@pytest.fixture(scope="module")
def lora_model(tiny_checkpoint):
    from hf_fastvision import FastVisionModel

    model, processor = FastVisionModel.from_pretrained(str(tiny_checkpoint("qwen2_5_vl")))
    model = FastVisionModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    return model, processor


def _save_files(dest, files: dict[str, str], **kw) -> Path:
    with SafeWriter(dest, **kw) as w:
        for rel, text in files.items():
            (w.tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (w.tmp / rel).write_text(text)
    return w.dest


def _ours_around(dest: Path) -> list[str]:
    siblings, inside = writer._pending(dest)
    return sorted(p.name for p in siblings + inside) + ([writer._lock_path(dest).name] if writer._lock_path(dest).exists() else [])


# --------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("where", [".", "", "   ", "/", "..", "cwd-absolute", "home", "~", "parent-of-cwd-absolute"])
def test_protected_destinations_are_refused(untouched, lora_model, where, tmp_path, monkeypatch):
    from hf_fastvision.training.saving import save_adapter

    home = tmp_path / "home"
    home.mkdir()
    (home / "precious.txt").write_text("keep")
    monkeypatch.setenv("HOME", str(home))
    untouched.watch(home)
    target = {"cwd-absolute": os.getcwd(), "home": str(home),
              "parent-of-cwd-absolute": str(Path(os.getcwd()).parent)}.get(where, where)
    with pytest.raises(UnsafeDestinationError, match="Refusing to save|empty|Name a new"):
        save_adapter(lora_model[0], target)


@pytest.mark.parametrize("saver", ["adapter", "merged_16bit", "merged_4bit"])
def test_path_to_a_file_is_refused(untouched, lora_model, saver):
    from hf_fastvision.training import saving

    Path("train.jsonl").write_text("{}\n")
    untouched.watch(Path.cwd())
    fn = {"adapter": saving.save_adapter, "merged_16bit": saving.save_merged_16bit,
          "merged_4bit": saving.save_merged_4bit}[saver]
    with pytest.raises(UnsafeDestinationError, match="it is a file"):
        fn(lora_model[0], "train.jsonl")


@pytest.mark.parametrize("clash", ["adapter_config.json", "README.md", "adapter_model.safetensors"])
def test_clash_with_a_file_we_did_not_write_is_refused_before_any_work(untouched, lora_model, clash):
    from hf_fastvision.training.saving import save_adapter

    out = Path("out")
    out.mkdir()
    (out / clash).write_text("the user's own")
    (out / "train.jsonl").write_text("{}\n")
    untouched.watch(out)
    with pytest.raises(UnsafeDestinationError, match="did not write.*overwrite=True"):
        save_adapter(lora_model[0], out)


def test_clash_found_only_after_writing_is_refused_and_leaves_nothing(untouched):
    out = Path("out")
    out.mkdir()
    (out / "notes.md").write_text("mine")
    untouched.watch(out)
    with pytest.raises(UnsafeDestinationError, match="notes.md"):
        _save_files(out, {"notes.md": "ours", "a.bin": "x"})
    assert _ours_around(out.resolve()) == []


def test_model_without_adapters_writes_nothing(untouched, tiny_checkpoint):
    from hf_fastvision import AutoFastVisionModel
    from hf_fastvision.training.saving import save_adapter

    base = AutoFastVisionModel.from_pretrained(str(tiny_checkpoint("qwen2_5_vl")))
    with pytest.raises(ValueError, match="get_peft_model"):
        save_adapter(base, "new/deep/adapter")
    assert not Path("new").exists()


def test_failing_save_removes_the_folders_it_made(untouched):
    with pytest.raises(RuntimeError, match="boom"):
        with SafeWriter("a/b/c"):
            raise RuntimeError("boom")
    assert not Path("a").exists()


# --------------------------------------------------------------------------------------------------- the user's files
def test_user_files_beside_are_kept_and_ours_replaced(lora_model, tmp_path):
    from hf_fastvision.training.saving import save_adapter

    out = tmp_path / "trainer_output"
    (out / "checkpoint-10").mkdir(parents=True)
    (out / "checkpoint-10" / "trainer_state.json").write_text("{}")
    (out / "train.jsonl").write_text("{}\n")
    save_adapter(lora_model[0], out, lora_model[1])
    first = writer.read_manifest(out)
    assert first is not None and "adapter_model.safetensors" in first["files"]
    assert "train.jsonl" not in first["files"] and "checkpoint-10/trainer_state.json" not in first["files"]
    save_adapter(lora_model[0], out, lora_model[1])  # ours again: replaced without overwrite=
    assert (out / "train.jsonl").read_text() == "{}\n" and (out / "checkpoint-10" / "trainer_state.json").exists()
    assert _ours_around(out) == []


def test_overwrite_replaces_only_the_colliding_files(lora_model, tmp_path):
    from hf_fastvision.training.saving import save_adapter

    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("mine")
    (out / "train.jsonl").write_text("{}\n")
    save_adapter(lora_model[0], out, overwrite=True)
    assert (out / "README.md").read_text() != "mine" and (out / "train.jsonl").read_text() == "{}\n"


def test_tilde_is_expanded(lora_model, tmp_path, monkeypatch):
    from hf_fastvision.training.saving import save_adapter

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    dest = save_adapter(lora_model[0], "~/out")
    assert dest == (tmp_path / "out").resolve() and (tmp_path / "out" / "adapter_config.json").is_file()
    assert not (tmp_path / "~").exists()


def test_earlier_save_replaced_and_stale_files_of_ours_removed(tmp_path):
    dest = tmp_path / "save"
    _save_files(dest, {"model-00001-of-00002.safetensors": "a", "model-00002-of-00002.safetensors": "b"})
    _save_files(dest, {"model.safetensors": "ab"})
    assert sorted(p.name for p in dest.iterdir()) == [MANIFEST, "model.safetensors"]
    assert _ours_around(dest) == []


def test_symlinked_destination_keeps_its_link(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    _save_files(link, {"a.txt": "1"})
    _save_files(link, {"a.txt": "2"})
    assert link.is_symlink() and (real / "a.txt").read_text() == "2"


def test_second_live_writer_waits_for_the_lock(tmp_path):
    dest = tmp_path / "save"
    with SafeWriter(dest) as w:
        (w.tmp / "a.txt").write_text("1")
        with pytest.raises(UnsafeDestinationError, match="Another process is saving"):
            SafeWriter(dest, lock_timeout=0.2).__enter__()
    assert (dest / "a.txt").read_text() == "1"


# --------------------------------------------------------------------------------------------------- crashes
def _kill_at(monkeypatch_target: str, n: int, dest: Path, files: dict[str, str]) -> None:
    """Fork; in the child, SIGKILL itself at the n-th call of `os.<monkeypatch_target>` inside the writer."""
    pid = os.fork()
    if pid == 0:
        real = getattr(os, monkeypatch_target)
        calls = [0]

        def dying(*a, **k):
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)

        setattr(writer.os, monkeypatch_target, dying)
        try:
            _save_files(dest, files)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


@pytest.mark.parametrize("point", [("rename", 1), ("rename", 2), ("replace", 1), ("replace", 2)])
def test_swap_killed_at_each_step_leaves_old_or_new(tmp_path, point):
    dest = tmp_path / "save"
    _save_files(dest, {"w.bin": "old", "cfg.json": "{}"})
    _kill_at(point[0], point[1], dest, {"w.bin": "new!", "cfg.json": "{}"})
    writer.recover(dest)  # what the next save or load runs first
    assert (dest / "w.bin").read_text() in ("old", "new!")
    writer.check_manifest(dest)
    _save_files(dest, {"w.bin": "newer", "cfg.json": "{}"})
    assert _ours_around(dest) == [] and (dest / "w.bin").read_text() == "newer"


def test_killed_between_the_renames_rolls_forward_on_load(tmp_path):
    dest = tmp_path / "save"
    _save_files(dest, {"w.bin": "old"})
    _kill_at("rename", 2, dest, {"w.bin": "new!"})  # old moved aside, new not yet in
    assert not dest.exists()
    assert writer.recover(dest)
    assert (dest / "w.bin").read_text() == "new!" and _ours_around(dest) == []


@pytest.mark.parametrize("n", range(1, 8))
def test_beside_mode_killed_mid_move_is_finished_by_the_next_save(tmp_path, n):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "train.jsonl").write_text("{}\n")
    _save_files(dest, {"a.bin": "old", "b.bin": "old", "c.bin": "old"})
    _kill_at("replace", n, dest, {"a.bin": "new!", "b.bin": "new!", "c.bin": "new!"})
    writer.recover(dest)
    texts = {(dest / f).read_text() for f in ("a.bin", "b.bin", "c.bin")}
    assert texts in ({"old"}, {"new!"}) and (dest / "train.jsonl").read_text() == "{}\n"
    writer.check_manifest(dest)
    assert _ours_around(dest) == []
    _save_files(dest, {"a.bin": "newer", "b.bin": "newer", "c.bin": "newer"})
    assert sorted(p.name for p in dest.iterdir()) == [MANIFEST, "a.bin", "b.bin", "c.bin", "train.jsonl"]


def test_stale_temporaries_of_dead_writers_are_removed_by_the_next_save(tmp_path):
    dest = tmp_path / "save"
    _save_files(dest, {"w.bin": "old"})
    (tmp_path / ".save.hffv-new-otherhost-999-1").mkdir()
    (tmp_path / ".save.hffv-merged16-otherhost-999-1").mkdir()
    (tmp_path / ".save.hffv-lock").write_text("")
    _save_files(dest, {"w.bin": "new"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["save"]


# --------------------------------------------------------------------------------------------------- loading
def test_loading_a_folder_whose_manifest_disagrees_says_so(untouched, lora_model, tiny_checkpoint):
    from hf_fastvision import AutoFastVisionModel
    from hf_fastvision.training.saving import save_merged_16bit

    out = Path("merged")
    save_merged_16bit(lora_model[0], out, lora_model[1], dtype=torch.float32)
    data = json.loads((out / MANIFEST).read_text())
    data["files"]["model.safetensors"] += 1
    (out / MANIFEST).write_text(json.dumps(data))
    untouched.watch(Path.cwd())
    with pytest.raises(ManifestMismatchError, match="changed size model.safetensors.*Save the model again"):
        AutoFastVisionModel.from_pretrained(str(out), load_in_16bit=True)


def test_loading_finishes_an_interrupted_swap(lora_model, tmp_path):
    from hf_fastvision import AutoFastVisionModel
    from hf_fastvision.training.saving import save_merged_16bit

    out = tmp_path / "merged"
    save_merged_16bit(lora_model[0], out, lora_model[1], dtype=torch.float32)
    os.rename(out, tmp_path / ".merged.hffv-new-h-1-1")  # as if killed between the swap's two renames
    model = AutoFastVisionModel.from_pretrained(str(out), load_in_16bit=True)
    assert model is not None and out.is_dir() and _ours_around(out) == []


# --------------------------------------------------------------------------------------------------- Trainer
def test_trainer_checkpoints_and_resume_work_beside_our_save(lora_model, tiny_checkpoint, tmp_path):
    from transformers import Trainer, TrainingArguments

    from hf_fastvision.archs.tiny import sample_batch
    from hf_fastvision.training.saving import save_adapter

    model, processor = lora_model
    batch = {k: v for k, v in sample_batch(processor, "qwen2_5_vl", n=1).items()}

    class One(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"i": i}

    out = tmp_path / "run"
    args = TrainingArguments(output_dir=str(out), max_steps=2, save_steps=1, per_device_train_batch_size=1,
                             report_to=[], use_cpu=True, remove_unused_columns=False)
    Trainer(model=model, args=args, train_dataset=One(), data_collator=lambda xs: dict(batch)).train()
    save_adapter(model, out, processor)  # our files beside the Trainer's checkpoint-* folders
    assert (out / "checkpoint-2").is_dir() and (out / "adapter_config.json").is_file()
    args2 = TrainingArguments(output_dir=str(out), max_steps=3, save_steps=1, per_device_train_batch_size=1,
                              report_to=[], use_cpu=True, remove_unused_columns=False)
    Trainer(model=model, args=args2, train_dataset=One(), data_collator=lambda xs: dict(batch)).train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert (out / "checkpoint-3").is_dir() and (out / "adapter_config.json").is_file()
    writer.check_manifest(out)
