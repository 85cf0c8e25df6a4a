"""gcpolicy.burst: the collector's and the GIL's pace during a collection, restored after."""

from __future__ import annotations

import gc
import sys

import pytest

from batchd.gcpolicy import BURST_SWITCH_INTERVAL, BURST_THRESHOLD, burst, freeze_start_up


def test_a_burst_paces_the_collector_and_the_gil_and_restores_them_after_overlapping_bursts() -> None:
    threshold, interval = gc.get_threshold(), sys.getswitchinterval()
    first = burst()
    first.__enter__()
    assert gc.get_threshold()[0] == max(threshold[0], BURST_THRESHOLD)
    assert gc.get_threshold()[1:] == threshold[1:]
    assert gc.isenabled()  # paced, never off
    assert sys.getswitchinterval() == pytest.approx(min(interval, BURST_SWITCH_INTERVAL))
    second = burst()  # another collection starts before the first ends (coroutines)
    second.__enter__()
    first.__exit__(None, None, None)
    assert gc.get_threshold()[0] == max(threshold[0], BURST_THRESHOLD)  # the second still runs
    second.__exit__(None, None, None)
    assert (gc.get_threshold(), sys.getswitchinterval()) == (threshold, interval)


def test_a_burst_that_fails_restores_the_pace() -> None:
    threshold, interval = gc.get_threshold(), sys.getswitchinterval()
    with pytest.raises(RuntimeError), burst():
        raise RuntimeError("a failed download")
    assert (gc.get_threshold(), sys.getswitchinterval()) == (threshold, interval)


def test_what_lives_after_start_up_is_out_of_the_collectors_sight() -> None:
    assert gc.get_freeze_count() == 0  # in-process daemons (Daemon(settings)) never freeze the tests
    try:
        freeze_start_up()
        # The modules and the SDKs already imported: an older-generation pass no longer walks them.
        assert gc.get_freeze_count() > 10_000
        assert len(gc.get_objects(2)) < gc.get_freeze_count()
    finally:
        gc.unfreeze()
