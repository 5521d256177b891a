"""The publishing preflight against the commit server: a token that may not write to the target is refused
before any upload (for `quantize`, before any weight loads), naming the namespace, and never quoting the token.

The server's whoami-v2 answers for each token come from conftest.ACCOUNTS (read-only, another user, a fine-grained
token scoped to the user's own namespace only); the default write token belongs to a member of `hf-fastvision-test`.
"""

from __future__ import annotations

import re

import pytest

WRITES = ("create", "branch", "preupload", "lfs_batch", "lfs_upload", "commit")


def _refused(hub_client, fn: str, **kwargs):
    with pytest.raises(hub_client.Error) as exc:
        hub_client.call(fn, **kwargs)
    return exc.value


@pytest.mark.parametrize(
    ("token", "via", "repo_id", "fix"),
    [
        ("read", "push_4bit", "hf-fastvision-test/preflight-read-bnb-4bit", "read-only"),
        ("other", "push_to_hub", "hf-fastvision-test/preflight-other-bnb-4bit", "Publish under one of 'someone-else'"),
        ("fine", "push_4bit", "hf-fastvision-test/preflight-fine-bnb-4bit", r"no write permission \(repo.write\)"),
        (None, "push_4bit", "someone-elses-org/preflight-bnb-4bit", "may not write to namespace 'someone-elses-org'"),
    ],
    ids=["read-token", "other-user", "fine-grained", "foreign-namespace"],
)
def test_push_refused_before_upload(token, via, repo_id, fix, servers, hub_client, hub_tokens, tiny_checkpoint):
    extra = {"token": hub_tokens[token]} if token else {}
    error = _refused(hub_client, "push", src=str(tiny_checkpoint("qwen2_vl")), repo_id=repo_id, via=via, **extra)
    assert error.type == "RefusedPushError" and "PermissionError" in error.mro, error
    assert re.search(fix, error.message), error.message
    assert repo_id.split("/")[0] in error.message
    for secret in hub_tokens.values():
        assert secret not in error.message
    stages = [r["stage"] for r in servers.requests()]
    assert "whoami" in stages and not set(stages) & set(WRITES), stages
    assert servers.head(repo_id) is None


def test_quantize_refused_before_loading(servers, hub_client, hub_tokens, tiny_checkpoint):
    repo_id = "hf-fastvision-test/preflight-quantize-bnb-4bit"
    error = _refused(hub_client, "quantize", src=str(tiny_checkpoint("qwen2_vl")), repo_id=repo_id,
                     token=hub_tokens["read"])
    assert error.type == "RefusedPushError" and "read-only" in error.message
    # check_destination runs the preflight first: whoami is the only request, nothing was read or written
    assert [r["stage"] for r in servers.requests()] == ["whoami"]
    assert servers.head(repo_id) is None


def test_unknown_token_is_rejected(servers, hub_client, tiny_checkpoint):
    wrong = "hf_UnknownToTheServer0123456789abcdefghij"
    error = _refused(hub_client, "push", src=str(tiny_checkpoint("qwen2_vl")),
                     repo_id="hf-fastvision-test/preflight-wrong-bnb-4bit", token=wrong)
    assert error.type == "MissingTokenError" and "hf auth login" in error.message and wrong not in error.message
    assert not {r["stage"] for r in servers.requests()} & set(WRITES)
