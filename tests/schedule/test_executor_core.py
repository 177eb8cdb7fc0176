"""The generic timeline executor, with recording handlers instead of a model."""

import gc
import threading
import time

import pytest

from moejax.model_config import get_model
from moejax.schedule.executor import execute
from moejax.schedule.policy import Policy
from moejax.schedule.timeline import OPS, build_timeline

CFG = get_model("tiny_mixtral")


def _tl(overlap=True):
    pol = Policy.from_micro_batches(2, 3, gpu_weight_fraction=0.0, page_bytes=60_000,
                                    overlap=overlap)
    return build_timeline(CFG, pol, prompt_len=4, decode_steps=2)


def _recorder(sleep_s=0.0):
    log, lock = [], threading.Lock()

    def handler(e):
        time.sleep(sleep_s)
        with lock:
            log.append(e.id)
    return {op: handler for op in OPS}, log


@pytest.mark.parametrize("overlap", [True, False])
def test_every_entry_runs_once_after_its_deps(overlap):
    tl = _tl(overlap)
    handlers, log = _recorder()
    trace = execute(tl, handlers, overlap=overlap)
    assert sorted(log) == list(range(len(tl)))
    for e in tl:
        for d in e.deps:
            assert trace.end_s[d] <= trace.start_s[e.id]


def test_serial_runs_in_list_order():
    tl = _tl(False)
    handlers, log = _recorder()
    execute(tl, handlers, overlap=False)
    assert log == list(range(len(tl)))


def test_each_resource_keeps_its_list_order():
    tl = _tl()
    handlers, log = _recorder()
    execute(tl, handlers, overlap=True)
    pos = {i: k for k, i in enumerate(log)}
    for r in ("gpu", "cpu", "h2d", "d2h"):
        ids = [e.id for e in tl if e.resource == r]
        assert [pos[i] for i in ids] == sorted(pos[i] for i in ids)


def test_overlap_runs_resources_concurrently():
    tl = _tl()
    handlers, _ = _recorder(sleep_s=0.002)
    serial = execute(tl, handlers, overlap=False).makespan_s
    overlapped = execute(tl, handlers, overlap=True).makespan_s
    assert overlapped < 0.8 * serial


def test_handler_error_surfaces_and_stops():
    tl = _tl()
    handlers, _ = _recorder()

    def boom(e):
        raise RuntimeError("cpu attention failed")
    with pytest.raises(RuntimeError, match="cpu attention failed"):
        execute(tl, {**handlers, "cpu_attn": boom}, overlap=True)


@pytest.mark.parametrize("overlap", [True, False])
def test_garbage_collector_paused_during_the_run_and_restored_after(overlap):
    seen = set()

    def record(e):
        seen.add(gc.isenabled())

    def boom(e):
        raise RuntimeError("boom")
    assert gc.isenabled()
    execute(_tl(overlap), {op: record for op in OPS}, overlap=overlap)
    assert seen == {False} and gc.isenabled()
    with pytest.raises(RuntimeError, match="boom"):
        execute(_tl(overlap), {op: boom for op in OPS}, overlap=overlap)
    assert gc.isenabled()


def test_missing_handler_named():
    with pytest.raises(ValueError, match="cpu_attn"):
        execute(_tl(), {op: (lambda e: None) for op in OPS if op != "cpu_attn"})


def test_expert_imbalance_is_fitted_per_stage():
    from types import SimpleNamespace

    import numpy as np

    from moejax.schedule.routing import fit_imbalance
    from moejax.runtime import BatchRun

    hot, even = np.array([40, 8, 8, 8]), np.array([16, 16, 16, 16])
    run = SimpleNamespace(cfg=SimpleNamespace(top_k=2),
                          router_counts={"prefill": [hot, hot], "decode": [even]})
    assert BatchRun.expert_imbalance(run, "prefill") == fit_imbalance([hot, hot], 2) > 1
    assert BatchRun.expert_imbalance(run, "decode") == 1.0
    assert BatchRun.expert_imbalance(run) == fit_imbalance([hot, hot, even], 2)


@pytest.mark.parametrize("overlap", [True, False])
def test_stop_timeline_ends_the_run_at_that_entry(overlap):
    """A handler raising StopTimeline (every row hit EOS) ends the run: nothing on its
    resource, and nothing that depends on it, runs after it."""
    from moejax.schedule.executor import StopTimeline

    tl = _tl(overlap)
    stop = next(e for e in tl if e.op == "head" and e.step == 1)
    handlers, log = _recorder()

    def head(e):
        handlers["head"](e)
        if e.id == stop.id:
            raise StopTimeline()
    execute(tl, {**handlers, "head": head}, overlap=overlap)
    assert stop.id in log
    later = [e.id for e in tl if e.id > stop.id and e.resource == stop.resource]
    assert later and not set(later) & set(log)
