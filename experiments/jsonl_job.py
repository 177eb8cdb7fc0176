"""The files of a generation job: requests read and checked up front, an output that is
appended to, line by line, and resumed after a crash (experiments/generate.py).

Output lines are whole JSON records, each written with one write() and flushed; a
rerun keeps every complete line, discards only a torn last line (the one rewrite:
truncating it away) and skips the ids already written.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass


class JobError(ValueError):
    """A problem with the job's files, said in one line."""


@dataclass
class Request:
    """One input line: its id, 0-based line index (the sampling stream's request
    index), token ids and generation length."""

    id: object
    index: int
    ids: list
    max_new_tokens: int

    @property
    def key(self) -> str:
        return id_key(self.id)


def id_key(v) -> str:
    """Ids compare as JSON: 3 and "3" differ."""
    return json.dumps(v)


def _parse_line(n: int, line: str) -> dict:
    try:
        d = json.loads(line)
    except ValueError as e:
        raise JobError(f"line {n}: malformed JSON ({e})") from None
    if not isinstance(d, dict):
        raise JobError(f"line {n}: expected a JSON object, got {type(d).__name__}")
    return d


def _prompt_ids(n: int, d: dict, tok, chat: bool) -> list:
    """Token ids of one line's "prompt" (a user message with `chat`) or "messages"."""
    has_p, has_m = "prompt" in d, "messages" in d
    if has_p == has_m:
        raise JobError(f"line {n}: needs exactly one of \"prompt\" or \"messages\"")
    if has_p:
        p = d["prompt"]
        if not isinstance(p, str) or not p:
            raise JobError(f"line {n}: \"prompt\" must be a non-empty string")
        if not chat:
            return tok.encode(p)
        msgs = [{"role": "user", "content": p}]
    else:
        msgs = d["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in msgs):
            raise JobError(f"line {n}: \"messages\" must be a non-empty list of "
                           "{\"role\": str, \"content\": str}")
    try:
        return tok.encode_chat(msgs)
    except ValueError as e:
        raise JobError(f"line {n}: {e}") from None


def _request(n: int, d: dict, tok, chat: bool, default_new: int, max_positions: int):
    rid = d.get("id", n)
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise JobError(f"line {n}: \"id\" must be a string or an integer")
    new = d.get("max_new_tokens", default_new)
    if isinstance(new, bool) or not isinstance(new, int) or new < 1:
        raise JobError(f"line {n}: \"max_new_tokens\" must be an integer >= 1")
    ids = _prompt_ids(n, d, tok, chat)
    if not ids:
        raise JobError(f"line {n}: the prompt encodes to no tokens")
    if len(ids) + new > max_positions:
        raise JobError(f"line {n}: {len(ids)} prompt tokens + max_new_tokens {new} exceed "
                       f"the model's {max_positions} positions")
    return Request(rid, n - 1, ids, new)


def read_requests(path: str, tok, chat: bool, default_new: int, max_positions: int,
                  skip_bad=None) -> list[Request]:
    """Every request of a JSONL file, checked before any generation: JobError for the
    first problem (line numbers 1-based; blank lines are skipped). `skip_bad(msg)`,
    when given, is told of each per-request problem instead, and that line dropped;
    malformed JSON and duplicate ids are always errors."""
    out, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            d = _parse_line(n, line)
            try:
                r = _request(n, d, tok, chat, default_new, max_positions)
            except JobError as e:
                if skip_bad is None or "\"id\"" in str(e):
                    raise
                skip_bad(str(e))
                continue
            if r.key in seen:
                raise JobError(f"line {n}: duplicate id {r.key} (first on line {seen[r.key]})")
            seen[r.key] = n
            out.append(r)
    if not out:
        raise JobError(f"{path}: no requests")
    return out


def resume(path: str) -> set[str]:
    """Ids (as `id_key`) already in the output. A torn last line (no newline, or not a
    JSON record with an id) is cut off; a bad line elsewhere is a JobError (the file
    is then left untouched)."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    *complete, tail = data.split(b"\n")  # tail: what follows the last newline
    recs = [_record(line) for line in complete]
    bad = [i for i, r in enumerate(recs) if r is None]
    if bad and (bad[0] < len(complete) - 1 or tail.strip()):
        raise JobError(f"{path}: line {bad[0] + 1} is not a complete record (and not a "
                       "torn last line): not touching it")
    keep = recs[:bad[0]] if bad else recs
    good_end = sum(len(line) + 1 for line in complete[:len(keep)])
    if good_end < len(data):  # a torn last line: cut it off, nothing else
        with open(path, "r+b") as f:
            f.truncate(good_end)
            os.fsync(f.fileno())
    return {id_key(r["id"]) for r in keep}


def _record(raw: bytes):
    try:
        d = json.loads(raw)
    except ValueError:
        return None
    return d if isinstance(d, dict) and "id" in d else None


class Writer:
    """Appends one JSON record per line: one write() and a flush each, fsync at most
    every `sync_s` seconds and on close."""

    def __init__(self, path: str, sync_s: float = 2.0):
        self.f = open(path, "a", encoding="utf-8")
        self.sync_s, self.synced = sync_s, time.monotonic()

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.f.flush()
        if time.monotonic() - self.synced >= self.sync_s:
            self.sync()

    def sync(self) -> None:
        os.fsync(self.f.fileno())
        self.synced = time.monotonic()

    def close(self) -> None:
        if not self.f.closed:
            self.f.flush()
            self.sync()
            self.f.close()
