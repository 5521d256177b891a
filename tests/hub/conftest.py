"""Hub test servers and the client process.

- `olah` (from PyPI) serves local git repos through the Hub API: offline mode, `mirrors-path` pointing at
  `<tmp>/mirrors`, where a repo `org/name` is the git repo `<tmp>/mirrors/models/org/name` (LFS objects under
  its `.git/lfs/objects`). Every pull in these tests is a real `snapshot_download` from it.
- `commit_server.py` (ours, a test double: no installable server implements the Hub's write API) takes the
  writes huggingface_hub makes (create repo/branch, preupload, LFS batch + upload, NDJSON commit) and commits
  into those same git repos; it proxies every read to olah. It requires a bearer token on writes.
- `ClientWorker`: huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE / HF_HUB_DISABLE_XET at import, and this
  pytest process has long imported it offline, so the client side of every round trip runs in one long-lived
  subprocess started with the right environment (HF_ENDPOINT = the commit server, HF_HUB_DISABLE_XET=1, its
  own empty HF_HOME, HF_TOKEN); tests send it calls (see _client_worker.py). The test process itself stays
  offline and loads what was pulled from the cache folder, as a user would.

Servers are started on free ports of 127.0.0.1, waited for, and stopped by pid.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TOKEN = "hf_TestTokenDoNotLeak4bitPushABCDEFGH12345"
"""The write token: user `hf-fastvision-test-user`, member of org `hf-fastvision-test` (commit_server's default)."""
READ_TOKEN = "hf_TestReadOnlyTokenDoNotLeakABCDEFGH123"
OTHER_TOKEN = "hf_TestOtherUserTokenDoNotLeakABCDEFG12"
FINE_TOKEN = "hf_TestFineGrainedTokenDoNotLeakABCDEF12"
ACCOUNTS = {
    READ_TOKEN: {"type": "user", "name": "hf-fastvision-test-user", "orgs": [{"name": "hf-fastvision-test"}],
                 "auth": {"type": "access_token", "accessToken": {"role": "read"}}},
    OTHER_TOKEN: {"type": "user", "name": "someone-else", "orgs": [{"name": "someone-elses-org"}],
                  "auth": {"type": "access_token", "accessToken": {"role": "write"}}},
    FINE_TOKEN: {"type": "user", "name": "hf-fastvision-test-user", "orgs": [{"name": "hf-fastvision-test"}],
                 "auth": {"type": "access_token", "accessToken": {"role": "fineGrained", "fineGrained": {
                     "global": [], "scoped": [{"entity": {"type": "user", "name": "hf-fastvision-test-user"},
                                              "permissions": ["repo.content.read", "repo.write"]}]}}}},
}
"""whoami-v2 answers for the other tokens the commit server knows (none of them may write)."""
POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(port: int, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"server on port {port} did not start:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _git(repo: Path, *args: str, input: bytes | None = None) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "GIT_CONFIG_NOSYSTEM": "1"}
    out = subprocess.run(["git", "-C", str(repo), *args], input=input, capture_output=True, env=env, check=True)
    return out.stdout.decode().strip()


class HubServers:
    """Handles on the two servers and the git repos behind them."""

    def __init__(self, root: Path):
        self.root = root
        self.mirrors = root / "mirrors"
        self.olah_port = _free_port()
        self.write_port = _free_port()
        self.olah_url = f"http://127.0.0.1:{self.olah_port}"
        self.write_url = f"http://127.0.0.1:{self.write_port}"
        self.token = TOKEN
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        (self.mirrors / "models").mkdir(parents=True, exist_ok=True)
        config = self.root / "olah.toml"
        config.write_text(
            "[basic]\n"
            f'host = "127.0.0.1"\nport = {self.olah_port}\n'
            f'repos-path = "{self.root / "olah-cache"}"\n'
            f'mirrors-path = ["{self.mirrors}"]\n'
            f'mirror-netloc = "127.0.0.1:{self.olah_port}"\nmirror-lfs-netloc = "127.0.0.1:{self.olah_port}"\n'
            "metadata-cache-ttl = 0\n"
            "[accessibility]\noffline = true\n"
        )
        olah_log = self.root / "olah.log"
        code = "from olah.server import cli; cli()"
        self.procs.append(subprocess.Popen(
            [sys.executable, "-c", code, "-c", str(config), "--log-path", str(self.root / "olah-logs")],
            cwd=self.root, stdout=open(olah_log, "wb"), stderr=subprocess.STDOUT,
        ))
        write_log = self.root / "commit_server.log"
        self.procs.append(subprocess.Popen(
            [sys.executable, str(HERE / "commit_server.py"), "--port", str(self.write_port), "--mirrors",
             str(self.mirrors), "--upstream", self.olah_url, "--token", self.token, "--whoami", json.dumps(ACCOUNTS)],
            cwd=self.root, stdout=open(write_log, "wb"), stderr=subprocess.STDOUT,
        ))
        _wait_for(self.write_port, self.procs[1], write_log)
        _wait_for(self.olah_port, self.procs[0], olah_log)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            _stop(proc)

    # --- git side
    def repo(self, repo_id: str) -> Path:
        return self.mirrors / "models" / repo_id

    def head(self, repo_id: str, ref: str = "main") -> str | None:
        repo = self.repo(repo_id)
        if not (repo / ".git").is_dir():
            return None
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", f"refs/heads/{ref}"],
                             capture_output=True)
        return out.stdout.decode().strip() or None

    def files(self, repo_id: str, ref: str = "main") -> list[str]:
        return _git(self.repo(repo_id), "ls-tree", "-r", "--name-only", ref).splitlines()

    def commit_count(self, repo_id: str, ref: str = "main") -> int:
        return int(_git(self.repo(repo_id), "rev-list", "--count", ref))

    def lfs_objects(self, repo_id: str) -> list[str]:
        objects = self.repo(repo_id) / ".git" / "lfs" / "objects"
        return sorted(p.name for p in objects.rglob("*") if p.is_file() and not p.name.startswith("."))

    def seed(self, repo_id: str, folder: Path) -> str:
        """Publish `folder` as repo `repo_id` by hand (git + LFS pointers), as if uploaded by someone else."""
        repo = self.repo(repo_id)
        repo.mkdir(parents=True)
        _git(repo, "init", "-q", "-b", "main")
        names = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = path.relative_to(folder).as_posix()
            target = repo / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == ".safetensors":
                data = path.read_bytes()
                oid = hashlib.sha256(data).hexdigest()
                obj = repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
                obj.parent.mkdir(parents=True, exist_ok=True)
                obj.write_bytes(data)
                target.write_text(POINTER.format(oid=oid, size=len(data)))
            else:
                shutil.copyfile(path, target)
            names.append(rel)
        _git(repo, "add", "--", *names)
        _git(repo, "commit", "-q", "-m", "upload")
        return _git(repo, "rev-parse", "HEAD")

    # --- commit server control
    def _post(self, path: str, payload: Any = None) -> Any:
        req = urllib.request.Request(self.write_url + path, data=json.dumps(payload or {}).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"null")

    def fault(self, stage: str, **spec: Any) -> None:
        self._post("/_test/fault", {"stage": stage, **spec})

    def reset(self) -> None:
        self._post("/_test/reset")

    def requests(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(self.write_url + "/_test/requests", timeout=30) as r:
            return json.loads(r.read())


class WorkerError(Exception):
    def __init__(self, error: dict[str, Any]):
        super().__init__(f"{error['type']}: {error['message']}")
        self.type = error["type"]
        self.mro = error["mro"]
        self.message = error["message"]


class ClientWorker:
    """The long-lived client process (see _client_worker.py). A failed call raises `ClientWorker.Error`."""

    Error = WorkerError

    def __init__(self, servers: HubServers, home: Path):
        self.log = home / "client.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
        env.update(
            HF_ENDPOINT=servers.write_url,
            HF_HUB_DISABLE_XET="1",
            HF_HUB_OFFLINE="0",
            HF_HOME=str(home / "hf_home"),
            HF_TOKEN=servers.token,
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_ETAG_TIMEOUT="30",
            TOKENIZERS_PARALLELISM="false",
            PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        )
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "_client_worker.py")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.log, "wb"), env=env, cwd=home,
        )

    def call(self, fn: str, timeout: float = 240, **kwargs: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps({"fn": fn, "kwargs": kwargs}) + "\n").encode())
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"client call {fn} took more than {timeout}s:\n{self.log_text()[-3000:]}")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"client process died:\n{self.log_text()[-3000:]}")
        reply = json.loads(line)
        if not reply["ok"]:
            raise WorkerError(reply["error"])
        return reply["result"]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(b'{"fn": "exit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                pass
        _stop(self.proc)


@pytest.fixture(scope="session")
def hub_servers(tmp_path_factory):
    servers = HubServers(tmp_path_factory.mktemp("hub-servers"))
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()


@pytest.fixture(scope="session")
def hub_client(hub_servers, tmp_path_factory):
    worker = ClientWorker(hub_servers, tmp_path_factory.mktemp("hub-client"))
    try:
        info = worker.call("ping", timeout=300)
        assert info["endpoint"] == hub_servers.write_url and not info["offline"], info
        yield worker
    finally:
        worker.close()


@pytest.fixture
def servers(hub_servers):
    """The servers with no pending fault and an empty request log."""
    hub_servers.reset()
    yield hub_servers
    hub_servers.reset()


@pytest.fixture(scope="session")
def hub_tokens():
    """The tokens the commit server knows: write (default), read, other (another user), fine (own namespace only)."""
    return {"write": TOKEN, "read": READ_TOKEN, "other": OTHER_TOKEN, "fine": FINE_TOKEN}


@pytest.fixture
def empty_cache(tmp_path):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    return cache


QWEN_REPO = "hf-fastvision-test/tiny-qwen2-vl-bnb-4bit"
QWEN_BASE = "tiny-org/tiny-qwen2-vl"


@pytest.fixture(scope="session")
def qwen_roundtrip(hub_servers, hub_client, tiny_checkpoint, tmp_path_factory):
    """The qwen2_vl tiny model quantized and pushed by the pipeline, then pulled into an empty cache."""
    work = tmp_path_factory.mktemp("qwen-roundtrip")
    src = tiny_checkpoint("qwen2_vl")
    report = hub_client.call("quantize", src=str(src), repo_id=QWEN_REPO, base_model=QWEN_BASE,
                             logits_out=str(work / "logits.pt"))
    cache = work / "cache"
    pulled = hub_client.call("pull", repo_id=QWEN_REPO, revision="main", cache_dir=str(cache),
                             endpoint=hub_servers.olah_url)
    return {"src": src, "report": report, "cache": cache, "pulled": pulled, "logits": work / "logits.pt",
            "repo_id": QWEN_REPO, "base_model": QWEN_BASE}
