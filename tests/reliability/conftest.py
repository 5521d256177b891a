"""The reliability catalogue's shared guard: a bad input raises the right error and writes nothing.

`untouched` snapshots the test's working directory (a fresh temporary folder), a private HF home and any extra
folder the test names, and asserts after the test body that none of them changed: no file added, removed,
resized or rewritten. This folder is not a package on purpose: an `__init__.py` makes pytest put `tests/` on
`sys.path`, where `tests/kernels` shadows the Hub `kernels` package that transformers probes for.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


def snapshot(root: str | os.PathLike[str]) -> dict[str, tuple[int, int]]:
    """Every file and folder under `root` (relative path → size, mtime in ns); folders have size -1."""
    root = Path(root)
    out: dict[str, tuple[int, int]] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            p = Path(dirpath, name)
            out[str(p.relative_to(root)) + "/"] = (-1, 0)
        for name in filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


class Untouched:
    """Folders that must be byte-for-byte the same after the test body as before it."""

    def __init__(self, *roots: Path) -> None:
        self._before: dict[Path, dict[str, tuple[int, int]]] = {}
        for root in roots:
            self.watch(root)

    def watch(self, root: str | os.PathLike[str] | None = None) -> Path | None:
        """Guard `root` too, and take the present state of every guarded folder as the baseline (call it after
        the test has built its inputs)."""
        if root is not None:
            self._before[Path(root)] = {}
        for key in self._before:
            self._before[key] = snapshot(key)
        return Path(root) if root is not None else None

    def check(self) -> None:
        for root, before in self._before.items():
            after = snapshot(root)
            added = sorted(set(after) - set(before))
            removed = sorted(set(before) - set(after))
            changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
            assert not (added or removed or changed), (
                f"an error path touched {root}: added {added[:5]}, removed {removed[:5]}, changed {changed[:5]}"
            )


@pytest.fixture
def untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Untouched]:
    """cwd = a fresh folder, HF_HOME = a private empty folder; both (and any `untouched.watch(path)`) unchanged."""
    work = tmp_path / "cwd"
    home = tmp_path / "hf_home"
    work.mkdir()
    home.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HF_HOME", str(home))
    guard = Untouched(work, home)
    yield guard
    guard.check()

