"""SIGKILLs spread over each writer's whole duration: old-or-new complete, nothing lost, no leftovers after the next save.

A few kills per writer (one per scenario: fresh destination, replacing an earlier save, replacing it beside the
user's files); `scripts/kill_saves.py` runs the same check at scale.
"""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kills hit forked children")


def test_kills_over_every_writer(script_module, tmp_path):
    kill_saves = script_module("kill_saves")
    rows = kill_saves.run(list(kill_saves.WRITERS), kills=3, seed=0, root=tmp_path, log=lambda s: None)
    assert [r["writer"] for r in rows] == list(kill_saves.WRITERS)
    for row in rows:
        assert row["kills"] == 3
        assert row["half_written"] == row["earlier_lost"] == row["leftovers"] == row["user_file_changed"] == 0, row
