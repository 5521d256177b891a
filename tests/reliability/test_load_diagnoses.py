"""Load diagnoses: every bad checkpoint or id raises the right error, naming the fix, and writes nothing.

Broken checkpoints are copies of the tiny saved ones (`tiny_checkpoint`) edited in `tmp_path`; the Hub cache is a
hand-built cache layout; the network failure runs in a subprocess pointed at a closed localhost port.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_fastvision import (
    AutoFastVisionModel,
    CheckpointConfigError,
    CheckpointMismatchError,
    CorruptCheckpointError,
    FastVisionModel,
    HubUnreachableError,
    ModelNotFoundError,
)


SOURCE = "Qwen/Qwen2.5-VL-7B-Instruct"
TWIN = "unsloth/Qwen2.5-VL-7B-Instruct-bnb-4bit"


def _copy(tiny_checkpoint, tmp_path: Path, name: str = "qwen2_5_vl", dest: str = "ckpt") -> Path:
    folder = tmp_path / dest
    shutil.copytree(tiny_checkpoint(name), folder)
    return folder


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def _rewrite(folder: Path, edit, file: str = "model.safetensors") -> None:
    tensors = load_file(folder / file)
    edit(tensors)
    save_file(tensors, folder / file, metadata={"format": "pt"})


def _cache_repo(cache: Path, repo_id: str, sha: str = "b" * 40) -> None:
    """huggingface_hub's cache layout: refs/main → snapshots/<sha>/config.json."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(sha)
    (root / "snapshots" / sha).mkdir(parents=True)
    (root / "snapshots" / sha / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))


# ------------------------------------------------------------------------------------------- not found


def test_missing_local_folder_suggests_close_sibling(untouched):
    Path("models/qwen-tiny").mkdir(parents=True)
    untouched.watch(Path.cwd())
    with pytest.raises(ModelNotFoundError, match=r"does not exist\. Close matches in 'models': 'models/qwen-tiny'"):
        AutoFastVisionModel.from_pretrained("./models/qwen-tinny")


def test_missing_local_folder_without_match(untouched, tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist. Check the path"):
        FastVisionModel.from_pretrained(str(tmp_path / "nowhere" / "model"))


def test_hub_shaped_name_of_a_mistyped_local_folder(untouched):
    Path("runs/qwen-tiny").mkdir(parents=True)
    untouched.watch(Path.cwd())
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache.*close local names: 'runs/qwen-tiny'"):
        AutoFastVisionModel.from_pretrained("runs/qwen-tiyn")


@pytest.mark.parametrize("file", ["model.safetensors", "config.json"])
def test_path_to_a_file_names_its_folder(file, untouched, tiny_checkpoint, tmp_path):
    folder = untouched.watch(_copy(tiny_checkpoint, tmp_path))
    with pytest.raises(ModelNotFoundError, match=f"is a file, not a model folder. Pass the folder that holds it, '{folder}'"):
        AutoFastVisionModel.from_pretrained(str(folder / file))


def test_folder_without_config(untouched):
    Path("empty").mkdir()
    untouched.watch(Path.cwd())
    with pytest.raises(ModelNotFoundError, match="has no config.json.*save_pretrained"):
        AutoFastVisionModel.from_pretrained("./empty")


def test_invalid_hub_id(untouched):
    with pytest.raises(ModelNotFoundError, match="nor a valid Hub id.*'org/name'"):
        AutoFastVisionModel.from_pretrained("Qwen/Qwen 2.5 VL")


def test_offline_not_cached_keeps_its_message(untouched):
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE=1 is set and the model is not in the local Hugging Face cache"):
        FastVisionModel.from_pretrained("no-such-org/no-such-model")


def test_16bit_of_cached_twin_names_the_missing_source(untouched, tmp_path):
    cache = tmp_path / "cache"
    _cache_repo(cache, TWIN)
    untouched.watch(cache)
    with pytest.raises(ModelNotFoundError) as err:
        FastVisionModel.from_pretrained(TWIN, load_in_4bit=False, cache_dir=str(cache))
    message = str(err.value)
    assert f"16-bit source '{SOURCE}', which is not in the local Hugging Face cache" in message
    assert "use_exact_model_name=True" in message and "network access" in message


def test_16bit_of_uncached_twin_names_the_source(untouched, tmp_path):
    with pytest.raises(ModelNotFoundError, match=f"'{SOURCE}'.*Neither is cached: load '{SOURCE}' once with network"):
        AutoFastVisionModel.from_pretrained(TWIN, load_in_16bit=True, cache_dir=str(tmp_path / "empty-cache"))


# ------------------------------------------------------------------------------------------- network

_NETWORK_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    time.sleep = lambda seconds: None  # huggingface_hub's retry back-off: a refused connection fails at once
    from hf_fastvision import AutoFastVisionModel
    out = {}
    for name in sys.argv[1:]:
        try:
            AutoFastVisionModel.from_pretrained(name)
            out[name] = ["loaded", ""]
        except Exception as exc:
            out[name] = [type(exc).__name__, str(exc)]
    print("RESULT" + json.dumps(out))
    """
)
def snapshot(root: Path) -> list[tuple[str, int]]:
    """Every entry under `root` with its size (a module-scoped fixture cannot use the `untouched` guard)."""
    return sorted((p.relative_to(root).as_posix(), p.stat().st_size if p.is_file() else -1) for p in root.rglob("*"))


_NETWORK_IDS = ("someorg/some-model", SOURCE)  # a plain id, and one that resolves to its 4-bit twin first


@pytest.fixture(scope="module")
def unreachable_hub(tmp_path_factory):
    """Both ids loaded online against a closed localhost port, in one subprocess; (results, what it wrote)."""
    root = tmp_path_factory.mktemp("network")
    home, cwd = root / "hf_home", root / "cwd"
    home.mkdir()
    cwd.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connections are refused
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))}
    env.update(
        HF_HOME=str(home), HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HUB_ETAG_TIMEOUT="1",
        HF_HUB_DOWNLOAD_TIMEOUT="1", HF_HUB_DISABLE_XET="1",
        PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")]),
    )
    before = (snapshot(home), snapshot(cwd))
    proc = subprocess.run(
        [sys.executable, "-c", _NETWORK_SCRIPT, *_NETWORK_IDS], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=120,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")), None)
    assert line is not None, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(line.removeprefix("RESULT")), before == (snapshot(home), snapshot(cwd)), port


@pytest.mark.parametrize("name", _NETWORK_IDS)
def test_unreachable_hub_is_not_a_spelling_error(name, unreachable_hub, untouched):
    results, nothing_written, port = unreachable_hub
    kind, message = results[name]
    assert kind == HubUnreachableError.__name__, message
    assert issubclass(HubUnreachableError, ConnectionError)
    assert f"could not reach the Hub (http://127.0.0.1:{port}" in message
    assert "HF_ENDPOINT" in message and "set HF_HUB_OFFLINE=1 to use the" in message
    assert "spelling" not in message
    assert nothing_written


# ------------------------------------------------------------------------------------------- config.json


def test_invalid_json_names_line_and_column(untouched, tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    (folder / "config.json").write_text('{\n  "model_type": "qwen2_5_vl",\n  "hidden_size": 64,\n}\n')
    untouched.watch(folder)
    with pytest.raises(CheckpointConfigError, match=r"config.json' is not valid JSON: .* at line 4, column 1\. Fix the file"):
        AutoFastVisionModel.from_pretrained(folder)


def test_config_not_utf8(untouched, tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    (folder / "config.json").write_bytes(b'{"model_type": "qwen\xff"}')
    untouched.watch(folder)
    with pytest.raises(CheckpointConfigError, match="not valid JSON: not UTF-8 text"):
        AutoFastVisionModel.from_pretrained(folder)


def test_config_not_an_object(untouched, tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    (folder / "config.json").write_text("[1, 2]")
    untouched.watch(folder)
    with pytest.raises(CheckpointConfigError, match="holds a JSON list, not an object.*save_pretrained"):
        AutoFastVisionModel.from_pretrained(folder)


def test_config_without_model_type(untouched, tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    _edit_config(folder, model_type=None)
    untouched.watch(folder)
    with pytest.raises(CheckpointConfigError, match="has no `model_type` key.*Add the checkpoint's model_type"):
        AutoFastVisionModel.from_pretrained(folder)


def test_unknown_model_type_suggests_close_ones(untouched, tiny_checkpoint, tmp_path):
    import transformers

    folder = _copy(tiny_checkpoint, tmp_path)
    _edit_config(folder, model_type="qwen2_5vl")
    untouched.watch(folder)
    with pytest.raises(CheckpointConfigError) as err:
        AutoFastVisionModel.from_pretrained(folder)
    message = str(err.value)
    assert "'qwen2_5vl'" in message and "'qwen2_5_vl'" in message and transformers.__version__ in message
    assert "Upgrade transformers" in message and "trust_remote_code=True" in message


def test_remote_code_needs_trust(untouched, tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    _edit_config(folder, model_type="my_remote_vl", auto_map={"AutoConfig": "configuration_my.MyConfig"})
    untouched.watch(folder)
    with pytest.raises(CheckpointConfigError, match=r"Pass trust_remote_code=True \(runs code from the repo"):
        AutoFastVisionModel.from_pretrained(folder)


def test_trusted_remote_code_missing_its_module(untouched, tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    auto_map = {"AutoConfig": "configuration_my.MyConfig", "AutoModelForImageTextToText": "modeling_my.MyModel"}
    _edit_config(folder, model_type="my_remote_vl", auto_map=auto_map)
    (folder / "configuration_my.py").write_text("# present\n")
    untouched.watch(folder)
    with pytest.raises(CheckpointConfigError, match=r"'modeling_my.py' named in config.json's auto_map is not in"):
        FastVisionModel.from_pretrained(str(folder), trust_remote_code=True)


def test_config_without_weights(untouched, tiny_checkpoint, tmp_path):
    folder = tmp_path / "config-only"
    folder.mkdir()
    for name in ("config.json", "generation_config.json"):
        shutil.copy(tiny_checkpoint("qwen2_5_vl") / name, folder / name)
    untouched.watch(folder)
    with pytest.raises(ModelNotFoundError, match="holds a config without weights.*it holds config.json, generation_config.json"):
        AutoFastVisionModel.from_pretrained(folder)


# ------------------------------------------------------------------------------------------- sharded index


def _shard(folder: Path) -> dict[str, str]:
    """Split model.safetensors into two shards with an index, as `save_pretrained` does for big models."""
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    keys = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2], "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    weight_map = {}
    for file, names in halves.items():
        save_file({k: tensors[k] for k in names}, folder / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in names})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def test_sharded_index_invalid_json(untouched, tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    _shard(folder)
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {"a": "b",}}')
    untouched.watch(folder)
    with pytest.raises(CorruptCheckpointError, match=r"model.safetensors.index.json' is corrupt or incomplete \(not valid JSON: .* line 1, column 26"):
        AutoFastVisionModel.from_pretrained(folder)


def test_sharded_index_without_weight_map(untouched, tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    _shard(folder)
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
    untouched.watch(folder)
    with pytest.raises(CorruptCheckpointError, match="no `weight_map`.*download it again"):
        AutoFastVisionModel.from_pretrained(folder)


def test_sharded_index_names_missing_shard(untouched, tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    _shard(folder)
    (folder / "model-00002-of-00002.safetensors").unlink()
    untouched.watch(folder)
    with pytest.raises(CorruptCheckpointError, match="names 1 shard file.*'model-00002-of-00002.safetensors'.*fetch the missing"):
        AutoFastVisionModel.from_pretrained(folder, load_in_16bit=True)


# ------------------------------------------------------------------------------------------- tensor shapes

_UP = "model.layers.0.mlp.up_proj.weight"  # stored in the old layout; the model has model.language_model.layers...


@pytest.mark.parametrize("kwargs", [{}, {"load_in_16bit": True}], ids=["4bit", "16bit"])
def test_wrong_shape_is_refused_before_loading(kwargs, untouched, tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    _rewrite(folder, lambda t: t.__setitem__(_UP, torch.zeros(100, t[_UP].shape[1])))
    untouched.watch(folder)
    with pytest.raises(CheckpointMismatchError) as err:
        AutoFastVisionModel.from_pretrained(folder, **kwargs)
    message = str(err.value)
    assert f"model.language_model.layers.0.mlp.up_proj.weight (checkpoint key '{_UP}' in model.safetensors)" in message
    assert "expected [128, 64], found [100, 64] F32" in message
    assert "ignore_mismatched_sizes=True" in message


def test_wrong_shape_in_a_shard_names_the_shard(untouched, tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path, "gemma3")
    weight_map = _shard(folder)
    key = next(k for k in sorted(weight_map) if weight_map[k].startswith("model-00002") and k.endswith("norm.weight"))
    _rewrite(folder, lambda t: t.__setitem__(key, torch.ones(t[key].numel() + 3)), weight_map[key])
    untouched.watch(folder)
    with pytest.raises(CheckpointMismatchError, match=f"'{key}' in model-00002-of-00002.safetensors"):
        FastVisionModel.from_pretrained(str(folder), load_in_16bit=True)


def test_wrong_shape_ignored_on_request(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    _rewrite(folder, lambda t: t.__setitem__(_UP, torch.zeros(100, t[_UP].shape[1])))
    model = AutoFastVisionModel.from_pretrained(folder, load_in_16bit=True, ignore_mismatched_sizes=True)
    assert model.model.language_model.layers[0].mlp.up_proj.weight.shape == (128, 64)  # re-initialised


@pytest.fixture(scope="module")
def prequantized(tiny_checkpoint, tmp_path_factory):
    """A pre-quantized bnb-4bit save of the tiny Qwen2.5-VL (packed weights + quant state)."""
    folder = tmp_path_factory.mktemp("q4")
    AutoFastVisionModel.from_pretrained(tiny_checkpoint("qwen2_5_vl")).save_pretrained(folder)
    return folder


def test_prequantized_checkpoint_loads_and_wrong_norm_is_refused(prequantized, untouched, tmp_path):
    assert AutoFastVisionModel.from_pretrained(prequantized) is not None  # packed weights are no false positive
    folder = tmp_path / "q4"
    shutil.copytree(prequantized, folder)
    key = "model.layers.0.input_layernorm.weight"
    _rewrite(folder, lambda t: t.__setitem__(key, torch.ones(65)))
    untouched.watch(folder)
    with pytest.raises(CheckpointMismatchError, match=r"input_layernorm.weight .*expected \[64\], found \[65\]"):
        AutoFastVisionModel.from_pretrained(folder)


# ------------------------------------------------------------------------------------------- missing tensors


@pytest.mark.parametrize(
    "key, prefix",
    [("lm_head.weight", "lm_head"), ("visual.blocks.0.attn.qkv.weight", "model.visual.blocks.0.attn.qkv")],
    ids=["lm_head", "vision"],
)
def test_missing_tensor_is_refused(key, prefix, untouched, tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    _rewrite(folder, lambda t: t.pop(key))
    untouched.watch(folder)
    with pytest.raises(CheckpointMismatchError, match=rf"lacks 1 tensor\(s\).*pass init_missing=\('{prefix}',\)"):
        AutoFastVisionModel.from_pretrained(folder, load_in_16bit=True)


@pytest.mark.parametrize("front", ["auto_4bit", "fast_16bit"])
def test_init_missing_opts_in_to_fresh_lm_head(front, tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    _rewrite(folder, lambda t: t.pop("lm_head.weight"))
    if front == "auto_4bit":
        model = AutoFastVisionModel.from_pretrained(folder, init_missing=("lm_head",))
    else:
        model, _ = FastVisionModel.from_pretrained(str(folder), load_in_16bit=True, init_missing="lm_head")
    assert torch.isfinite(model.lm_head.weight).all()


def test_init_missing_of_another_module_does_not_excuse_lm_head(untouched, tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint, tmp_path)
    _rewrite(folder, lambda t: t.pop("lm_head.weight"))
    untouched.watch(folder)
    with pytest.raises(CheckpointMismatchError, match="lm_head.weight"):
        AutoFastVisionModel.from_pretrained(folder, load_in_16bit=True, init_missing=("lm_hea",))


# ------------------------------------------------------------------------------------------- no false positives


def _tiny_moe_configs():
    from transformers import AutoConfig

    text = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=256, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
        n_routed_experts=4, max_position_embeddings=512,
    )
    vision = dict(
        hidden_size=64, intermediate_size=128, depth=2, num_hidden_layers=2, num_heads=4, num_attention_heads=4,
        out_hidden_size=64, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
    )
    out = {}
    for model_type in ("qwen3_vl_moe", "qwen3_5_moe", "glm4v_moe"):
        try:
            out[model_type] = AutoConfig.for_model(model_type, text_config=dict(text), vision_config=dict(vision))
        except Exception:  # not in this transformers version
            pass
    return out


def _every_tiny_architecture():
    from hf_fastvision.archs.tiny import ALL_TINY_TYPES

    return [*ALL_TINY_TYPES, "moe:qwen3_vl_moe", "moe:qwen3_5_moe", "moe:glm4v_moe"]


@pytest.mark.parametrize("name", _every_tiny_architecture())
def test_every_tiny_architecture_still_loads(name, tmp_path):
    """Fresh saves (old key layouts, tied heads, per-expert MoE keys fused on load) pass every check."""
    from transformers import AutoModelForImageTextToText

    from hf_fastvision.archs.tiny import tiny_config

    if name.startswith("moe:"):
        config = _tiny_moe_configs().get(name.removeprefix("moe:"))
        if config is None:
            pytest.skip(f"{name} is not in this transformers version")
    else:
        config = tiny_config(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoModelForImageTextToText.from_config(config).save_pretrained(tmp_path)
    model = AutoFastVisionModel.from_pretrained(tmp_path, load_in_16bit=True, patches=False)
    assert model.config.model_type == config.model_type
