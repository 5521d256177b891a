"""Arguments are validated where they enter: a bad value raises an error naming the fix, and nothing is written.

Covers LoRA settings (`get_peft_model`), `dtype` / `quant_storage`, `max_seq_length`, `device_map`, every typed CLI
argument (`info`, `demo`, `pull`, `quantize`), `run_demo`'s own checks, and the publishing preflight (no token, a
read-only token, a foreign namespace: refused before any weight loads or any upload). The server-backed preflight
cases live in tests/hub/test_preflight.py.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from hf_fastvision import AutoFastVisionModel, FastVisionModel, InvalidArgumentError, MissingTokenError
from hf_fastvision import hub
from hf_fastvision.cli import main
from hf_fastvision.errors import RefusedPushError
from hf_fastvision.loading import available_devices, check_device_map

ROOT = Path(__file__).resolve().parents[2]
FAKE_TOKEN = "hf_FakeUnitTestTokenNeverSent0123456789"


@pytest.fixture(scope="module")
def folder(tiny_checkpoint) -> Path:
    return tiny_checkpoint("qwen2_5_vl")


@pytest.fixture(scope="module")
def model(folder):
    """One 4-bit tiny model for the whole module: every case here must leave it as it was."""
    loaded, _processor = FastVisionModel.from_pretrained(str(folder))
    return loaded


def _structure(model) -> list[tuple[str, type]]:
    return [(name, type(module)) for name, module in model.named_modules()]


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    """`hf-fastvision ARGV` in-process: (exit status, stderr); argparse errors exit through SystemExit."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return int(code or 0), capsys.readouterr().err


def _fail(*args, **kwargs):
    raise AssertionError("weights were loaded although the arguments were refused")


# --------------------------------------------------------------------------------------------- LoRA
LORA_CASES = [
    pytest.param({"r": 2.5}, "positive integer", id="r-float"),
    pytest.param({"r": 0}, "positive integer", id="r-zero"),
    pytest.param({"r": -1}, "positive integer", id="r-negative"),
    pytest.param({"r": True}, "positive integer", id="r-bool"),
    pytest.param({"r": "16"}, "positive integer", id="r-string"),
    pytest.param({"lora_alpha": -16}, "lora_alpha=16", id="alpha-negative"),
    pytest.param({"lora_alpha": 0}, "positive number", id="alpha-zero"),
    pytest.param({"lora_alpha": math.nan}, "positive number", id="alpha-nan"),
    pytest.param({"lora_dropout": 1.0}, r"\[0, 1\)", id="dropout-one"),
    pytest.param({"lora_dropout": -0.1}, "lora_dropout=0.05", id="dropout-negative"),
    pytest.param({"lora_dropout": "0.1"}, "probability", id="dropout-string"),
    pytest.param({"bias": "bogus"}, "'none', 'all', 'lora_only'", id="bias-unknown"),
    pytest.param({"target_modules": []}, "'all-linear'", id="targets-empty"),
    pytest.param({"target_modules": ["nonexistent"]}, "k_proj, .*q_proj", id="targets-no-match"),
    pytest.param({"target_modules": r"model\.nothing\..*"}, "linear layers: .*v_proj", id="targets-regex-no-match"),
    pytest.param({"target_modules": "["}, "escape literal", id="targets-bad-regex"),
    pytest.param({"target_modules": ["norm"]}, "narrow target_modules", id="targets-not-wrappable"),
]


@pytest.mark.parametrize(("kwargs", "fix"), LORA_CASES)
def test_lora_arguments_refused_before_peft(kwargs, fix, model, untouched):
    before = _structure(model)
    with pytest.raises(InvalidArgumentError, match=fix) as exc:
        FastVisionModel.get_peft_model(model, **kwargs)
    assert isinstance(exc.value, ValueError)
    assert not hasattr(model, "peft_config") and _structure(model) == before  # peft never ran


def test_unmatched_targets_list_short_linear_names(model, untouched):
    with pytest.raises(InvalidArgumentError) as exc:
        FastVisionModel.get_peft_model(model, target_modules=["qproj"])
    listed = str(exc.value).split("linear layers: ", 1)[1].split(";", 1)[0].split(", ")
    assert listed == sorted(set(listed)) and "q_proj" in listed and not any("layers." in n for n in listed)


# --------------------------------------------------------------------------------------------- dtype
DTYPE_CASES = [
    pytest.param({"dtype": torch.int8}, id="int8"),
    pytest.param({"dtype": torch.float8_e4m3fn}, id="float8"),
    pytest.param({"dtype": torch.float64}, id="float64"),
    pytest.param({"dtype": "banana"}, id="banana"),
    pytest.param({"dtype": "uint8"}, id="uint8-name"),
]


@pytest.mark.parametrize("kwargs", DTYPE_CASES)
def test_dtype_refused_at_entry(kwargs, folder, untouched, monkeypatch):
    untouched.watch(folder)
    monkeypatch.setattr("hf_fastvision.loading.load_config", _fail)
    with pytest.raises(InvalidArgumentError, match="'bfloat16', 'float16', 'float32'"):
        FastVisionModel.from_pretrained(str(folder), **kwargs)
    with pytest.raises(InvalidArgumentError, match="16- or 32-bit floating"):
        AutoFastVisionModel.from_pretrained(str(folder), **kwargs)


def test_quant_storage_refused(folder, untouched, monkeypatch):
    monkeypatch.setattr("hf_fastvision.loading.load_config", _fail)
    with pytest.raises(InvalidArgumentError, match="'uint8' \\(the default\\)"):
        AutoFastVisionModel.from_pretrained(str(folder), quant_storage="int4")


# --------------------------------------------------------------------------------------------- max_seq_length
@pytest.mark.parametrize("value", [0, -1, 2.5, "2048", True], ids=["zero", "negative", "float", "string", "bool"])
def test_max_seq_length_refused(value, folder, untouched, monkeypatch):
    untouched.watch(folder)
    monkeypatch.setattr("hf_fastvision.fast_vision.load_model", _fail)
    with pytest.raises(InvalidArgumentError, match="positive integer. Pass e.g. max_seq_length=2048"):
        FastVisionModel.from_pretrained(str(folder), max_seq_length=value)


def test_max_seq_length_past_positions_warns(folder, untouched):
    from transformers import AutoConfig

    positions = AutoConfig.from_pretrained(folder).get_text_config().max_position_embeddings
    with pytest.warns(UserWarning, match=f"max_seq_length={2 * positions} .* {positions} positions"):
        FastVisionModel.from_pretrained(str(folder), max_seq_length=2 * positions)


# --------------------------------------------------------------------------------------------- device_map
def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


DEVICE_CASES = [
    pytest.param(f"cuda:{_gpus()}", id="cuda-index-too-high"),
    pytest.param({"": f"cuda:{_gpus()}"}, id="dict-cuda-too-high"),
    pytest.param(_gpus(), id="int-too-high"),
    pytest.param({"model": -1}, id="dict-negative-index"),
    pytest.param("banana", id="unknown-string"),
    pytest.param("disk", id="disk-outside-dict"),
    pytest.param({1: "cpu"}, id="non-string-key"),
    pytest.param(2.5, id="float"),
]
if not torch.cuda.is_available():
    DEVICE_CASES += [pytest.param("cuda", id="cuda-without-cuda"), pytest.param({"": "cuda"}, id="dict-cuda")]


@pytest.mark.parametrize("device_map", DEVICE_CASES)
def test_device_map_names_available_devices(device_map, folder, untouched, monkeypatch):
    monkeypatch.setattr("hf_fastvision.loading.load_config", _fail)
    available = ", ".join(available_devices())
    with pytest.raises(InvalidArgumentError, match=f"Available devices: {re.escape(available)}\\. Pass device_map='auto'"):
        FastVisionModel.from_pretrained(str(folder), device_map=device_map)
    with pytest.raises(InvalidArgumentError, match="Available devices: cpu" if not torch.cuda.is_available() else "cuda:0"):
        check_device_map(device_map)


@pytest.mark.parametrize("device_map", ["auto", "sequential", "balanced", "balanced_low_0", "cpu", None,
                                        {"": "cpu"}, {"model.visual": "cpu", "lm_head": "disk"}])
def test_device_map_valid_values_pass(device_map):
    check_device_map(device_map)


# --------------------------------------------------------------------------------------------- CLI
CLI_CASES = [
    pytest.param(["info", "{folder}", "--dtype", "banana"], "choose from 'auto', 'bfloat16'", id="info-dtype"),
    pytest.param(["demo", "--steps", "-5"], "positive integer. Pass e.g. --steps=100", id="demo-steps-negative"),
    pytest.param(["demo", "--steps", "0"], "positive integer", id="demo-steps-zero"),
    pytest.param(["demo", "--steps", "many"], "positive integer", id="demo-steps-word"),
    pytest.param(["demo", "--seed", "-1"], "integer >= 0", id="demo-seed-negative"),
    pytest.param(["demo", "--output-dir", "{file}"], "not a folder", id="demo-output-dir-file"),
    pytest.param(["pull", "bad repo id!"], "Invalid repo id", id="pull-bad-id"),
    pytest.param(["pull", "someone/x", "--cache-dir", "{file}"], "not a folder", id="pull-cache-dir-file"),
    pytest.param(["quantize", "{folder}", "--dry-run", "--keep", "["], "'\\[' is not a valid regular expression",
                 id="quantize-keep-regex"),
    pytest.param(["quantize", "{folder}", "me/x", "--max-shard-size", "banana"], "'500MB', '5GB'",
                 id="quantize-shard-size-word"),
    pytest.param(["quantize", "{folder}", "me/x", "--max-shard-size", "0"], "positive number of bytes",
                 id="quantize-shard-size-zero"),
    pytest.param(["quantize", "{folder}", "me/x", "--max-shard-size", "5XB"], "KB, MB, GB or TB",
                 id="quantize-shard-size-unit"),
    pytest.param(["quantize", "{folder}", "me/x", "--compute-dtype", "banana"], "choose from 'bfloat16'",
                 id="quantize-compute-dtype"),
    pytest.param(["quantize", "{folder}", "me/x", "--base-model", "a/b/c"], "namespace/repo_name",
                 id="quantize-base-model"),
    pytest.param(["quantize", "{folder}", "me/x", "--quant-type", "int3"], "choose from 'nf4', 'fp4'",
                 id="quantize-quant-type"),
]


@pytest.mark.parametrize(("argv", "fix"), CLI_CASES)
def test_cli_argument_errors_exit_2(argv, fix, folder, untouched, capsys, monkeypatch, tmp_path):
    file = tmp_path / "a-file.txt"  # outside the watched folders: the test's own
    file.write_text("x")
    untouched.watch(folder)
    untouched.watch(file.parent / "cwd")
    monkeypatch.setattr(AutoFastVisionModel, "from_pretrained", _fail)
    monkeypatch.setattr(FastVisionModel, "from_pretrained", _fail)
    argv = [a.format(folder=folder, file=file) for a in argv]
    code, err = _cli(argv, capsys)
    assert code == 2 and "error:" in err and "Traceback" not in err, err
    assert re.search(fix, err), err


@pytest.mark.parametrize("argv", [["demo", "--steps", "-5"], ["pull", "bad repo id!"]], ids=["argparse", "library"])
def test_cli_subprocess_has_no_traceback(argv, untouched):
    proc = subprocess.run([sys.executable, "-m", "hf_fastvision.cli", *argv], capture_output=True, text=True,
                          cwd=Path.cwd(), env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("kwargs", "fix"),
    [({"steps": -5}, "steps=100"), ({"steps": 0}, "positive integer"), ({"steps": 2.5}, "positive integer"),
     ({"eval_size": -1}, "eval_size=24"), ({"seed": -3}, "integer >= 0")],
    ids=["steps-negative", "steps-zero", "steps-float", "eval-size", "seed"],
)
def test_run_demo_checks_before_loading(kwargs, fix, untouched, monkeypatch):
    from hf_fastvision.demo import run_demo

    monkeypatch.setattr(FastVisionModel, "from_pretrained", _fail)
    with pytest.raises(InvalidArgumentError, match=fix):
        run_demo(quick=True, **kwargs)


# --------------------------------------------------------------------------------------------- publishing preflight
@pytest.fixture
def no_token(monkeypatch, tmp_path):
    """No HF_TOKEN, no stored login: huggingface_hub.get_token() returns None."""
    from huggingface_hub import constants, get_token

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert get_token() is None


NO_TOKEN_FIX = r"no Hugging Face token: run `hf auth login` or set HF_TOKEN, or pass token="


def test_quantize_and_publish_without_token_loads_nothing(folder, no_token, untouched, monkeypatch):
    from hf_fastvision.quantize import quantize_and_publish

    untouched.watch(folder)
    monkeypatch.setattr(AutoFastVisionModel, "from_pretrained", _fail)
    with pytest.raises(MissingTokenError, match=NO_TOKEN_FIX) as exc:
        quantize_and_publish(str(folder), "someone/x", progress=False)
    assert isinstance(exc.value, PermissionError)


def test_quantize_command_without_token(folder, no_token, untouched, monkeypatch, capsys):
    from hf_fastvision.quantize import quantize_command

    monkeypatch.setattr(AutoFastVisionModel, "from_pretrained", _fail)
    assert quantize_command([str(folder), "someone/x", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "no Hugging Face token" in err and "Traceback" not in err


def test_push_4bit_and_push_to_hub_without_token(model, no_token, untouched, monkeypatch):
    monkeypatch.setattr(model, "save_pretrained", _fail)
    with pytest.raises(MissingTokenError, match=NO_TOKEN_FIX):
        hub.push_4bit(model, None, "someone/x-bnb-4bit")
    with pytest.raises(MissingTokenError, match=NO_TOKEN_FIX):
        model.push_to_hub("someone/x-bnb-4bit")
    with pytest.raises(MissingTokenError, match=NO_TOKEN_FIX):
        hub.check_destination("someone/x-bnb-4bit")


class _FakeApi:
    def __init__(self, answer):
        self.answer = answer

    def whoami(self):
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


def _http_error(status: int):
    from huggingface_hub.errors import HfHubHTTPError

    request = httpx.Request("GET", "http://hub.invalid/api/whoami-v2")
    return HfHubHTTPError(f"{status} from whoami", response=httpx.Response(status, request=request))


def _account(role="write", name="alice", orgs=("alice-org",), **access):
    return {"name": name, "orgs": [{"name": o} for o in orgs], "auth": {"accessToken": {"role": role, **access}}}


@pytest.fixture
def fake_whoami(monkeypatch):
    """`preflight_write` against a whoami answer of the test's choosing (online, a token set)."""
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(hub, "_offline", lambda: False)

    def use(answer):
        monkeypatch.setattr(hub, "_api", lambda token: _FakeApi(answer))

    return use


FINE_OTHER = {"fineGrained": {"scoped": [{"entity": {"type": "user", "name": "alice"}, "permissions": ["repo.write"]}]}}


@pytest.mark.parametrize(
    ("answer", "repo_id", "error", "fix"),
    [
        (_account(role="read"), "alice/x", RefusedPushError, "read-only.*token with write access"),
        (_account(), "bob/x", RefusedPushError, "Publish under one of 'alice', 'alice-org'"),
        (_account(role="fineGrained", **FINE_OTHER), "alice-org/x", RefusedPushError, r"repo\.write.*'alice-org'"),
        (_http_error(401), "alice/x", MissingTokenError, "rejected.*`hf auth login`"),
    ],
    ids=["read-token", "foreign-namespace", "fine-grained-elsewhere", "rejected-token"],
)
def test_preflight_refuses_on_clear_evidence(answer, repo_id, error, fix, fake_whoami, untouched):
    fake_whoami(answer)
    with pytest.raises(error, match=fix) as exc:
        hub.preflight_write(repo_id)
    assert FAKE_TOKEN not in str(exc.value)


@pytest.mark.parametrize(
    ("answer", "repo_id"),
    [
        (_account(), "alice/x"),
        (_account(), "alice-org/x"),
        (_account(role="fineGrained", **FINE_OTHER), "alice/x"),
        ({}, "anyone/x"),  # a server whose whoami says nothing
        ({"name": "alice"}, "bob/x"),  # no orgs listed: no evidence against bob
        (_http_error(404), "alice/x"),  # no whoami endpoint
        (OSError("connection refused"), "alice/x"),
    ],
    ids=["own-name", "own-org", "fine-grained-own", "empty", "no-orgs", "no-endpoint", "unreachable"],
)
def test_preflight_tolerates_missing_evidence(answer, repo_id, fake_whoami):
    fake_whoami(answer)
    hub.preflight_write(repo_id)
