"""Quantize → push → pull into an empty cache → load offline: logits identical to the model before the push.

Three representative architectures, three ways in: qwen2_vl through the quantize pipeline, idefics3 (text model
at `model.text_model`) through `model.push_to_hub`, mllama (cross-attention) through `push_4bit` to a branch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hf_fastvision import AutoFastVisionModel, FastVisionModel
from hf_fastvision.hub import _front_matter, inspect_checkpoint, is_4bit_model
from hf_fastvision.quantize import sample_inputs, stable_logits


def _load_offline(repo_id: str, cache: Path, revision: str = "main"):
    model = AutoFastVisionModel.from_pretrained(repo_id, revision=revision, cache_dir=str(cache))
    assert is_4bit_model(model)
    assert model.hf_fastvision.prequantized
    return model


def test_quantize_push_pull_roundtrip(qwen_roundtrip, hub_servers):
    report, pulled = qwen_roundtrip["report"], qwen_roundtrip["pulled"]
    QWEN_REPO, QWEN_BASE = qwen_roundtrip["repo_id"], qwen_roundtrip["base_model"]
    assert report["reload_identical"] is True
    assert 0 <= report["logit_error"]["relative"] < 1 and report["logit_error"]["positions"] > 0
    assert report["commit"] and hub_servers.head(QWEN_REPO) in report["commit"]
    # One commit on top of the repo's initial commit: the upload was a single commit.
    assert hub_servers.commit_count(QWEN_REPO) == 2
    assert sorted(hub_servers.files(QWEN_REPO)) == sorted(pulled["files"])
    assert pulled["quant_type"] == "nf4" and "model.visual.merger" in pulled["kept"]
    assert Path(pulled["path"]).is_relative_to(qwen_roundtrip["cache"])

    model = _load_offline(QWEN_REPO, qwen_roundtrip["cache"])
    model2, processor = FastVisionModel.from_pretrained(QWEN_REPO, revision="main", cache_dir=str(qwen_roundtrip["cache"]))
    inputs = sample_inputs(processor)
    assert torch.equal(stable_logits(model, inputs), torch.load(qwen_roundtrip["logits"]))
    assert torch.equal(stable_logits(model2, inputs), torch.load(qwen_roundtrip["logits"]))

    meta = _front_matter(Path(pulled["path"]) / "README.md")
    assert meta["base_model"] == QWEN_BASE and meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-text-to-text"
    assert {"bitsandbytes", "4-bit", "hf_fastvision", "qwen2_vl"} <= set(meta["tags"])
    card = (Path(pulled["path"]) / "README.md").read_text()
    for text in ("model.visual.merger", "top-1 token agreement", "AutoFastVisionModel", "AutoModelForImageTextToText",
                 QWEN_REPO):
        assert text in card


@pytest.mark.parametrize(
    ("name", "via", "revision", "with_processor"),
    [("idefics3", "push_to_hub", None, True), ("mllama", "push_4bit", "v1", False)],
)
def test_push_loaded_model_roundtrip(name, via, revision, with_processor, servers, hub_client, tiny_checkpoint,
                                     tmp_path):
    """push_4bit without a processor copies the processor files of the checkpoint the model was loaded from."""
    repo_id = f"hf-fastvision-test/tiny-{name}-bnb-4bit"
    src = tiny_checkpoint(name)
    kwargs = {"revision": revision} if revision else {}
    pushed = hub_client.call("push", src=str(src), repo_id=repo_id, via=via, base_model=f"tiny-org/{name}",
                             logits_out=str(tmp_path / "logits.pt"), with_processor=with_processor, **kwargs)
    ref = revision or "main"
    assert servers.head(repo_id, ref) == pushed["oid"]
    if revision:
        assert "model.safetensors" not in servers.files(repo_id, "main")  # the branch got it, main did not
    cache = tmp_path / "cache"
    pulled = hub_client.call("pull", repo_id=repo_id, revision=ref, cache_dir=str(cache), endpoint=servers.olah_url)
    info = inspect_checkpoint(pulled["path"])
    assert info.model_type == name and info.quantized_tensors > 0

    model = _load_offline(repo_id, cache, ref)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(pulled["path"])
    assert torch.equal(stable_logits(model, sample_inputs(processor)), torch.load(tmp_path / "logits.pt"))
    meta = _front_matter(Path(pulled["path"]) / "README.md")
    assert meta["base_model"] == f"tiny-org/{name}" and name in meta["tags"]
