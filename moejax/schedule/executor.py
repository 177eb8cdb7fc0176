"""Run a timeline for real (docs/design.md §3): one thread per resource, waits only on edges.

`execute(entries, handlers, overlap)` calls `handlers[entry.op](entry)` for every entry
and records its start and end. With `overlap`, each resource (gpu, cpu, h2d, d2h) has
one thread that walks its entries in list order and blocks only until the entries an
entry depends on have finished — exactly the list schedule the simulator prices. Without
it, the serial reference walks the whole list in order on the calling thread. Handlers
must finish their work before returning (block on device results), so that an entry's
end is the moment its outputs exist and its dependants may start.
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
    """Run every entry's handler; `lane` maps a resource to the thread that runs it.
    Python's cyclic garbage collector is paused meanwhile: a full collection stops
    every thread for ~0.1 s (measured at the start of a run on the CPU testbed), a
    stall the timeline has no entry for; reference counting still frees what the run
    drops, and cycles wait for the next collection after it."""
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


# ---------------------------------------------------------------- the data plane
class DeviceWeights:
    """All parameters already on the device (the all-on-device reference): the weight
    interface of `HostWeightStore` with nothing to stream."""

    def __init__(self, cfg, params: dict):
        self.cfg, self.params = cfg, params

    def device_params(self, layer: int) -> dict:
        return self.params[f"layers_{layer}"]

    def global_params(self) -> dict:
        return {k: self.params[k] for k in ("embed", "final_norm", "lm_head")
                if k in self.params}

    def num_pages(self, layer: int) -> int:
        return 0

    def wait(self, layer: int, step: int = 0) -> dict:
        return self.params[f"layers_{layer}"]["experts"]

    def release(self, layer: int, step: int = 0) -> None:
        pass

    def release_all(self) -> None:
        pass


class BatchRun:
    """One padded batch through a timeline: the handler of every op (docs/design.md §2).

    weights   HostWeightStore or DeviceWeights (device_params, wait, prefetch_page, …)
    kv        HostKVCache (attention on the host) or None (device KV cache)
    rows      micro-batch k owns rows [k·ubs, (k+1)·ubs) of the batch
    Values flow between entries through dicts keyed by (step, layer, micro-batch); a
    consumer pops what no later entry reads, so at most a pass or two stays alive.
    """

    def __init__(self, cfg, weights, kv, policy, tokens: np.ndarray, lengths: np.ndarray,
                 cache_len: int, steps: int, eos_token_id=None, on_step=None,
                 full_logits: bool = False):
        import jax.numpy as jnp

        from moejax.layers.attention import causal_mask

        self.cfg, self.w, self.kv, self.policy = cfg, weights, kv, policy
        ubs, n = policy.micro_batch_size, policy.num_micro_batches
        self.rows = [slice(k * ubs, (k + 1) * ubs) for k in range(n)]
        self.lengths = lengths
        self.tokens = [jnp.asarray(tokens[r]) for r in self.rows]
        t = tokens.shape[1]
        am = np.arange(t)[None, :] < lengths[:, None]
        self.masks = [causal_mask(jnp.asarray(am[r], jnp.int32)) for r in self.rows]
        self.positions = jnp.broadcast_to(jnp.arange(t), (ubs, t))
        self.last = [jnp.asarray(lengths[r] - 1) for r in self.rows]
        g = weights.global_params()
        self.embed_params = {"embed": g["embed"]}
        self.head_params = g
        self.eos = None if eos_token_id is None else np.atleast_1d(eos_token_id).tolist()
        self.on_step, self.full_logits = on_step, full_logits
        self.out = np.zeros((steps + 1, len(lengths)), np.int64)
        self.logits: list = [None] * n
        self.done = np.zeros(len(lengths), bool)
        self.steps_run = 0
        self.x, self.qkv, self.host, self.o, self.nxt = {}, {}, {}, {}, {}
        self.new_kv = {}  # prefill k, v awaiting their copy to the host cache
        self.router_counts: dict[str, list] = {}  # stage -> [E] counts per MoE call
        self.dev_cache = None
        if kv is None:
            shape = (ubs, cache_len, cfg.num_kv_heads, cfg.head_dim)
            z = lambda: jnp.zeros(shape, jnp.dtype(cfg.dtype))
            self.dev_cache = {(i, k): [z(), z()] for i in range(cfg.num_layers)
                              for k in range(n)}

    def handlers(self) -> dict:
        return {op: getattr(self, f"_{op}") for op in
                ("page", "embed", "pre_attn", "attn", "d2h_qkv", "cpu_attn", "h2d_attn",
                 "d2h_kv", "post_attn", "head")}

    def _pos(self, e):
        """Decode: slot of the new token = prompt length + step − 1."""
        import jax.numpy as jnp
        return jnp.asarray(self.lengths[self.rows[e.micro_batch]] + e.step - 1)

    # --------------------------------------------------------------- transfers
    def _page(self, e):
        buf = self.w.prefetch_page(e.layer, e.page, e.step)
        if buf is not None:
            buf.block_until_ready()

    def _d2h_kv(self, e):
        kh, vh = self.kv.to_host(*self.new_kv.pop((e.step, e.layer, e.micro_batch)))
        r = self.rows[e.micro_batch]
        self.kv.write_prefill(e.layer, r, kh, vh, self.lengths[r])

    def _d2h_qkv(self, e):
        key = (e.step, e.layer, e.micro_batch)
        self.host[key] = self.kv.to_host(*self.qkv.pop(key))

    def _h2d_attn(self, e):
        key = (e.step, e.layer, e.micro_batch)
        self.o[key] = self.kv.to_device(self.host.pop(key)).block_until_ready()

    # ------------------------------------------------------------------ compute
    def _embed(self, e):
        from moejax import ops

        k = e.micro_batch
        tok = self.tokens[k] if e.stage == "prefill" else self.nxt[k][:, None]
        self.x[k] = ops.embed(self.cfg, self.embed_params, tok).block_until_ready()

    def _pre_attn(self, e):
        from moejax import ops

        pos = self.positions if e.stage == "prefill" else self._pos(e)[:, None]
        moe = self.cfg.is_moe_layer(e.layer)
        qkv = ops.pre_attention(self.cfg, moe, self.w.device_params(e.layer),
                                self.x[e.micro_batch], pos)
        key = (e.step, e.layer, e.micro_batch)
        self.qkv[key] = jax_ready(qkv)
        if e.stage == "prefill" and self.kv is not None:
            self.new_kv[key] = qkv[1:]

    def _attn(self, e):
        from moejax import ops

        key, k = (e.step, e.layer, e.micro_batch), e.micro_batch
        q, kk, v = self.qkv.pop(key)
        cache = self.dev_cache[(e.layer, k)] if self.dev_cache is not None else None
        if e.stage == "prefill":
            if cache is not None:
                cache[0], cache[1] = ops.write_prefill(cache[0], cache[1], kk, v)
            o = ops.attend(q, kk, v, self.masks[k])
        else:
            o, cache[0], cache[1] = ops.decode_attention(cache[0], cache[1], q, kk, v,
                                                         self._pos(e))
        self.o[key] = o.block_until_ready()

    def _cpu_attn(self, e):
        key = (e.step, e.layer, e.micro_batch)
        q, k, v = self.host.pop(key)
        r = self.rows[e.micro_batch]
        self.host[key] = self.kv.decode_host(e.layer, r, q, k, v,
                                             self.lengths[r] + e.step - 1)

    def _post_attn(self, e):
        import jax.numpy as jnp

        from moejax import ops

        cfg, i, k = self.cfg, e.layer, e.micro_batch
        moe = cfg.is_moe_layer(i)
        lp = self.w.device_params(i)
        if moe:
            lp = {**lp, "experts": self.w.wait(i, e.step)}
        o = self.o.pop((e.step, i, k))
        h, normed, w, ids, counts = ops.post_attention(cfg, moe, lp, self.x[k], o)
        if moe:  # read after the run: no sync here
            self.router_counts.setdefault(e.stage, []).append(counts)
        cap = None  # the sorted path needs no capacity, so no host sync either
        if ops.needs_capacity(cfg, moe, normed.shape[0]):
            cap = ops.capacity_bucket(int(jnp.max(counts)), normed.shape[0])
        self.x[k] = ops.ffn(cfg, moe, lp, h, normed, w, ids, cap).block_until_ready()
        if moe and k == self.policy.num_micro_batches - 1:
            self.w.release(i, e.step)

    def _head(self, e):
        import jax.numpy as jnp

        from moejax import ops

        k, r = e.micro_batch, self.rows[e.micro_batch]
        x = self.x.pop(k)
        if e.stage == "prefill":
            if self.full_logits:
                self.logits[k] = np.asarray(ops.head(self.cfg, self.head_params, x))
            x = x[jnp.arange(x.shape[0]), self.last[k]][:, None]
        self.nxt[k] = nxt = ops.next_tokens(self.cfg, self.head_params, x)
        self.out[e.step, r] = np.asarray(nxt)
        if k == self.policy.num_micro_batches - 1:
            self._step_done(e.step)

    def _step_done(self, step: int):
        self.steps_run = step + 1
        if self.eos is not None:
            self.done |= np.isin(self.out[step], self.eos)
        if self.on_step is not None:
            self.on_step(step)
        if self.eos is not None and self.done.all():
            raise StopTimeline()

    def expert_imbalance(self, stage: str | None = None) -> float:
        """The `Workload.expert_imbalance` this run's routing shows in `stage` (None:
        both): `layers.capacity.fit_imbalance` of its router calls, the figure under
        which their expected max counts add up to theirs; 1 where there were none."""
        from moejax.layers.capacity import fit_imbalance

        calls = [np.asarray(c) for st, cs in self.router_counts.items()
                 if stage in (None, st) for c in cs]
        return fit_imbalance(calls, self.cfg.top_k)

    def tokens_out(self, n_rows: int) -> list[list[int]]:
        """New tokens of the first n_rows rows, cut after their first EOS."""
        out = []
        for r in range(n_rows):
            row = [int(t) for t in self.out[:self.steps_run, r]]
            ends = [j for j, t in enumerate(row) if t in (self.eos or ())]
            if ends:
                row = row[:ends[0] + 1]
            out.append(row)
        return out


def jax_ready(tree):
    import jax
    return jax.block_until_ready(tree)
