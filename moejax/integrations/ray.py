"""A prompt dataset spread over a Ray cluster, one moejax engine per worker (needs the
`ray` extra: `pip install 'moejax[ray]'`).

    from moejax.integrations.ray import connect, run_requests
    connect("HOST:6379")                       # or "local": a cluster on this machine
    for rec in run_requests(ckpt, requests, num_workers=2): ...

`EngineWorker` is an actor that loads the checkpoint (and tokenizer) once and turns
batches of requests into the generation job's output records (experiments/generate.py:
id, completion, token_ids, finish_reason, prompt_tokens, completion_tokens).
`run_requests` hands batches to idle workers and yields each finished batch's records;
a worker that dies mid-batch gets its batch re-queued to the others (up to
`max_retries` times), and a batch's records are yielded only when the whole batch is
done, each id once — so a rerun or a retry never duplicates a finished id.
`GenerateBatch` is the same engine as a callable class for
`ray.data.Dataset.map_batches(GenerateBatch, fn_constructor_args=(ckpt,), ...)`.
"""

from __future__ import annotations

import os
import socket
from collections import deque
from typing import Iterable, Iterator

LOCAL = "local"


def _ray():
    try:
        import ray
    except ImportError:
        raise ValueError("moejax.integrations.ray needs Ray: pip install 'moejax[ray]'"
                         ) from None
    return ray


def check_address(address: str, timeout_s: float = 3.0) -> None:
    """ValueError (one line) unless `address` ("HOST:PORT", "ray://HOST:PORT", "auto" or
    "local") names a cluster this machine can reach: a TCP connect to HOST:PORT within
    `timeout_s`, so a wrong address fails at once, before any weights load."""
    if address in (LOCAL, "auto"):
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"ray address {address!r} is not HOST:PORT, ray://HOST:PORT, "
                         "'auto' or 'local'")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ValueError(f"ray address {address!r} is unreachable: {e}") from None


def connect(address: str, num_cpus: int | None = None):
    """ray.init of `address` (checked first; "local": a new cluster on this machine with
    `num_cpus`); a no-op when Ray is already initialised."""
    ray = _ray()
    check_address(address)
    if ray.is_initialized():
        return ray
    if address == LOCAL:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    return ray


class _Generator:
    """The checkpoint's engine and tokenizer, loaded once; `records(batch)` → records."""

    def __init__(self, checkpoint: str, engine_kwargs: dict | None = None,
                 dtype: str | None = None, fail_after_batches: int | None = None):
        import moejax

        kw = dict(engine_kwargs or {})
        offload = kw.get("device_memory_bytes") is not None
        model = moejax.load_pretrained(checkpoint, dtype, **(
            {"experts": "host"} if offload else {}))
        self.engine = moejax.Engine(model, **kw)
        self.tok = moejax.load_tokenizer(checkpoint)
        self.eos = sorted(set(self.tok.eos_token_ids))
        self.batches_started = 0
        # fault injection for tests: the process dies at the start of this batch
        self.fail_after_batches = fail_after_batches

    def records(self, batch: list[dict], sampling=None) -> list[dict]:
        """batch: [{"id", "index", "ids", "max_new_tokens"}] of one max_new_tokens."""
        if self.fail_after_batches is not None \
                and self.batches_started >= self.fail_after_batches:
            os._exit(1)
        self.batches_started += 1
        outs = self.engine.generate([r["ids"] for r in batch],
                                    [r["max_new_tokens"] for r in batch],
                                    eos_token_id=self.eos or None, sampling=sampling,
                                    request_indices=[r["index"] for r in batch])
        eos = set(self.eos)
        return [output_record(r, toks, self.tok, eos) for r, toks in zip(batch, outs)]


def output_record(r: dict, toks: list[int], tok, eos: set) -> dict:
    """The generation job's output line of request `r` (experiments/generate.py)."""
    ended = bool(toks) and toks[-1] in eos
    return {"id": r["id"], "completion": tok.decode(toks[:-1] if ended else toks),
            "token_ids": toks, "finish_reason": "eos" if ended else "length",
            "prompt_tokens": len(r["ids"]), "completion_tokens": len(toks)}


def engine_worker(num_cpus: float = 1, num_gpus: float = 0):
    """The Ray actor class of `_Generator` (one engine per worker)."""
    ray = _ray()
    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0)(_Generator)


def batches(requests: Iterable[dict], size: int) -> list[list[dict]]:
    """Requests grouped by max_new_tokens, in input order within a group, `size` at a
    time (as the generation job batches them)."""
    groups: dict[int, list] = {}
    for r in requests:
        groups.setdefault(r["max_new_tokens"], []).append(r)
    return [g[i:i + size] for g in groups.values() for i in range(0, len(g), size)]


def run_requests(checkpoint: str, requests: Iterable[dict], num_workers: int = 1, *,
                 batch_size: int = 64, engine_kwargs: dict | None = None,
                 dtype: str | None = None, sampling=None, max_retries: int = 2,
                 worker_options: dict | None = None, fault: dict | None = None,
                 events: list | None = None) -> Iterator[list[dict]]:
    """Yield each finished batch's records (Ray must be initialised: `connect`).
    `num_workers` EngineWorker actors each load the checkpoint once; batches go to idle
    workers; a worker's death re-queues its batch (at most `max_retries` times per
    batch; RuntimeError past that or when no worker is left). `fault`: {worker index:
    batches before its process exits} (tests); `events` gets ("retry", first id) per
    re-queued batch."""
    ray = _ray()
    if num_workers < 1:
        raise ValueError(f"num_workers={num_workers!r} must be >= 1")
    cls = engine_worker(**(worker_options or {}))
    workers = [cls.remote(checkpoint, engine_kwargs, dtype, (fault or {}).get(i))
               for i in range(num_workers)]
    queue = deque((b, 0) for b in batches(requests, batch_size))
    running: dict = {}  # ObjectRef -> (worker, batch, tries)
    idle = list(workers)
    while queue or running:
        while queue and idle:
            w = idle.pop()
            b, tries = queue.popleft()
            running[w.records.remote(b, sampling)] = (w, b, tries)
        if not running:
            raise RuntimeError("every Ray worker died; batches left: "
                               f"{len(queue)}")
        [ref], _ = ray.wait(list(running), num_returns=1)
        w, b, tries = running.pop(ref)
        try:
            recs = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError):
            if tries >= max_retries:
                raise RuntimeError(f"a batch of {len(b)} requests (first id "
                                   f"{b[0]['id']!r}) failed {tries + 1} times") from None
            queue.append((b, tries + 1))  # its worker is gone: not back to idle
            if events is not None:
                events.append(("retry", b[0]["id"]))
            continue
        idle.append(w)
        yield recs


class GenerateBatch:
    """For `ray.data.Dataset.map_batches(GenerateBatch, fn_constructor_args=(checkpoint,
    engine_kwargs), batch_size=..., concurrency=num_workers)`: a batch is a dict of
    columns "id", "index", "ids", "max_new_tokens" (one max_new_tokens per batch is
    fastest); returns the output records' columns."""

    def __init__(self, checkpoint: str, engine_kwargs: dict | None = None,
                 dtype: str | None = None):
        self.gen = _Generator(checkpoint, engine_kwargs, dtype)

    def __call__(self, batch: dict) -> dict:
        n = len(batch["id"])
        rows = [{k: _plain(batch[k][i]) for k in ("id", "index", "ids", "max_new_tokens")}
                for i in range(n)]
        recs = [rec for group in batches(rows, n) for rec in self.gen.records(group)]
        by_id = {rec["id"]: rec for rec in recs}
        recs = [by_id[r["id"]] for r in rows]  # the batch's order
        return {k: [rec[k] for rec in recs] for k in recs[0]} if recs else {}


def _plain(v):
    """A column value as plain Python (numpy scalars and arrays from ray.data)."""
    return v.tolist() if hasattr(v, "tolist") else v
