"""The one writer every save goes through: nothing we did not write is deleted, an earlier save is replaced atomically.

A save writes its files into a temporary folder, then either

* **swaps folders** when the destination is absent, empty, or holds only an earlier save of ours (recognised by
  the manifest we write, `MANIFEST`): the new folder is completed beside the old one, the old one is moved aside,
  the new one moved in, the old one deleted. A crash at any instant leaves the old or the new save, complete; if it
  falls between the two renames the next save or load of that place finishes the swap (roll forward); or
* **writes beside** the user's files when the destination holds anything else (a Trainer ``output_dir`` with
  ``checkpoint-*`` folders, a ``train.jsonl``): each of our files is renamed into place on its own, theirs are
  untouched; a name clash with a file that is not ours is refused unless ``overwrite=True``, which replaces only
  the colliding files. A crash while the files move is finished by the next save or load from the complete
  temporary copy.

The working directory, ``.``, ``""``, the home directory, ``/`` and any ancestor of the working directory are
refused outright; ``~`` is expanded. Temporary names carry host, pid and start time; a lock (``flock``) keeps two
live writers of one destination apart, and whatever temporary entries dead writers left are removed by the next
save. This module is a leaf: it imports only the standard library and `hf_fastvision.errors`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from hf_fastvision.errors import ManifestMismatchError, UnsafeDestinationError

try:  # POSIX; elsewhere live writers are not kept apart (renames stay atomic)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = ["MANIFEST", "SafeWriter", "safe_destination", "recover", "check_manifest", "read_manifest", "our_files"]

MANIFEST = ".hf_fastvision_save.json"
"""Written last into every save: the files we wrote (relative path → size), the kind of save, the library version."""

_TAG = "hffv"
_COMMITTED = ".hffv-committed"  # inside a beside-mode temporary folder: its files may move into place


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("hf_fastvision")
    except Exception:  # pragma: no cover - not installed (source checkout)
        return "unknown"


# --------------------------------------------------------------------------------------------------- destination
def safe_destination(folder: str | os.PathLike[str]) -> Path:
    """The absolute, `~`-expanded, symlink-resolved destination; refuses places a save must never replace."""
    raw = os.fspath(folder) if folder is not None else ""
    if not str(raw).strip():
        raise UnsafeDestinationError.empty()
    path = Path(os.path.realpath(os.path.expanduser(str(raw))))
    cwd = Path(os.path.realpath(os.getcwd()))
    home = Path(os.path.realpath(os.path.expanduser("~")))
    if path == Path(path.anchor):
        raise UnsafeDestinationError.protected(raw, "the filesystem root")
    if path == home:
        raise UnsafeDestinationError.protected(raw, "your home directory")
    if path == cwd:
        raise UnsafeDestinationError.protected(raw, "the working directory")
    if path in cwd.parents:
        raise UnsafeDestinationError.protected(raw, "an ancestor of the working directory")
    if path.exists() and not path.is_dir():
        raise UnsafeDestinationError.is_file(raw)
    return path


# --------------------------------------------------------------------------------------------------- manifest
def read_manifest(folder: str | os.PathLike[str]) -> dict | None:
    """The manifest of a save of ours, or None when `folder` holds none (or an unreadable one)."""
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("library") != "hf_fastvision" or not isinstance(data.get("files"), dict):
        return None
    return data


def _files(folder: Path) -> dict[str, int]:
    """Every file under `folder` (relative POSIX path → size), our own bookkeeping entries excluded."""
    out: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        rel_dir = Path(dirpath).relative_to(folder)
        dirnames[:] = [d for d in dirnames if not (rel_dir == Path(".") and _is_ours_tmp(d))]
        for name in filenames:
            rel = (rel_dir / name).as_posix()
            if rel in (MANIFEST, _COMMITTED) or (rel_dir == Path(".") and _is_ours_tmp(name)):
                continue
            out[rel] = (Path(dirpath) / name).lstat().st_size
    return out


def our_files(folder: Path, manifest: dict | None) -> set[str]:
    """Files of `folder` that an earlier save of ours wrote and nobody changed since (same size)."""
    if manifest is None:
        return set()
    present = _files(folder)
    return {rel for rel, size in manifest["files"].items() if present.get(rel) == size}


def _manifest_matches(folder: Path) -> bool:
    manifest = read_manifest(folder)
    if manifest is None:
        return False
    present = _files(folder)
    return all(present.get(rel) == size for rel, size in manifest["files"].items())


def _write_manifest(folder: Path, files: dict[str, int], kind: str) -> None:
    data = {"library": "hf_fastvision", "version": _version(), "kind": kind, "created": time.time(),
            "files": dict(sorted(files.items()))}
    _write_text(folder / MANIFEST, json.dumps(data, indent=1))


def check_manifest(folder: str | os.PathLike[str]) -> None:
    """Raise `ManifestMismatchError` when `folder` holds a manifest of ours that its files disagree with."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return
    present = _files(folder)
    missing = sorted(rel for rel in manifest["files"] if rel not in present)
    resized = sorted(rel for rel, size in manifest["files"].items() if rel in present and present[rel] != size)
    if missing or resized:
        raise ManifestMismatchError(str(folder), missing, resized)


# --------------------------------------------------------------------------------------------------- temporaries
def _is_ours_tmp(name: str) -> bool:
    return name.startswith(f".{_TAG}-")


def _sibling_prefix(dest: Path) -> str:
    return f".{dest.name}.{_TAG}-"


def _stamp() -> str:
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{int(time.time() * 1000)}"


def _lock_path(dest: Path) -> Path:
    return dest.parent / f"{_sibling_prefix(dest)}lock"


@contextmanager
def _locked(dest: Path, timeout: float | None = None) -> Iterator[None]:
    """Exclusive lock of `dest` among live writers; the lock file is removed on release."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    path = _lock_path(dest)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            if deadline is None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise UnsafeDestinationError.locked(str(dest)) from None
                        time.sleep(0.05)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)  # the holder before us removed the file: lock the new one
    try:
        yield
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:  # pragma: no cover
            pass
        os.close(fd)


def _rmtree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _pending(dest: Path) -> tuple[list[Path], list[Path]]:
    """Temporary entries of ours around `dest`: siblings (``.name.hffv-*``) and inside it (``.hffv-*``)."""
    prefix, lock = _sibling_prefix(dest), _lock_path(dest).name
    siblings = []
    if dest.parent.is_dir():
        siblings = [p for p in dest.parent.iterdir() if p.name.startswith(prefix) and p.name != lock]
    inside = [p for p in dest.iterdir() if _is_ours_tmp(p.name)] if dest.is_dir() else []
    return siblings, inside


def _newest(paths: Iterable[Path]) -> Path | None:
    paths = list(paths)
    return max(paths, key=lambda p: p.stat().st_mtime_ns) if paths else None


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{_TAG}-{path.name.lstrip('.')}-{_stamp()}.tmp")  # a name the next save cleans up
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _committed(tmp: Path) -> list[str] | None:
    """The stale files a committed beside-mode folder will remove, or None when it was never committed."""
    if read_manifest(tmp) is None:
        return None
    try:
        stale = json.loads((tmp / _COMMITTED).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return [str(s) for s in stale] if isinstance(stale, list) else None


def _move_beside(tmp: Path, dest: Path, kind: str, stale_ours: Iterable[str] = ()) -> None:
    """Rename every file of a committed beside-mode folder into `dest` (idempotent), then the manifest."""
    manifest = read_manifest(tmp)
    assert manifest is not None
    for rel in manifest["files"]:
        src, dst = tmp / rel, dest / rel
        if src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.is_dir() and not dst.is_symlink():  # a folder of the user's: never removed
                raise UnsafeDestinationError.clash(str(dest), [rel])
            os.replace(src, dst)
    for rel in stale_ours:
        if rel not in manifest["files"]:
            _rmtree(dest / rel)
    _write_manifest(dest, manifest["files"], manifest.get("kind", kind))
    _rmtree(tmp)


def _recover_locked(dest: Path) -> None:
    siblings, inside = _pending(dest)
    if not dest.exists():
        # A swap died between its two renames: move the newest complete new folder in, else the old one back.
        complete_new = [p for p in siblings if f".{_TAG}-new-" in p.name and _manifest_matches(p)]
        complete_old = [p for p in siblings if f".{_TAG}-old-" in p.name and _manifest_matches(p)]
        chosen = _newest(complete_new) or _newest(complete_old)
        if chosen is not None:
            os.rename(chosen, dest)
            siblings = [p for p in siblings if p != chosen]
    for tmp in inside:
        stale = _committed(tmp)
        if stale is not None:
            _move_beside(tmp, dest, "", stale_ours=stale)
        else:
            _rmtree(tmp)
    for path in siblings:
        _rmtree(path)


def recover(folder: str | os.PathLike[str]) -> bool:
    """Finish or clean up what an interrupted save left at `folder`; True if there was anything. Cheap when not."""
    try:
        dest = Path(os.path.realpath(os.path.expanduser(os.fspath(folder))))
    except (TypeError, ValueError):
        return False
    siblings, inside = _pending(dest)
    if not siblings and not inside:
        return False
    with _locked(dest):
        _recover_locked(dest)
    return True


# --------------------------------------------------------------------------------------------------- the writer
@dataclass
class SafeWriter:
    """``with SafeWriter(dest, kind="adapter") as w: save_into(w.tmp)`` — published on a clean exit, else nothing.

    ``expected``: file names the save will write, checked for clashes before any work (the final check after
    writing covers the rest). ``w.scratch(tag)`` gives an extra temporary folder beside the destination (e.g. a
    16-bit staging copy), removed at the end and, if the process dies, by the next save.
    """

    folder: str | os.PathLike[str]
    kind: str = "save"
    overwrite: bool = False
    expected: tuple[str, ...] = ()
    lock_timeout: float | None = None
    dest: Path = field(init=False)
    tmp: Path = field(init=False)
    mode: str = field(init=False, default="swap")
    _scratch: list[Path] = field(init=False, default_factory=list)
    _lock: object = field(init=False, default=None)
    _previous: dict | None = field(init=False, default=None)
    _made: list[Path] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.dest = safe_destination(self.folder)
        if self.dest.is_dir():  # refuse a clash now, before the caller does any work (re-checked under the lock)
            self._check_clashes(self.expected, _files(self.dest), our_files(self.dest, read_manifest(self.dest)))

    def __enter__(self) -> SafeWriter:
        dest = self.dest
        missing = [p for p in [dest.parent, *dest.parent.parents] if not p.exists()]
        dest.parent.mkdir(parents=True, exist_ok=True)
        self._made = missing  # removed again (if still empty) when the save fails
        self._lock = _locked(dest, self.lock_timeout)
        self._lock.__enter__()  # type: ignore[attr-defined]
        try:
            _recover_locked(dest)
            self._previous = read_manifest(dest) if dest.is_dir() else None
            present = _files(dest) if dest.is_dir() else {}
            ours = our_files(dest, self._previous)
            self.mode = "swap" if set(present) <= ours else "beside"
            self._check_clashes(self.expected, present, ours)
            stamp = _stamp()
            if self.mode == "swap":
                self.tmp = dest.parent / f"{_sibling_prefix(dest)}new-{stamp}"
            else:
                self.tmp = dest / f".{_TAG}-new-{stamp}"
            self.tmp.mkdir()
        except BaseException:
            self._lock.__exit__(None, None, None)  # type: ignore[attr-defined]
            self._unmake()
            raise
        return self

    def _unmake(self) -> None:
        for path in self._made:  # deepest first
            try:
                path.rmdir()
            except OSError:
                break

    def scratch(self, tag: str) -> Path:
        path = self.dest.parent / f"{_sibling_prefix(self.dest)}{tag}-{_stamp()}"
        path.mkdir()
        self._scratch.append(path)
        return path

    def _check_clashes(self, names: Iterable[str], present: dict[str, int], ours: set[str]) -> None:
        if self.overwrite:
            return
        clashes = sorted(n for n in names if n in present and n not in ours)
        if clashes:
            raise UnsafeDestinationError.clash(str(self.dest), clashes)

    def __exit__(self, exc_type, exc, tb) -> None:
        ok = False
        try:
            if exc_type is None:
                self._commit()
                ok = True
        finally:
            for path in [*self._scratch, getattr(self, "tmp", None)]:
                if path is not None and path.exists():
                    _rmtree(path)
            self._lock.__exit__(None, None, None)  # type: ignore[attr-defined]
            if not ok and not self.dest.exists():
                self._unmake()

    def _commit(self) -> None:
        dest, tmp = self.dest, self.tmp
        written = _files(tmp)
        if not written:
            raise UnsafeDestinationError.nothing_written(str(dest))
        if self.mode == "swap":
            _write_manifest(tmp, written, self.kind)
            if dest.exists():
                old = dest.parent / f"{_sibling_prefix(dest)}old-{_stamp()}"
                os.rename(dest, old)
                os.rename(tmp, dest)
                _rmtree(old)
            else:
                os.rename(tmp, dest)
            return
        present = _files(dest)
        ours = our_files(dest, self._previous)
        self._check_clashes(written, present, ours)
        _write_manifest(tmp, written, self.kind)
        stale = sorted(ours - set(written))
        _write_text(tmp / _COMMITTED, json.dumps(stale))
        _move_beside(tmp, dest, self.kind, stale_ours=stale)
