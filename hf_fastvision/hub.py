"""Publish and fetch bitsandbytes 4-bit checkpoints on the Hugging Face Hub.

`push_4bit(model, processor, repo_id)` saves a loaded 4-bit model, its processor and a model card to a temporary
folder and publishes it in ONE commit; `push_folder(folder, repo_id)` publishes a folder already written (the
`quantize` command uses it); `pull(repo_id)` downloads a snapshot and checks that it really is a bitsandbytes
4-bit checkpoint. Everything goes through huggingface_hub's `HfApi` (`create_repo`, `create_branch`, one
`create_commit`, `snapshot_download`): no git, no hand-written HTTP.

Environment, read at call time: `HF_ENDPOINT` (the server to talk to), `HF_TOKEN` (when no `token=` is given),
`HF_HUB_OFFLINE` (pull serves from the cache only; pushing is refused). Downloads go to the shared HF cache
unless `cache_dir=` says otherwise, so `from_pretrained(repo_id)` finds them afterwards.

Safety rules, each enforced here:

- a token never appears in an exception, a log record, the card or a config: errors are re-raised as
  `HubError`s with the token scrubbed (and their chain dropped, since a chained HTTP error carries request
  headers), log records are scrubbed while a hub call runs, and the files to publish are checked for it;
- a model that is not 4-bit is not published by `push_4bit` / `push_folder` (a name saying "4bit"/"bnb" would
  lie), nor over an existing repo whose README `base_model` or config `model_type` differs, unless `force=True`;
- all files land in one commit made against the branch head read before (compare-and-swap), so a failure
  mid-upload leaves no partial commit, and a retry re-sends only what the server does not have;
- repo ids are checked with huggingface_hub's validator before any work;
- every push is preflighted before anything is saved, loaded or uploaded (`preflight_write`): a token must be
  present (`MissingTokenError`), and the server's whoami must not show it rejected, read-only, or belonging to a
  user who is neither the target namespace nor a member of it (`RefusedPushError`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hf_fastvision.cards import _front_matter, _size_16bit, _source_card, card_context, render_card
from hf_fastvision.checkpoint_info import CheckpointInfo, inspect_checkpoint, is_4bit_model
from hf_fastvision.errors import (
    FastVisionError,
    HubError,
    HubOperationError,
    InvalidRepoIdError,
    MissingTokenError,
    ModelNotFoundError,
    NotA4bitCheckpointError,
    RefusedPushError,
)

__all__ = [
    "push_4bit",
    "push_folder",
    "pull",
    "check_destination",
    "preflight_write",
    "copy_source_files",
    "source_files_dir",
    "attach_push_to_hub",
    "inspect_checkpoint",
    "is_4bit_model",
    "validate_repo_id",
    "render_card",
    "card_context",
    "scrub",
    "CheckpointInfo",
    "Snapshot",
    "HubError",
    "InvalidRepoIdError",
    "RefusedPushError",
    "NotA4bitCheckpointError",
    "HubOperationError",
    "MissingTokenError",
]

logger = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

REDACTED = "<redacted>"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.gguf")
_WEIGHT_RE = re.compile(r"\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|onnx|gguf)$|\.(safetensors|bin)\.index\.json$")
_SAYS_QUANTIZED_RE = re.compile(r"4[-_.]?bit|bnb", re.IGNORECASE)
_HF_TOKEN_RE = re.compile(r"\bhf_[A-Za-z0-9]{20,}")
_BEARER_RE = re.compile(r"(bearer\s+)[^\s'\",;)\]}]+", re.IGNORECASE)
_TEXT_SUFFIXES = (".json", ".md", ".txt", ".jinja", ".j2", ".yaml", ".yml", ".py", ".model", ".tiktoken", ".vocab")
_LOGGERS = ("", "hf_fastvision", "huggingface_hub", "transformers", "httpx", "httpx2", "httpcore", "urllib3")


# --------------------------------------------------------------------------------------------------- errors
def _secrets(token: Any = None) -> tuple[str, ...]:
    """Every token this process could send: the argument, HF_TOKEN and friends, the stored login."""
    found = {token} if isinstance(token, str) else set()
    found |= {os.environ.get(v) for v in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN")}
    with contextlib.suppress(Exception):
        from huggingface_hub import get_token

        found.add(get_token())
    cleaned = {s.strip() for s in found if isinstance(s, str) and len(s.strip()) >= 6}
    return tuple(sorted(cleaned, key=len, reverse=True))


def scrub(text: str, secrets: Sequence[str] = ()) -> str:
    """`text` with the given secrets, anything shaped like a HF token, and bearer credentials redacted."""
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    text = _HF_TOKEN_RE.sub("hf_" + REDACTED, text)
    return _BEARER_RE.sub(lambda m: m.group(1) + REDACTED, text)


class _ScrubFilter(logging.Filter):
    def __init__(self, secrets: Sequence[str]):
        super().__init__()
        self.secrets = tuple(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        with contextlib.suppress(Exception):
            message = record.getMessage()
            clean = scrub(message, self.secrets)
            if clean != message:
                record.msg, record.args = clean, ()
        return True


def _describe(exc: BaseException) -> str:
    parts, seen, current = [], set(), exc
    while current is not None and id(current) not in seen and len(parts) < 4:
        seen.add(id(current))
        text = str(current).strip()
        parts.append(f"{type(current).__name__}: {text}" if text else type(current).__name__)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return " <- ".join(parts)


def _status(exc: BaseException) -> tuple[int | None, str | None]:
    response = getattr(exc, "response", None)
    if response is None:
        return None, None
    headers = getattr(response, "headers", {}) or {}
    return getattr(response, "status_code", None), headers.get("X-Error-Code")


def _guard(action: str) -> Callable[[F], F]:
    """Decorate a public hub function: its `token` (and HF_TOKEN) never leaves it in an error or a log record.

    Log records are scrubbed while it runs. Any error leaves as a `FastVisionError` with secrets removed and no
    `__cause__`/`__context__`: a chained HTTP error carries the request, Authorization header included. Other
    exceptions become `HubOperationError`s naming their type. The error is raised outside any `except` block, so
    Python attaches no context to it.
    """

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind_partial(*args, **kwargs).arguments
            secrets = _secrets(bound.get("token"))
            filt = _ScrubFilter(secrets)
            targets: list[logging.Filterer] = []
            for name in _LOGGERS:
                log = logging.getLogger(name)
                targets += [log, *log.handlers]
            for target in targets:
                target.addFilter(filt)
            error: BaseException | None = None
            try:
                return fn(*args, **kwargs)
            except FastVisionError as exc:
                exc.args = tuple(scrub(str(a), secrets) if isinstance(a, str) else a for a in exc.args)
                error = exc
            except Exception as exc:  # network, server and library errors: translated, never leaked
                status, code = _status(exc)
                error = HubOperationError(scrub(f"{action} {bound.get('repo_id')} failed: {_describe(exc)}", secrets),
                                          status, code)
            finally:
                for target in targets:
                    target.removeFilter(filt)
            error.__cause__ = error.__context__ = None
            error.__suppress_context__ = True
            raise error

        return wrapper  # type: ignore[return-value]

    return decorate


# --------------------------------------------------------------------------------------------------- basics
def validate_repo_id(repo_id: Any) -> str:
    """`repo_id` if the Hub accepts it (huggingface_hub's validator), else `InvalidRepoIdError`."""
    from huggingface_hub.utils import HFValidationError
    from huggingface_hub.utils import validate_repo_id as _validate

    if not isinstance(repo_id, str) or not repo_id:
        raise InvalidRepoIdError(f"A repo id must be a non-empty string like 'your-name/model-bnb-4bit', got {repo_id!r}.")
    try:
        _validate(repo_id)
    except HFValidationError as exc:
        raise InvalidRepoIdError(f"Invalid repo id {repo_id!r}: {exc}") from None
    return repo_id


def _endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _offline() -> bool:
    from hf_fastvision.resolve import is_offline

    return is_offline()


def _api(token: str | None) -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=_endpoint(), token=token)


class Snapshot(str):
    """The local path of a pulled snapshot (a `str`), with what `inspect_checkpoint` found as `.info`."""

    info: CheckpointInfo

    def __new__(cls, path: str, info: CheckpointInfo) -> Snapshot:
        obj = super().__new__(cls, path)
        obj.info = info
        return obj

    @property
    def size_bytes(self) -> int:
        return self.info.size_bytes


# --------------------------------------------------------------------------------------------------- pull
@_guard("pull")
def pull(
    repo_id: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | None = None,
) -> Snapshot:
    """Download `repo_id` at `revision` into the HF cache and check it is a bitsandbytes 4-bit checkpoint.

    Returns the snapshot folder (a `str`; `.info` holds the checkpoint details, `.size_bytes` its size). With
    `HF_HUB_OFFLINE=1` the snapshot comes from the cache only. Raises `ModelNotFoundError` for a missing repo or
    revision, `NotA4bitCheckpointError` for anything but a 4-bit checkpoint, `HubOperationError` otherwise.
    """
    validate_repo_id(repo_id)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    offline = _offline()
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            endpoint=_endpoint(),
            local_files_only=offline,
        )
    except (RepositoryNotFoundError, RevisionNotFoundError, LocalEntryNotFoundError) as exc:
        where = f"{repo_id}@{revision}" if revision else repo_id
        raise ModelNotFoundError.unknown_id(where, offline=offline, detail=type(exc).__name__) from None
    info = inspect_checkpoint(path)
    logger.info("pulled %s@%s: %s", repo_id, revision or "main", info.summary())
    return Snapshot(str(path), info)


# --------------------------------------------------------------------------------------------------- cards
@dataclass
class _Target:
    repo_id: str
    revision: str
    exists: bool = False
    branch_exists: bool = False
    sha: str | None = None
    """Head of the target branch when it exists: the parent the commit must land on (compare-and-swap)."""
    head: str | None = None
    """Commit whose content was inspected (the branch, else main)."""
    files: list[str] = field(default_factory=list)


def _check_quantized(repo_id: str, quantized: bool, force: bool, what: str) -> None:
    if quantized or force:
        if not quantized:
            logger.warning("publishing %s to %s although it is not 4-bit (force=True)", what, repo_id)
        return
    if _SAYS_QUANTIZED_RE.search(repo_id):
        raise RefusedPushError(
            f"Refusing to publish {what} to {repo_id!r}: the name says 4-bit/bnb but the model is not "
            "bitsandbytes 4-bit. Load it with load_in_4bit=True (or run `hf-fastvision quantize`), or pass "
            "force=True / --force to publish it anyway."
        )
    raise RefusedPushError(
        f"Refusing to publish {what} to {repo_id!r}: it is not bitsandbytes 4-bit. Load it with load_in_4bit=True "
        "(or run `hf-fastvision quantize`), use the model's own push_to_hub for 16-bit weights, or pass force=True."
    )


def _require_online(repo_id: str) -> None:
    if _offline():
        raise HubOperationError(f"Cannot publish {repo_id}: HF_HUB_OFFLINE=1 is set. Unset it to push.")


def _token_source(token: str | None) -> tuple[str | None, str]:
    """(the token a write would send, where it comes from): `token=`, else HF_TOKEN or the stored login."""
    if isinstance(token, str) and token.strip():
        return token.strip(), "token="
    from huggingface_hub import get_token

    found = get_token()
    env = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    return found, ("HF_TOKEN" if found and env and found == env.strip() else "the stored login (`hf auth login`)")


def _writable_namespaces(fine_grained: Any, namespace: str, repo_id: str) -> tuple[bool | None, list[str]]:
    """(may a fine-grained token write to `repo_id`: None when its permissions are not listed, names it may write)."""
    if not isinstance(fine_grained, dict):
        return None, []
    scoped = fine_grained.get("scoped")
    if isinstance(fine_grained.get("global"), list) and "repo.write" in fine_grained["global"]:
        return True, []
    if not isinstance(scoped, list):
        return None, []
    writable = []
    for entry in scoped:
        entity = entry.get("entity") if isinstance(entry, dict) else None
        name = entity.get("name") if isinstance(entity, dict) else None
        permissions = entry.get("permissions") if isinstance(entry, dict) else None
        if isinstance(name, str) and isinstance(permissions, list) and "repo.write" in permissions:
            writable.append(name)
    wanted = {namespace.casefold(), repo_id.casefold()}
    return any(w.casefold() in wanted for w in writable), writable


def _preflight_write(repo_id: str, token: str | None) -> None:
    """A token is present and, as far as the server's whoami says, allowed to write to `repo_id`'s namespace.

    Order: token present (local) -> online -> whoami. Refuses only on clear evidence: no token, a token the server
    rejects (401), a read-only token, a fine-grained token listing no write access there, or a namespace that is
    neither the user nor one of the organizations whoami lists. A server without whoami, or one that leaves
    fields out, lets the push go on (the write itself is still authenticated).
    """
    resolved, source = _token_source(token)
    if not resolved:
        raise MissingTokenError.no_token(repo_id)
    _require_online(repo_id)
    from huggingface_hub.errors import HfHubHTTPError

    try:
        me = _api(resolved).whoami()
    except HfHubHTTPError as exc:
        status, _ = _status(exc)
        if status == 401:
            raise MissingTokenError.rejected(repo_id, source) from None
        logger.debug("whoami unavailable (%s): write access to %s not checked in advance", status, repo_id)
        return
    except Exception as exc:  # a server that cannot answer whoami: the write itself will tell
        logger.debug("whoami failed (%s): write access to %s not checked in advance", type(exc).__name__, repo_id)
        return
    if not isinstance(me, dict):
        return
    user = me.get("name") if isinstance(me.get("name"), str) else None
    namespace = repo_id.split("/", 1)[0] if "/" in repo_id else user
    if namespace is None:
        return
    auth = me.get("auth") if isinstance(me.get("auth"), dict) else {}
    access = auth.get("accessToken") if isinstance(auth.get("accessToken"), dict) else {}
    role = access.get("role")
    if role == "read":
        raise RefusedPushError.read_only_token(repo_id, namespace)
    if role == "fineGrained":
        allowed, writable = _writable_namespaces(access.get("fineGrained"), namespace, repo_id)
        if allowed is False:
            raise RefusedPushError.no_write_permission(repo_id, namespace, writable)
    orgs = me.get("orgs")
    if user is None or not isinstance(orgs, list):
        return
    org_names = [o["name"] for o in orgs if isinstance(o, dict) and isinstance(o.get("name"), str)]
    if namespace.casefold() not in {n.casefold() for n in (user, *org_names)}:
        raise RefusedPushError.foreign_namespace(repo_id, namespace, user, org_names)


@_guard("check write access to")
def preflight_write(repo_id: str, token: str | None = None) -> None:
    """Refuse early a push that cannot succeed: no token, a rejected or read-only token, or a namespace the token's
    user may not write to (`MissingTokenError` / `RefusedPushError`). Reads only; the token never appears in an
    error. `push_4bit`, `push_folder`, `check_destination` and the model's `push_to_hub` call it before any work.
    """
    validate_repo_id(repo_id)
    _preflight_write(repo_id, token)


def _inspect_target(api: Any, repo_id: str, revision: str | None) -> _Target:
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    target = _Target(repo_id, revision or "main")
    missing = (RepositoryNotFoundError, RevisionNotFoundError)
    try:
        info = api.model_info(repo_id, revision=target.revision)
        target.exists = target.branch_exists = True
    except missing:
        if target.revision == "main":
            return target
        try:  # the repo may exist without this branch (some servers answer RepoNotFound for a missing revision)
            info = api.model_info(repo_id, revision="main")
            target.exists = True
        except missing:
            return target
    target.sha = info.sha if target.branch_exists else None
    target.head = info.sha
    target.files = [s.rfilename for s in (info.siblings or [])]
    return target


def _existing_identity(api: Any, target: _Target) -> tuple[set[str], str | None]:
    """(README base_model values, config model_type) of what the target branch holds."""
    bases: set[str] = set()
    model_type = None
    with tempfile.TemporaryDirectory() as tmp:
        head = target.head
        if "README.md" in target.files:
            path = api.hf_hub_download(target.repo_id, "README.md", revision=head, cache_dir=tmp)
            value = _front_matter(Path(path)).get("base_model")
            bases = {v.lower() for v in ([value] if isinstance(value, str) else value or []) if isinstance(v, str)}
        if "config.json" in target.files:
            path = api.hf_hub_download(target.repo_id, "config.json", revision=head, cache_dir=tmp)
            with contextlib.suppress(ValueError):
                model_type = json.loads(Path(path).read_text(encoding="utf-8")).get("model_type")
    return bases, model_type


def _check_target(api: Any, target: _Target, base_model: str | None, model_type: str | None, force: bool) -> None:
    """Refuse to overwrite a repo that holds a different model (README base_model, config model_type)."""
    if not target.exists:
        return
    bases, existing_type = _existing_identity(api, target)
    problems = []
    if bases and base_model and base_model.lower() not in bases:
        problems.append(f"its README says base_model {sorted(bases)}, this model's base is {base_model!r}")
    elif bases and not base_model:
        problems.append(f"its README says base_model {sorted(bases)} and this model's base is unknown (pass base_model=)")
    if existing_type and model_type and existing_type != model_type:
        problems.append(f"its config.json is a {existing_type!r} model, this one is {model_type!r}")
    if not problems:
        return
    if force:
        logger.warning("overwriting %s although %s (force=True)", target.repo_id, "; ".join(problems))
        return
    raise RefusedPushError(
        f"Refusing to publish over {target.repo_id}@{target.revision}: {'; '.join(problems)}. Push to another repo, "
        "or pass force=True / --force to replace it."
    )


@_guard("check")
def check_destination(
    repo_id: str,
    *,
    revision: str | None = None,
    base_model: str | None = None,
    model_type: str | None = None,
    token: str | None = None,
    force: bool = False,
) -> None:
    """Every check `push_4bit` makes about the destination, without uploading anything (read-only).

    The `quantize` command calls it before loading any weights, so a refused push fails in seconds.
    """
    validate_repo_id(repo_id)
    _preflight_write(repo_id, token)
    api = _api(token)
    _check_target(api, _inspect_target(api, repo_id, revision), base_model, model_type, force)


def _check_files_for_secrets(folder: Path, secrets: Sequence[str], redact: bool) -> None:
    """No token in any file to publish: text files are redacted (our own temp folder) or refused (a user's)."""
    if not secrets:
        return
    needles = [s.encode() for s in secrets]
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.suffix == ".safetensors":
            with open(path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                data = fh.read(n)
        elif path.suffix in _TEXT_SUFFIXES or path.stat().st_size < 1 << 20:
            data = path.read_bytes()
        else:
            continue
        if not any(n in data for n in needles):
            continue
        if not redact or path.suffix == ".safetensors":
            raise RefusedPushError(f"{path.name} in {folder} contains your Hugging Face token; remove it before publishing.")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise RefusedPushError(f"{path.name} contains your Hugging Face token; remove it before publishing.") from None
        for secret in secrets:
            text = text.replace(secret, REDACTED)
        path.write_text(text, encoding="utf-8")
        logger.warning("removed a token from %s before publishing", path.name)


def _commit(
    api: Any,
    target: _Target,
    folder: Path,
    *,
    private: bool | None,
    commit_message: str,
    commit_description: str | None,
    create_pr: bool,
) -> Any:
    """Create the repo/branch if needed, then publish every file of `folder` in one atomic commit."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    if not target.exists:
        api.create_repo(target.repo_id, private=private, exist_ok=True, repo_type="model")
        logger.info("created repo %s", target.repo_id)
    if target.revision != "main" and not target.branch_exists and not create_pr:
        api.create_branch(target.repo_id, branch=target.revision, exist_ok=True)
    local = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    operations: list[Any] = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(folder / p)) for p in local]
    # Weight shards of an earlier upload that this one does not overwrite would be loaded with the new ones.
    stale = [f for f in target.files if f not in local and _WEIGHT_RE.search(f)]
    operations += [CommitOperationDelete(path_in_repo=f) for f in stale]
    secrets = _secrets(getattr(api, "token", None))
    try:
        return api.create_commit(
            target.repo_id,
            operations=operations,
            commit_message=scrub(commit_message, secrets),
            commit_description=scrub(commit_description, secrets) if commit_description else commit_description,
            revision=target.revision,
            create_pr=create_pr,
            parent_commit=target.sha if target.branch_exists and not create_pr else None,
        )
    except Exception as exc:
        status, code = _status(exc)
        raise HubOperationError(
            f"Uploading to {target.repo_id}@{target.revision} failed ({_describe(exc)}). The commit is atomic: "
            "every file landed or none did, so the repo is not half-updated. Run the same call again to retry; "
            "files the server already holds are not sent twice, and a commit that did land is not repeated.",
            status,
            code,
        ) from None


@_guard("push to")
def push_folder(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    force: bool = False,
    base_model: str | None = None,
) -> Any:
    """Publish a written 4-bit folder (config, safetensors, processor files, README) to `repo_id` in one commit.

    The folder is checked with `inspect_checkpoint` and for tokens; the repo's existing content is checked for a
    different base model. `base_model` defaults to the folder README's. Returns huggingface_hub's `CommitInfo`.
    """
    secrets = _secrets(token)
    validate_repo_id(repo_id)
    root = Path(folder)
    if not (root / "config.json").is_file():
        raise ModelNotFoundError.not_a_checkpoint(str(root))
    try:
        info: CheckpointInfo | None = inspect_checkpoint(root)
    except NotA4bitCheckpointError as exc:
        _check_quantized(repo_id, False, force, f"folder {root} ({exc})")
        info = None
    _preflight_write(repo_id, token)
    config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    base = base_model or _front_matter(root / "README.md").get("base_model")
    base = base if isinstance(base, str) else None
    api = _api(token)
    target = _inspect_target(api, repo_id, revision)
    _check_target(api, target, base, config.get("model_type"), force)
    _check_files_for_secrets(root, secrets, redact=False)
    message = commit_message or _default_message(info, base, config.get("model_type"))
    result = _commit(api, target, root, private=private, commit_message=message,
                     commit_description=commit_description, create_pr=create_pr)
    logger.info("published %s to %s@%s: %s", root, repo_id, target.revision, getattr(result, "commit_url", result))
    return result


def _default_message(info: CheckpointInfo | None, base: str | None, model_type: str | None) -> str:
    what = base or model_type or "model"
    if info is None:
        return f"Upload {what} with hf_fastvision"
    dq = " + double quant" if info.double_quant else ""
    return f"Upload bitsandbytes 4-bit ({info.quant_type}{dq}) quantization of {what} with hf_fastvision"


def _base_model_of(model: Any, token: str | None) -> tuple[str | None, dict[str, Any]]:
    """(the Hub id of the 16-bit model this one quantizes, the source's card metadata), from its load record."""
    from hf_fastvision.loading import get_load_info
    from hf_fastvision.resolve import source_of_twin

    info = get_load_info(model)
    if info is None:
        return None, {}
    res = info.resolution
    card = _source_card(res.name, res.revision, res.local, token)
    if info.prequantized:  # loaded a 4-bit checkpoint: its base is the twin's source, or what its card says
        base = source_of_twin(res.name) or card.get("base_model")
        return (base if isinstance(base, str) else None), card
    return (None if res.local else res.name), card


def source_files_dir(name: str, revision: str | None = None, *, token: str | None = None) -> Path:
    """A folder with a checkpoint's non-weight files (processor, tokenizer, chat template, README, licence).

    A local folder is returned as is; a Hub id is fetched without its weights (from the cache when offline).
    """
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import snapshot_download

    path = snapshot_download(
        name,
        revision=revision,
        token=token,
        endpoint=_endpoint(),
        local_files_only=_offline(),
        ignore_patterns=[*WEIGHT_PATTERNS, "*.index.json", "original/*"],
    )
    return Path(path)


def _copy_processor_files(model: Any, folder: Path, token: str | None) -> None:
    """Without a processor object, copy the processor/tokenizer files of the checkpoint the model came from."""
    from hf_fastvision.loading import get_load_info

    info = get_load_info(model)
    try:
        if info is None:
            raise FileNotFoundError("the model carries no load record")
        copy_source_files(source_files_dir(info.resolution.name, info.resolution.revision, token=token), folder)
    except Exception as exc:  # publishing the weights alone is still useful; say so
        logger.warning("no processor given and its files could not be copied (%s): publishing without them",
                       scrub(str(exc), _secrets(token)))


def copy_source_files(source: str | os.PathLike[str], dest: str | os.PathLike[str]) -> list[str]:
    """Copy a checkpoint's non-weight files (processor, tokenizer, chat template, licence...) from `source`.

    Weights, config.json, generation_config.json, README.md and git files are left out (they are written anew).
    """
    src, dst = Path(source), Path(dest)
    skip = {"config.json", "generation_config.json", "README.md", ".gitattributes"}
    copied = []
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = path.relative_to(src)
        if rel.as_posix() in skip or _WEIGHT_RE.search(rel.name) or any(part.startswith(".") for part in rel.parts):
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dst / rel)
        copied.append(rel.as_posix())
    return copied


@_guard("push to")
def push_4bit(
    model: Any,
    processor: Any,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    force: bool = False,
    base_model: str | None = None,
    commit_description: str | None = None,
    max_shard_size: str | int = "5GB",
    tags: Sequence[str] = (),
) -> Any:
    """Publish a loaded bitsandbytes 4-bit model, its processor and a model card to `repo_id` in one commit.

    `processor` may be None: the processor files of the checkpoint the model was loaded from are copied.
    `base_model` (the 16-bit Hub id) defaults to what the model was loaded from. Refuses (`RefusedPushError`) a
    model that is not 4-bit, or a repo holding a different base model, unless `force=True`. Returns
    huggingface_hub's `CommitInfo` (a `str`, the commit URL).
    """
    secrets = _secrets(token)
    validate_repo_id(repo_id)
    if hasattr(model, "peft_config"):
        raise RefusedPushError(
            "push_4bit publishes base models; this one has PEFT adapters. Push the adapter with "
            "model.save_pretrained(...)/model.push_to_hub(...) from peft, or publish the base model before get_peft_model."
        )
    quantized = is_4bit_model(model)
    _check_quantized(repo_id, quantized, force, f"{type(model).__name__}")
    _preflight_write(repo_id, token)  # before the card, the save or any upload
    base, source_meta = _base_model_of(model, token)
    base = base_model or base
    model_type = getattr(model.config, "model_type", None)
    api = _api(token)
    target = _inspect_target(api, repo_id, revision)
    _check_target(api, target, base, model_type, force)
    with tempfile.TemporaryDirectory(prefix="hf_fastvision-push-") as tmp:
        folder = Path(tmp)
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        if processor is not None:
            processor.save_pretrained(folder)
        else:
            _copy_processor_files(model, folder, token)
        info = inspect_checkpoint(folder) if quantized else None
        if info is not None:
            from hf_fastvision.loading import get_load_info

            load_info = get_load_info(model)
            kept = len(load_info.plan.kept) if load_info is not None and load_info.plan.kept else None
            context = card_context(info, repo_id=repo_id, base_model=base, size_16bit=_size_16bit(model),
                                   source_card=source_meta, kept_linear=kept, tags=tags)
            (folder / "README.md").write_text(render_card(context), encoding="utf-8")
        _check_files_for_secrets(folder, secrets, redact=True)
        message = commit_message or _default_message(info, base, model_type)
        result = _commit(api, target, folder, private=private, commit_message=message,
                         commit_description=commit_description, create_pr=create_pr)
    logger.info("published %s to %s@%s: %s", type(model).__name__, repo_id, target.revision,
                getattr(result, "commit_url", result))
    return result


# --------------------------------------------------------------------------------------------------- push_to_hub
@_guard("push to")
def _push_to_hub(
    self: Any,
    repo_id: str,
    *,
    processor: Any = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: str | int = "5GB",
    tags: Sequence[str] | None = None,
    force: bool = False,
    base_model: str | None = None,
) -> Any:
    """`push_to_hub` of a model loaded by hf_fastvision.

    A 4-bit model goes through `hf_fastvision.hub.push_4bit` (card, checks, one atomic commit; pass `processor=`
    to include it, else the source checkpoint's processor files are copied). A 16-bit model uses transformers'
    own `push_to_hub`, but not under a name that says 4-bit/bnb unless `force=True`.
    """
    if is_4bit_model(self):
        return push_4bit(self, processor, repo_id, revision=revision, private=private, token=token,
                         commit_message=commit_message, create_pr=create_pr, force=force, base_model=base_model,
                         commit_description=commit_description, max_shard_size=max_shard_size, tags=tags or ())
    validate_repo_id(repo_id)
    if _SAYS_QUANTIZED_RE.search(repo_id) and not force:
        _check_quantized(repo_id, False, False, type(self).__name__)
    _preflight_write(repo_id, token)
    return type(self).push_to_hub(self, repo_id, commit_message=commit_message, commit_description=commit_description,
                                  private=private, token=token, revision=revision, create_pr=create_pr,
                                  max_shard_size=max_shard_size, tags=list(tags) if tags else None)


def attach_push_to_hub(model: Any) -> Any:
    """Route `model.push_to_hub(...)` through `push_4bit` for this instance (idempotent; survives deepcopy).

    The loader calls it on every model it returns; the class and other instances are untouched.
    """
    current = model.__dict__.get("push_to_hub")
    if not (isinstance(current, types.MethodType) and current.__func__ is _push_to_hub):
        model.push_to_hub = types.MethodType(_push_to_hub, model)
    return model

