"""Process metrics: garbage-collection pauses, and the event loop serve runs on."""

from __future__ import annotations

import asyncio
import builtins
import gc

import uvloop

from app import metrics
from app.__main__ import _loop_factory


def _pauses_observed() -> float:
    return sum(
        sample.value
        for family in metrics.GC_PAUSE_SECONDS.collect()
        for sample in family.samples
        if sample.name == "hearth_gc_pause_seconds_count"
    )


def test_every_collection_is_timed_once_however_often_the_timer_is_installed():
    """Installing twice adds one hook; a full collection is one observation, and the longest pause is kept."""
    metrics.install_gc_timer()
    metrics.install_gc_timer()
    assert gc.callbacks.count(metrics._GC_TIMER) == 1
    garbage = [[index] for index in range(200_000)]  # something for the collection to scan
    before = _pauses_observed()
    gc.collect()
    del garbage
    assert _pauses_observed() == before + 1
    longest = metrics.GC_PAUSE_MAX_SECONDS._value.get()
    assert 0 < longest == metrics._GC_TIMER.longest


def test_serve_runs_on_uvloop_when_asked_and_on_asyncio_otherwise(monkeypatch):
    """HEARTH_EVENT_LOOP=uvloop gives uvloop's loops; asyncio, or uvloop missing, asyncio's."""
    assert _loop_factory("asyncio") is None
    factory = _loop_factory("uvloop")
    assert factory is uvloop.new_event_loop
    loop = factory()
    try:
        assert isinstance(loop, uvloop.Loop)
        assert loop.run_until_complete(asyncio.sleep(0, "ran")) == "ran"
    finally:
        loop.close()
    real_import = builtins.__import__

    def no_uvloop(name, *args, **kwargs):
        if name == "uvloop":
            raise ImportError("uvloop is not installed")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_uvloop)
    assert _loop_factory("uvloop") is None  # warned, and serving goes on with asyncio
