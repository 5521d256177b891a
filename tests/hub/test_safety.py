"""Each publishing safety rule, with a test that fails without it.

- invalid repo ids are rejected before any work;
- a model that is not 4-bit is not published under a 4-bit/bnb name, nor a model over a repo holding a different
  base model, without force;
- a token never reaches an exception, a log, a config or the card;
- a failure mid-upload leaves no partial commit, and the retry succeeds.
"""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path

import huggingface_hub
import pytest

from hf_fastvision.errors import ModelNotFoundError
from hf_fastvision.hub import (
    HubOperationError,
    InvalidRepoIdError,
    RefusedPushError,
    attach_push_to_hub,
    check_destination,
    pull,
    push_4bit,
    push_folder,
)
from hf_fastvision.quantize import quantize_command

BAD_IDS = ["bad id", "a/b/c", "org/x..y", "", "org/-x", "o" * 100, "org/name?revision=main"]


class Untouchable:
    """A model/processor stand-in that fails the test if anything looks at it."""

    def __getattr__(self, name):
        raise AssertionError(f"touched .{name} before the repo id was checked")


# --------------------------------------------------------------------------------------------- repo ids
@pytest.mark.parametrize("bad", BAD_IDS)
def test_invalid_repo_id_rejected_before_any_work(bad, tmp_path, capsys):
    with pytest.raises(InvalidRepoIdError):
        push_4bit(Untouchable(), Untouchable(), bad)
    with pytest.raises(InvalidRepoIdError):
        push_folder(tmp_path / "does-not-exist", bad)
    with pytest.raises(InvalidRepoIdError):
        pull(bad)
    with pytest.raises(InvalidRepoIdError):
        check_destination(bad)
    # The command checks the id before it even looks at the (missing) source.
    assert quantize_command([str(tmp_path / "no-such-model"), bad, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "repo id" in err.lower() and "no-such-model" not in err


def test_invalid_repo_id_never_reaches_the_server(servers, hub_client, tiny_checkpoint):
    with pytest.raises(hub_client.Error) as exc:
        hub_client.call("push", src=str(tiny_checkpoint("qwen2_vl")), repo_id="me/bad repo!")
    assert exc.value.type == "InvalidRepoIdError"
    assert servers.requests() == []


# --------------------------------------------------------------------------------------------- mislabelling
def test_16bit_model_under_4bit_name_is_refused(tiny_checkpoint):
    from hf_fastvision import AutoFastVisionModel

    model = AutoFastVisionModel.from_pretrained(str(tiny_checkpoint("qwen2_vl")), load_in_16bit=True)
    for name in ("me/tiny-bnb-4bit", "me/Tiny-4Bit", "me/tiny-BNB"):
        with pytest.raises(RefusedPushError, match="4-bit"):
            push_4bit(model, None, name)
    attach_push_to_hub(model)
    with pytest.raises(RefusedPushError, match="force=True"):
        model.push_to_hub("me/tiny-4bit")
    with pytest.raises(RefusedPushError):  # a 16-bit folder, too
        push_folder(tiny_checkpoint("qwen2_vl"), "me/tiny-bnb-4bit")


def test_16bit_push_needs_force_and_pull_then_refuses_it(servers, hub_client, tiny_checkpoint, tmp_path):
    repo_id = "hf-fastvision-test/tiny-16bit-bnb-4bit"
    src = str(tiny_checkpoint("qwen2_vl"))
    with pytest.raises(hub_client.Error) as exc:
        hub_client.call("push", src=src, repo_id=repo_id, bits=16)
    assert exc.value.type == "RefusedPushError" and "force" in exc.value.message
    assert servers.head(repo_id) is None  # nothing was created
    hub_client.call("push", src=src, repo_id=repo_id, bits=16, force=True)
    assert "model.safetensors" in servers.files(repo_id)
    with pytest.raises(hub_client.Error) as exc:
        hub_client.call("pull", repo_id=repo_id, revision="main", cache_dir=str(tmp_path / "c"), endpoint=servers.olah_url)
    assert exc.value.type == "NotA4bitCheckpointError" and "quantization_config" in exc.value.message


def test_pull_of_missing_repo(servers, hub_client, tmp_path):
    with pytest.raises(hub_client.Error) as exc:
        hub_client.call("pull", repo_id="hf-fastvision-test/nothing-here", revision="main", cache_dir=str(tmp_path))
    assert exc.value.type == "ModelNotFoundError" and issubclass(ModelNotFoundError, OSError)


def test_repo_holding_another_base_model_is_not_overwritten(servers, hub_client, tiny_checkpoint, tmp_path):
    repo_id = "hf-fastvision-test/tiny-owned-bnb-4bit"
    qwen, idefics = str(tiny_checkpoint("qwen2_vl")), str(tiny_checkpoint("idefics3"))
    hub_client.call("push", src=qwen, repo_id=repo_id, base_model="org-a/base-a")
    head = servers.head(repo_id)
    attempts = [
        dict(src=qwen, base_model="org-b/base-b"),  # README base_model differs
        dict(src=qwen),  # our base unknown (a local folder) while the repo names one
        dict(src=idefics, base_model="org-a/base-a"),  # config model_type differs
    ]
    for attempt in attempts:
        with pytest.raises(hub_client.Error) as exc:
            hub_client.call("push", repo_id=repo_id, **attempt)
        assert exc.value.type == "RefusedPushError", exc.value
        assert servers.head(repo_id) == head
    # The quantize command checks before loading any weights.
    servers.reset()
    assert hub_client.call("cli", argv=[qwen, repo_id, "--base-model", "org-c/c", "--no-progress"]) == 1
    assert not [r for r in servers.requests() if r["stage"] in ("preupload", "lfs_batch", "commit")]
    # The same base is fine; force replaces.
    hub_client.call("push", src=qwen, repo_id=repo_id, base_model="org-a/base-a", commit_message="same base")
    hub_client.call("push", src=idefics, repo_id=repo_id, base_model="org-b/base-b", force=True)
    pulled = hub_client.call("pull", repo_id=repo_id, revision="main", cache_dir=str(tmp_path), endpoint=servers.olah_url)
    readme = (Path(pulled["path"]) / "README.md").read_text()
    assert "base_model: \"org-b/base-b\"" in readme
    assert json.loads((Path(pulled["path"]) / "config.json").read_text())["model_type"] == "idefics3"


# --------------------------------------------------------------------------------------------- tokens
def test_token_never_leaks(servers, hub_client, tiny_checkpoint, tmp_path):
    token = servers.token
    src = str(tiny_checkpoint("qwen2_vl"))
    repo_id = "hf-fastvision-test/tiny-token-bnb-4bit"
    # A server (or proxy) that echoes the Authorization header in its error: the error we raise must not.
    servers.fault("preupload", mode="status", status=400, leak_auth=True)
    with pytest.raises(hub_client.Error) as exc:
        hub_client.call("push", src=src, repo_id=repo_id)
    assert exc.value.type == "HubOperationError"
    assert "simulated failure" in exc.value.message and "<redacted>" in exc.value.message
    assert token not in exc.value.message
    # A wrong token passed explicitly is scrubbed too (the write preflight's whoami is where it is now refused).
    wrong = "hf_WrongTokenAlsoSecret0123456789abcdefgh"
    servers.fault("whoami", mode="status", status=401, leak_auth=True)
    with pytest.raises(hub_client.Error) as exc:
        hub_client.call("push", src=src, repo_id=repo_id, token=wrong, via="push_to_hub")
    assert exc.value.type == "MissingTokenError", exc.value
    assert wrong not in exc.value.message and token not in exc.value.message
    # A token that found its way into the model config is not published.
    hub_client.call("push", src=src, repo_id=repo_id, via="push_to_hub", config_extra={"hub_token": token})
    pulled = hub_client.call("pull", repo_id=repo_id, revision="main", cache_dir=str(tmp_path), endpoint=servers.olah_url)
    for path in Path(pulled["path"]).iterdir():
        data = path.read_bytes()
        assert token.encode() not in data, path.name
    assert json.loads((Path(pulled["path"]) / "config.json").read_text())["hub_token"] == "<redacted>"
    # Nothing the client process printed or logged (DEBUG logs and tracebacks included) holds a token.
    log = hub_client.log_text()
    assert "simulated failure" in log
    assert token not in log and wrong not in log


def test_errors_and_logs_are_scrubbed_in_process(monkeypatch, caplog):
    """Unit level: a library error quoting the token (chained to another that does) and a log record that does."""
    secret = "hf_UnitTestSecret0123456789abcdefghijkl"

    def leaky_download(*args, **kwargs):
        logging.getLogger("huggingface_hub.file_download").warning("retrying with Authorization: Bearer %s", secret)
        try:
            raise RuntimeError(f"inner failure, token={secret}")
        except RuntimeError as inner:
            raise OSError(f"403 for request with headers {{'authorization': 'Bearer {secret}'}}") from inner

    monkeypatch.setattr(huggingface_hub, "snapshot_download", leaky_download)
    caplog.set_level(logging.INFO)
    with pytest.raises(HubOperationError) as exc:
        pull("org/model-bnb-4bit", token=secret)
    error = exc.value
    assert secret not in str(error) and "<redacted>" in str(error) and "OSError" in str(error)
    assert error.__cause__ is None and error.__context__ is None
    assert secret not in "".join(traceback.format_exception(error))
    assert "retrying with Authorization" in caplog.text and secret not in caplog.text


# --------------------------------------------------------------------------------------------- atomicity
@pytest.mark.parametrize(
    ("stage", "mode", "lands"),
    [
        ("lfs_upload", "status", False),  # the upload of the weights fails half way
        ("commit", "drop", False),  # the connection is cut while committing
        ("commit", "drop_after", True),  # the commit lands, the answer is lost
    ],
)
def test_failure_mid_upload_leaves_no_partial_commit(stage, mode, lands, servers, hub_client, tiny_checkpoint, tmp_path):
    repo_id = f"hf-fastvision-test/tiny-retry-{stage.replace('_', '-')}-{mode.replace('_', '-')}"
    src = str(tiny_checkpoint("qwen2_vl"))
    hub_client.call("push", src=src, repo_id=repo_id, base_model="org-a/base-a", commit_message="first")
    before, count = servers.head(repo_id), servers.commit_count(repo_id)
    objects = servers.lfs_objects(repo_id)
    servers.fault(stage, mode=mode, status=400)
    with pytest.raises(hub_client.Error) as exc:  # a new model (16-bit weights differ) so that every file changes
        hub_client.call("push", src=str(tiny_checkpoint("idefics3")), repo_id=repo_id, base_model="org-a/base-a",
                        force=True, commit_message="second")
    assert exc.value.type == "HubOperationError" and "retry" in exc.value.message
    if lands:
        assert servers.commit_count(repo_id) == count + 1
    else:  # nothing half-committed: the branch did not move, and a half-sent blob was not kept
        assert servers.head(repo_id) == before and servers.commit_count(repo_id) == count
        if stage == "lfs_upload":
            assert servers.lfs_objects(repo_id) == objects
    landed = servers.commit_count(repo_id)
    servers.reset()
    hub_client.call("push", src=str(tiny_checkpoint("idefics3")), repo_id=repo_id, base_model="org-a/base-a",
                    force=True, commit_message="second")
    assert servers.commit_count(repo_id) == (landed if lands else count + 1)  # a lost answer is not committed twice
    if stage == "commit":  # the weights reached the server before the cut: the retry does not send them again
        assert not [r for r in servers.requests() if r["stage"] == "lfs_upload"]
    pulled = hub_client.call("pull", repo_id=repo_id, revision="main", cache_dir=str(tmp_path), endpoint=servers.olah_url)
    assert json.loads((Path(pulled["path"]) / "config.json").read_text())["model_type"] == "idefics3"
