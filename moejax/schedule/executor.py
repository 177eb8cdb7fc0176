"""Run a timeline for real (docs/design.md §3): `handlers[entry.op](entry)` per entry, one
thread per resource in list order waiting only on deps (the simulator's list schedule),
or serially without `overlap`. Handlers must block until their outputs exist, so an
entry's recorded end is when its dependants may start.
"""

from __future__ import annotations

import gc
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from moejax.schedule.timeline import RESOURCES, Entry, stage_seconds

Handler = Callable[[Entry], None]


class StopTimeline(Exception):
    """Raised by a handler to end the run early (e.g. every row hit its EOS token)."""


@dataclass(frozen=True)
class Trace:
    """Measured start/end of every entry, seconds from the start of the run."""

    start_s: np.ndarray
    end_s: np.ndarray

    @property
    def makespan_s(self) -> float:
        return float(self.end_s.max(initial=0.0))

    def busy_s(self, entries: list[Entry]) -> dict:
        busy = {r: 0.0 for r in RESOURCES}
        for e in entries:
            busy[e.resource] += float(self.end_s[e.id] - self.start_s[e.id])
        return busy

    def stage_s(self, entries: list[Entry], stage: str) -> float:
        return stage_seconds(entries, self.end_s, stage)


def _serial(entries, handlers, start, end, t0):
    for e in entries:
        start[e.id] = time.perf_counter() - t0
        try:
            handlers[e.op](e)
        except StopTimeline:
            end[e.id] = time.perf_counter() - t0
            return
        end[e.id] = time.perf_counter() - t0


def _overlapped(entries, handlers, start, end, t0, lane):
    done = [threading.Event() for _ in entries]
    errors: list[BaseException] = []

    def worker(mine: list[Entry]):
        try:
            for e in mine:
                for d in e.deps:
                    while not done[d].wait(0.05):
                        if errors:
                            return
                if errors:
                    return
                start[e.id] = time.perf_counter() - t0
                handlers[e.op](e)
                end[e.id] = time.perf_counter() - t0
                done[e.id].set()
        except BaseException as err:  # surfaced in the calling thread (Stop: quietly)
            errors.append(err)

    lanes: dict[str, list[Entry]] = {}
    for e in entries:
        lanes.setdefault(lane(e.resource), []).append(e)
    threads = [threading.Thread(target=worker, args=(mine,), name=f"moejax-{r}",
                                daemon=True) for r, mine in lanes.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    real = [e for e in errors if not isinstance(e, StopTimeline)]
    if real:
        raise real[0]


def execute(entries: list[Entry], handlers: Mapping[str, Handler], overlap: bool = True,
            lane: Callable[[str], str] = lambda r: r) -> Trace:
    """Run every entry's handler → Trace; `lane` maps a resource to its thread. The cyclic
    GC is paused meanwhile: a full collection stalls every thread, which no entry models."""
    missing = sorted({e.op for e in entries} - set(handlers))
    if missing:
        raise ValueError(f"no handler for ops {missing}")
    start, end = np.zeros(len(entries)), np.zeros(len(entries))
    collecting = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        if overlap:
            _overlapped(entries, handlers, start, end, t0, lane)
        else:
            _serial(entries, handlers, start, end, t0)
    finally:
        if collecting:
            gc.enable()
    return Trace(start, end)
