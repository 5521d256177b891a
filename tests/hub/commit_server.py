"""A loopback *write* server speaking the Hugging Face Hub commit protocol, for tests only.

No installable server implements the Hub's write API, so this one does, just enough for
`huggingface_hub.HfApi.create_repo / create_branch / create_commit / upload_folder` with Xet disabled
(`HF_HUB_DISABLE_XET=1`): it is a test double written from the client code of huggingface_hub
(`hf_api.py`, `_commit_api.py`, `lfs.py`), not a Hub implementation. It commits into the *real* git
repositories that `olah` serves as local mirrors (`<mirrors>/models/<org>/<name>`, LFS objects under
`.git/lfs/objects/`), so every push a test makes is read back through olah by a real `snapshot_download`.
Every request it does not implement (all reads) is proxied to olah (`--upstream`), so one `HF_ENDPOINT`
serves both directions.

Endpoints (all JSON unless noted)::

    GET  /api/whoami-v2                                  the account of the bearer token (401 for an unknown one)
    POST /api/repos/create                               {"name","organization","visibility"?,"type"?}
    POST /api/validate-yaml                              {"content","repoType"}
    POST /api/models/<org>/<name>/preupload/<rev>        {"files":[{"path","size","sample"}]}
    POST /api/models/<org>/<name>/branch/<branch>        {"startingPoint"?}
    POST /api/models/<org>/<name>/commit/<rev>[?create_pr=1]   NDJSON: header, file, lfsFile, deletedFile, deletedFolder
    POST /<org>/<name>.git/info/lfs/objects/batch        git-lfs batch API (basic transfer)
    PUT  /_lfs/<org>/<name>/<oid>                        raw bytes; POST .../<oid>/verify
    POST /_test/fault    {"stage": ..., "times": 1, "mode": "drop"|"status"|"drop_after", "status": 400, "leak_auth": bool}
    GET  /_test/requests  the request log;   POST /_test/reset  clears faults and the log

Commits are atomic: blobs are written first, the new tree is built in a private index, and the branch
ref moves with one compare-and-swap `git update-ref` at the very end, so a request that fails (or is
cut off) at any point leaves the branch where it was. `lfsFile` entries whose object was not fully
uploaded (sha256 and size checked on upload) are rejected, as are binary or >10 MB regular files.

Fault injection simulates network failures: stage `lfs_upload` with mode `drop` reads half the body
and closes the socket (what a cut connection looks like to the client), mode `status` reads the body,
stores nothing and answers with an error status; stage `commit` with mode `drop` closes the connection before
applying the commit, `drop_after` applies the commit and then loses the response. `leak_auth` makes the
error body echo the Authorization header, like a misconfigured proxy, to test client-side scrubbing.
With `--token`, write requests need `Authorization: Bearer <token>`. `whoami-v2` answers from `--whoami` (JSON:
token -> the body to return, shaped like the Hub's: `name`, `orgs` [{"name"}], `auth.accessToken.role`); the
`--token` itself defaults to user `hf-fastvision-test-user`, member of org `hf-fastvision-test`, role `write`.

Run: python commit_server.py --port P --mirrors DIR --upstream http://127.0.0.1:OLAH_PORT [--token T] [--whoami JSON]
(stdlib + PyYAML only; git is called through subprocess.)
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import hashlib
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.mlmodel", "*.model",
    "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth",
    "*.rar", "*.safetensors", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
)
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS)
MAX_REGULAR = 10 * 1024 * 1024
ZERO = "0" * 40
POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"
POINTER_RE = re.compile(r"version https://git-lfs\.github\.com/spec/v1\noid sha256:([0-9a-f]{64})\nsize (\d+)\n")
GIT_ENV = {
    "GIT_AUTHOR_NAME": "commit-server",
    "GIT_AUTHOR_EMAIL": "commit-server@localhost",
    "GIT_COMMITTER_NAME": "commit-server",
    "GIT_COMMITTER_EMAIL": "commit-server@localhost",
    "GIT_CONFIG_NOSYSTEM": "1",
    "HOME": tempfile.gettempdir(),
}


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def default_account(token: str | None) -> dict[str, Any]:
    """The whoami-v2 body for the server's own write token."""
    return {
        "type": "user",
        "name": "hf-fastvision-test-user",
        "orgs": [{"type": "org", "name": "hf-fastvision-test"}],
        "auth": {"type": "access_token", "accessToken": {"displayName": "tests", "role": "write"}},
    }


class State:
    def __init__(self, mirrors: Path, upstream: str, token: str | None, whoami: dict[str, Any] | None = None):
        self.mirrors = mirrors
        self.upstream = urllib.parse.urlsplit(upstream)
        self.token = token
        self.whoami: dict[str, Any] = dict(whoami or {})
        if token is not None:
            self.whoami.setdefault(token, default_account(token))
        self.faults: dict[str, list[dict[str, Any]]] = {}
        self.log: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.repo_locks: dict[str, threading.Lock] = {}
        for spec in json.loads(os.environ.get("COMMIT_SERVER_FAULTS", "[]")):
            self.add_fault(spec)

    def add_fault(self, spec: dict[str, Any]) -> None:
        spec = {"times": 1, "mode": "status", "status": 500, "leak_auth": False} | spec
        with self.lock:
            self.faults.setdefault(spec["stage"], []).append(spec)

    def take_fault(self, stage: str) -> dict[str, Any] | None:
        with self.lock:
            pending = self.faults.get(stage) or []
            if not pending:
                return None
            spec = pending[0]
            spec["times"] -= 1
            if spec["times"] <= 0:
                pending.pop(0)
            return dict(spec)

    def repo_lock(self, repo_id: str) -> threading.Lock:
        with self.lock:
            return self.repo_locks.setdefault(repo_id, threading.Lock())


# ------------------------------------------------------------------------------------------------ git helpers
def git(repo: Path, *args: str, input: bytes | None = None, env: dict[str, str] | None = None, check: bool = True) -> str:
    proc = subprocess.run(
        ["git", *args], cwd=repo, input=input, capture_output=True, env={**os.environ, **GIT_ENV, **(env or {})}
    )
    if check and proc.returncode != 0:
        raise HubError(500, f"git {args[0]} failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout.decode().strip()


def rev_parse(repo: Path, rev: str) -> str | None:
    for ref in (f"refs/heads/{rev}", rev if rev.startswith("refs/") else None, rev):
        if ref is None:
            continue
        out = git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False)
        if out:
            return out
    return None


def lfs_path(repo: Path, oid: str) -> Path:
    return repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid


def is_lfs_path(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(path, p) for p in LFS_PATTERNS)


# ------------------------------------------------------------------------------------------------ handler
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "Server"

    def log_message(self, format: str, *args: Any) -> None:  # quiet; the request log is in /_test/requests
        pass

    # --- plumbing
    @property
    def state(self) -> State:
        return self.server.state

    def _body(self, limit: int | None = None) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n if limit is None else min(n, limit))

    def _send(self, status: int, payload: Any = None, headers: dict[str, str] | None = None) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, exc: HubError) -> None:
        headers = {"X-Error-Message": exc.message.splitlines()[0][:200]}
        if exc.code:
            headers["X-Error-Code"] = exc.code
        self.close_connection = True  # part of the body may be unread
        self._send(exc.status, {"error": exc.message}, headers)

    def _drop(self) -> None:
        """Cut the connection without an answer (a network failure, as the client sees it)."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _fault(self, stage: str, consumed: int = 0) -> bool:
        """Apply a pending fault for `stage`; True when the request was answered (or cut) by it."""
        spec = self.state.take_fault(stage)
        if spec is None or spec["mode"] == "drop_after":
            if spec is not None:
                self._pending_drop_after = True
            return False
        remaining = int(self.headers.get("Content-Length") or 0) - consumed
        if spec["mode"] == "drop":
            self.rfile.read(max(0, remaining) // 2)
            self._drop()
            return True
        self.rfile.read(max(0, remaining))
        message = f"simulated failure at {stage}"
        if spec.get("leak_auth"):
            message += f" (request had Authorization: {self.headers.get('Authorization')})"
        self._error(HubError(int(spec["status"]), message))
        return True

    def _check_auth(self) -> None:
        if self.state.token is None:
            return
        if self.headers.get("Authorization") != f"Bearer {self.state.token}":
            raise HubError(401, "Invalid credentials in Authorization header")

    def _signature(self, oid: str) -> str:
        return hashlib.sha256((self.server.secret + oid).encode()).hexdigest()[:32]

    def _check_signature(self, oid: str) -> None:
        if self.query.get("X-Signature") != self._signature(oid):
            raise HubError(403, "bad or missing upload signature")

    def _record(self, stage: str) -> None:
        with self.state.lock:
            self.state.log.append({"method": self.command, "path": self.path, "stage": stage})

    def _repo(self, org: str, name: str, must_exist: bool = True) -> Path:
        repo = self.state.mirrors / "models" / org / name
        if must_exist and not (repo / ".git").is_dir():
            raise HubError(404, f"Repository {org}/{name} not found", "RepoNotFound")
        return repo

    # --- dispatch
    ROUTES = (
        ("GET", r"/api/whoami-v2", "whoami"),
        ("POST", r"/api/repos/create", "create"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("POST", r"/api/models/([^/]+)/([^/]+)/preupload/(.+)", "preupload"),
        ("POST", r"/api/models/([^/]+)/([^/]+)/branch/(.+)", "branch"),
        ("POST", r"/api/models/([^/]+)/([^/]+)/commit/(.+)", "commit"),
        ("POST", r"/([^/]+)/([^/]+)\.git/info/lfs/objects/batch", "lfs_batch"),
        ("PUT", r"/_lfs/([^/]+)/([^/]+)/([0-9a-f]{64})", "lfs_upload"),
        ("POST", r"/_lfs/([^/]+)/([^/]+)/([0-9a-f]{64})/verify", "lfs_verify"),
        ("POST", r"/_test/fault", "test_fault"),
        ("GET", r"/_test/requests", "test_requests"),
        ("POST", r"/_test/reset", "test_reset"),
    )

    def _dispatch(self) -> None:
        split = urllib.parse.urlsplit(self.path)
        self.query = dict(urllib.parse.parse_qsl(split.query))
        self._pending_drop_after = False
        for method, pattern, name in self.ROUTES:
            m = re.fullmatch(pattern, split.path)
            if m and method == self.command:
                args = [urllib.parse.unquote(g) for g in m.groups()]
                if not name.startswith("test_"):
                    self._record(name)
                try:
                    if self._fault(name):  # before the auth check: a leaking error echoes any token sent
                        return
                    if name == "lfs_upload":  # a pre-signed URL, as S3 gives: no bearer token
                        self._check_signature(args[-1])
                    elif not name.startswith("test_") and name not in ("validate_yaml", "whoami"):
                        self._check_auth()
                    getattr(self, "do_" + name)(*args)
                except HubError as exc:
                    self._error(exc)
                except Exception as exc:  # noqa: BLE001 - a test server reports everything
                    self._error(HubError(500, f"{type(exc).__name__}: {exc}"))
                return
        self._record("proxy")
        self._proxy()

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = lambda self: self._dispatch()  # noqa: E731

    # --- reads: proxied to olah
    def _proxy(self) -> None:
        up = self.state.upstream
        body = self._body() if self.headers.get("Content-Length") else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection", "content-length")}
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=120)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        self.send_response(resp.status)
        skip = {"transfer-encoding", "connection", "content-length", "server", "date"}
        for k, v in resp.getheaders():
            if k.lower() not in skip:
                self.send_header(k, v)
        length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
        self.send_header("Content-Length", length or "0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    # --- test control
    def do_test_fault(self) -> None:
        self.state.add_fault(json.loads(self._body() or b"{}"))
        self._send(200, {"ok": True})

    def do_test_requests(self) -> None:
        with self.state.lock:
            self._send(200, list(self.state.log))

    def do_test_reset(self) -> None:
        self._body()
        with self.state.lock:
            self.state.faults.clear()
            self.state.log.clear()
        self._send(200, {"ok": True})

    # --- accounts
    def do_whoami(self) -> None:
        header = self.headers.get("Authorization") or ""
        token = header[len("Bearer "):] if header.startswith("Bearer ") else None
        account = self.state.whoami.get(token) if token else None
        if account is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        self._send(200, account)

    # --- repos
    def do_create(self) -> None:
        payload = json.loads(self._body() or b"{}")
        org, name = payload.get("organization"), payload.get("name")
        if payload.get("type") not in (None, "model"):
            raise HubError(400, "this test server only hosts model repos")
        if not org or not name:
            raise HubError(400, "repo id must be namespaced: organization/name")
        repo = self._repo(org, name, must_exist=False)
        url = f"http://{self.headers.get('Host')}/{org}/{name}"
        with self.state.repo_lock(f"{org}/{name}"):
            if (repo / ".git").is_dir():  # the Hub answers 409 with the url; huggingface_hub reads it
                self.close_connection = True
                self._send(409, {"error": "You already created this model repo", "url": url})
                return
            repo.mkdir(parents=True, exist_ok=True)
            git(repo, "init", "-q", "-b", "main")
            blob = git(repo, "hash-object", "-w", "--stdin", input=GITATTRIBUTES.encode())
            env = {"GIT_INDEX_FILE": str(repo / ".git" / "index.create")}
            git(repo, "update-index", "--add", "--cacheinfo", f"100644,{blob},.gitattributes", env=env)
            tree = git(repo, "write-tree", env=env)
            commit = git(repo, "commit-tree", tree, "-m", "initial commit", env=env)
            git(repo, "update-ref", "refs/heads/main", commit, ZERO)
            (repo / ".git" / "index.create").unlink(missing_ok=True)
            (repo / ".git" / "hf_visibility").write_text(payload.get("visibility") or "public")
        self._send(200, {"url": url, "name": f"{org}/{name}"})

    def do_branch(self, org: str, name: str, branch: str) -> None:
        payload = json.loads(self._body() or b"{}")
        repo = self._repo(org, name)
        with self.state.repo_lock(f"{org}/{name}"):
            exists = subprocess.run(["git", "show-ref", "--verify", "--quiet", f"refs/heads/{branch}"], cwd=repo)
            if exists.returncode == 0:
                raise HubError(409, f"Branch {branch} already exists")
            start = rev_parse(repo, payload.get("startingPoint") or "main")
            if start is None:
                raise HubError(404, "starting point not found", "RevisionNotFound")
            git(repo, "update-ref", f"refs/heads/{branch}", start, ZERO)
        self._send(200, {})

    def do_validate_yaml(self) -> None:
        import yaml

        payload = json.loads(self._body() or b"{}")
        content = payload.get("content", "")
        m = re.match(r"^---\n(.*?)\n---", content, flags=re.S)
        errors: list[dict[str, str]] = []
        if m:
            try:
                meta = yaml.safe_load(m.group(1)) or {}
            except yaml.YAMLError as exc:
                errors.append({"message": f"invalid YAML: {exc}"})
                meta = {}
            if not isinstance(meta, dict):
                errors.append({"message": "metadata must be a mapping"})
                meta = {}
            bm = meta.get("base_model")
            strings = isinstance(bm, list) and all(isinstance(x, str) for x in bm)
            if bm is not None and not (isinstance(bm, str) or strings):
                errors.append({"message": "base_model must be a string or a list of strings"})
            for key in ("license", "pipeline_tag", "library_name", "base_model_relation"):
                if key in meta and not isinstance(meta[key], str):
                    errors.append({"message": f"{key} must be a string"})
            if "tags" in meta and not (isinstance(meta["tags"], list) and all(isinstance(t, str) for t in meta["tags"])):
                errors.append({"message": "tags must be a list of strings"})
        self._send(400 if errors else 200, {"errors": errors, "warnings": []})

    # --- uploads
    def _existing(self, repo: Path, rev: str, path: str) -> tuple[str, str] | None:
        """(upload mode, oid as huggingface_hub computes it) of `path` at `rev`, if present."""
        commit = rev_parse(repo, rev)
        if commit is None:
            return None
        line = git(repo, "ls-tree", commit, "--", path, check=False)
        if not line:
            return None
        blob = line.split()[2]
        content = subprocess.run(["git", "cat-file", "blob", blob], cwd=repo, capture_output=True).stdout
        m = POINTER_RE.fullmatch(content.decode(errors="replace")) if len(content) < 200 else None
        return ("lfs", m.group(1)) if m else ("regular", blob)

    def do_preupload(self, org: str, name: str, rev: str) -> None:
        payload = json.loads(self._body() or b"{}")
        repo = self._repo(org, name)
        if rev_parse(repo, rev) is None and not self.query.get("create_pr"):
            raise HubError(404, f"Revision {rev} not found", "RevisionNotFound")
        files = []
        for f in payload.get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            existing = self._existing(repo, rev, f["path"])
            lfs = is_lfs_path(f["path"]) or f["size"] > MAX_REGULAR or b"\x00" in sample
            files.append({
                "path": f["path"],
                "uploadMode": "lfs" if lfs else "regular",
                "shouldIgnore": False,
                "oid": existing[1] if existing else None,
            })
        self._send(200, {"files": files})

    def do_lfs_batch(self, org: str, name: str) -> None:
        payload = json.loads(self._body() or b"{}")
        repo = self._repo(org, name.removesuffix(".git"))
        base = f"http://{self.headers.get('Host')}"
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            path = lfs_path(repo, oid)
            if path.is_file() and path.stat().st_size == size:
                objects.append({"oid": oid, "size": size})
                continue
            href = f"{base}/_lfs/{org}/{name}/{oid}"
            signed = f"{href}?X-Signature={self._signature(oid)}"
            objects.append({
                "oid": oid,
                "size": size,
                "authenticated": True,
                "actions": {"upload": {"href": signed}, "verify": {"href": f"{href}/verify"}},
            })
        self._send(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})

    def do_lfs_upload(self, org: str, name: str, oid: str) -> None:
        repo = self._repo(org, name)
        size = int(self.headers.get("Content-Length") or 0)
        final = lfs_path(repo, oid)
        final.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as out:
                left = size
                while left > 0:
                    chunk = self.rfile.read(min(left, 1 << 20))
                    if not chunk:
                        break
                    digest.update(chunk)
                    out.write(chunk)
                    left -= len(chunk)
            if left or digest.hexdigest() != oid:
                raise HubError(400, f"upload of {oid} incomplete or corrupt")
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._send(200, {})

    def do_lfs_verify(self, org: str, name: str, oid: str) -> None:
        payload = json.loads(self._body() or b"{}")
        path = lfs_path(self._repo(org, name), oid)
        if not path.is_file() or path.stat().st_size != int(payload.get("size", -1)):
            raise HubError(404, f"LFS object {oid} not found")
        self._send(200, {})

    # --- commit
    def do_commit(self, org: str, name: str, rev: str) -> None:
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        repo = self._repo(org, name)
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        create_pr = self.query.get("create_pr") in ("1", "true")
        with self.state.repo_lock(f"{org}/{name}"):
            head = rev_parse(repo, rev)
            if head is None:
                raise HubError(404, f"Revision {rev} not found", "RevisionNotFound")
            parent = head
            if header.get("parentCommit"):
                wanted = rev_parse(repo, header["parentCommit"])
                if wanted is None:
                    raise HubError(404, "parent commit not found", "RevisionNotFound")
                if not create_pr and wanted != head:
                    raise HubError(412, f"A commit has happened since. Please refresh and try again. ({rev} is at {head})")
                parent = wanted
            commit = self._build_commit(repo, parent, header, lines[1:])
            if create_pr:
                refs = git(repo, "for-each-ref", "--format=%(refname)", "refs/pr/").split()
                n = 1 + max([int(r.rsplit("/", 1)[-1]) for r in refs] or [0])
                git(repo, "update-ref", f"refs/pr/{n}", commit, ZERO)
            else:
                git(repo, "update-ref", f"refs/heads/{rev}" if not rev.startswith("refs/") else rev, commit, head)
        if self._pending_drop_after:
            self._drop()
            return
        base = f"http://{self.headers.get('Host')}"
        url = f"{base}/{org}/{name}/commit/{commit}"
        result = {"success": True, "commitOid": commit, "commitUrl": url, "hookOutput": ""}
        if create_pr:
            result["pullRequestUrl"] = f"{base}/{org}/{name}/discussions/{n}"
        self._send(200, result)

    def _build_commit(self, repo: Path, parent: str, header: dict[str, Any], ops: list[dict[str, Any]]) -> str:
        fd, index = tempfile.mkstemp(dir=repo / ".git", prefix="index.commit-")
        os.close(fd)
        os.unlink(index)
        env = {"GIT_INDEX_FILE": index}
        try:
            git(repo, "read-tree", parent, env=env)
            present = set(git(repo, "ls-files", env=env).splitlines())
            entries: list[str] = []
            for op in ops:
                key, value = op.get("key"), op.get("value", {})
                path = value.get("path", "").strip("/")
                if not path or ".." in path.split("/") or path.startswith(".git/"):
                    raise HubError(400, f"invalid path {path!r}")
                if key == "file":
                    content = base64.b64decode(value["content"])
                    if len(content) > MAX_REGULAR or b"\x00" in content:
                        raise HubError(400, f"{path}: binary or large files must be uploaded with LFS")
                    blob = git(repo, "hash-object", "-w", "--stdin", input=content)
                    entries.append(f"100644 {blob}\t{path}")
                    present.add(path)
                elif key == "lfsFile":
                    oid, size = value["oid"], value.get("size")
                    stored = lfs_path(repo, oid)
                    if not stored.is_file() or (size is not None and stored.stat().st_size != int(size)):
                        raise HubError(400, f"{path}: LFS object {oid} was not uploaded")
                    pointer = POINTER.format(oid=oid, size=stored.stat().st_size).encode()
                    blob = git(repo, "hash-object", "-w", "--stdin", input=pointer)
                    entries.append(f"100644 {blob}\t{path}")
                    present.add(path)
                elif key == "deletedFile":
                    if path not in present:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    entries.append(f"0 {ZERO}\t{path}")
                    present.discard(path)
                elif key == "deletedFolder":
                    gone = [p for p in present if p.startswith(path + "/")]
                    if not gone:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    entries += [f"0 {ZERO}\t{p}" for p in gone]
                    present.difference_update(gone)
                else:
                    raise HubError(400, f"unsupported commit operation {key!r}")
            if entries:
                git(repo, "update-index", "--index-info", input=("\n".join(entries) + "\n").encode(), env=env)
            tree = git(repo, "write-tree", env=env)
        finally:
            Path(index).unlink(missing_ok=True)
        message = header.get("summary") or "commit"
        if header.get("description"):
            message += "\n\n" + header["description"]
        return git(repo, "commit-tree", tree, "-p", parent, "-m", message)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], state: State):
        super().__init__(address, Handler)
        self.state = state
        self.secret = os.urandom(16).hex()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mirrors", required=True, help="olah mirrors-path; repos live in <mirrors>/models/<org>/<name>")
    parser.add_argument("--upstream", required=True, help="olah's URL, for reads")
    parser.add_argument("--token", default=os.environ.get("COMMIT_SERVER_TOKEN"), help="require this bearer token on writes")
    parser.add_argument("--whoami", default=os.environ.get("COMMIT_SERVER_WHOAMI", "{}"),
                        help="JSON: token -> whoami-v2 body (the --token gets a default write account)")
    args = parser.parse_args(argv)
    state = State(Path(args.mirrors), args.upstream, args.token, json.loads(args.whoami))
    (state.mirrors / "models").mkdir(parents=True, exist_ok=True)
    server = Server((args.host, args.port), state)
    print(f"commit server on http://{args.host}:{args.port}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


if __name__ == "__main__":
    sys.exit(main())
