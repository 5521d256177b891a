"""scripts/profile_load.py's per-phase cProfile table (the loads themselves run on the GPU machine)."""

from __future__ import annotations

import cProfile
import time


def _slow_leaf() -> None:
    time.sleep(0.02)


def _caller() -> None:
    for _ in range(3):
        _slow_leaf()


def test_top_lists_each_function_with_its_calls_and_cumulative_time(script_module):
    pl = script_module("profile_load")
    prof = cProfile.Profile()
    prof.enable()
    _caller()
    prof.disable()
    rows = {where.rsplit(":", 1)[1]: (calls, own, cum) for where, calls, own, cum in pl._top(prof, "cumulative", 50)}
    assert rows["_caller"][0] == 1 and rows["_slow_leaf"][0] == 3
    assert rows["_caller"][2] >= 0.06 and rows["_slow_leaf"][2] >= 0.06
    # by own time the sleeping built-in leads; the caller itself spends almost nothing
    own = pl._top(prof, "tottime", 1)
    assert own[0][0].endswith("time.sleep>") and own[0][2] >= 0.06
    assert rows["_caller"][1] < 0.02
