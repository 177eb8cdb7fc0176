"""Batched generation: a Policy → a CGOPipe timeline → the executor (docs/design.md §3).
`Engine(model)` runs all on the device (the reference); any offload knob, a `policy` or a
HostWeightStore offloads experts (resident columns + streamed pages) and the KV cache (host
+ CPU attention "cpu", or "gpu"); without a policy the model's fastest micro-batching runs."""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import jax.numpy as jnp
import numpy as np

from moejax.host_offload.kv_cache import DEFAULT_BLOCK_TOKENS, HostKVCache, PagedKVCache
from moejax.host_offload.memory import (available_host_bytes, default_device,
                                        peak_device_bytes)
from moejax.host_offload.weight_store import HostWeightStore
from moejax.model_config.hardware import fmt_bytes, local_hardware
from moejax.model_config.workload import Workload, stage_imbalance
from moejax.placement import resolve_placement, validate_request, validate_sampling
from moejax.quant import with_expert_dtype
from moejax.sampling import Sampling
from moejax.runtime import BatchRun, DeviceWeights, SweepRun
from moejax.schedule.continuous import KVPlan, admit, pack_prefill, prefill_tokens
from moejax.schedule.continuous import device_bytes as cont_device_bytes
from moejax.schedule.executor import Trace, execute
from moejax.schedule.policy import DEFAULT_PAGE_BYTES, Policy, padded_len
from moejax.schedule.predict import memory_bytes
from moejax.schedule.search import search_micro_batches
from moejax.schedule.timeline import Entry, StreamPlan, build_sweep, build_timeline

BATCHING = ("static", "continuous")
# default host KV capacity: this share of the host memory available when it is built
HOST_KV_SHARE = 0.5


@dataclass(frozen=True)
class SweepRecord:
    """One continuous-batching sweep: its micro-batches' real rows and timeline size."""

    decode_rows: tuple[int, ...]
    prefill_rows: tuple[int, ...]
    entries: int
    seconds: float
    device_rows: tuple[int, ...] = ()  # rows each micro-batch ran on the device (padded)


@dataclass
class RunRecord:
    """What the last batch did: its policy, timeline and the measured trace."""

    policy: Policy
    entries: list[Entry]
    trace: Trace
    rows: int  # real (unpadded) rows
    prompt_len: int  # padded prompt length T
    steps: int  # tokens generated per row (1 by prefill + decode steps run)
    expert_imbalance: float = 1.0  # the prefill's routing (`Workload.expert_imbalance`)
    decode_expert_imbalance: float | None = None  # the decode steps' (None: none ran)
    peak_device_bytes_predicted: float | None = None  # `predict.memory_bytes` (budgeted)
    peak_device_bytes_measured: int | None = None  # allocator high-water mark (None: CPU)

    @property
    def imbalance(self) -> dict:
        """{stage: expert imbalance} the run saw, as `simulate` takes it."""
        return stage_imbalance(self.expert_imbalance, self.decode_expert_imbalance)

    def with_routing(self, wl):
        """`wl` (a Workload) with the expert imbalance this run saw in each stage."""
        return wl.replace(expert_imbalance=self.expert_imbalance,
                          decode_expert_imbalance=self.decode_expert_imbalance)

    @property
    def prefill_s(self) -> float:
        return self.trace.stage_s(self.entries, "prefill")

    @property
    def decode_s(self) -> float:
        return self.trace.stage_s(self.entries, "decode")


class Engine:
    """`Engine(model, ...).generate(prompts, max_new_tokens)` → new tokens per prompt.

    model: MoEModel or a filled HostWeightStore; device_memory_bytes: store budget (largest wg
    that fits, else ValueError by how much); gpu_weight_fraction wg ∈ [0, 1]; attention_device
    "cpu" (host KV, offload default) | "gpu"; page_bytes (default 64 MiB); policy: a
    schedule.Policy (excludes the knobs above); micro_batch_size: fixed, not searched;
    kv_dtype (default the model's; "int8"); host_memory "auto" | "pinned_host" | "numpy";
    offload: None = iff a knob is given, True/False force it; host_kv_bytes: capacity of
    the paged host KV cache of continuous batching (default HOST_KV_SHARE of the host
    memory available when `stream` first needs it); devices: k jax devices (e.g.
    `jax.devices()[:k]`) to run the offloaded schedule tensor-parallel on their mesh
    (`host_offload.sharding`; implies offload, the budget is per device); expert_dtype
    "int8" | "int4" (expert_group_size G, default 64) quantizes a float model's experts on
    load (`moejax.quant`)."""

    def __init__(self, model, device_memory_bytes: int | None = None,
                 gpu_weight_fraction: float | None = None,
                 attention_device: str | None = None, page_bytes: int | None = None, *,
                 policy: Policy | None = None, micro_batch_size: int | None = None,
                 kv_dtype: str | None = None, host_memory: str = "auto",
                 offload: bool | None = None, host_kv_bytes: int | None = None,
                 devices=None, expert_dtype: str | None = None,
                 expert_group_size: int | None = None):
        model = with_expert_dtype(model, expert_dtype, expert_group_size)
        if host_kv_bytes is not None and (isinstance(host_kv_bytes, bool) or not isinstance(
                host_kv_bytes, (int, np.integer)) or host_kv_bytes < 1):
            raise ValueError(f"host_kv_bytes={host_kv_bytes!r} must be a positive integer "
                             "or None")
        p = resolve_placement(model, device_memory_bytes, gpu_weight_fraction,
                              attention_device, page_bytes, policy=policy,
                              micro_batch_size=micro_batch_size, kv_dtype=kv_dtype,
                              host_memory=host_memory, offload=offload, devices=devices)
        self.offload, self.attention_device, self.kv_dtype = (p.offload, p.attention_device,
                                                              p.kv_dtype)
        self.policy, self.micro_batch_size = p.policy, p.micro_batch_size
        is_store = isinstance(model, HostWeightStore)
        self.cfg = model.cfg if is_store else model.config
        # offloaded, the store holds every weight: no reference to `model` is kept, so
        # dropping the caller's frees the tree the store was made from (a copy when
        # `host_memory` asks for another memory kind than its leaves')
        self.model = None if self.offload else model
        self.store: HostWeightStore | None = model if is_store else (
            HostWeightStore.from_params(self.cfg, model.params, **p.store_knobs)
            if self.offload else None)
        self.weights = self.store if self.store is not None else DeviceWeights(
            self.cfg, model.params)
        self.device = self.store.device if self.store is not None else default_device()
        self.last_run: RunRecord | None = None
        self.host_kv_bytes = None if host_kv_bytes is None else int(host_kv_bytes)
        self.kv_block_tokens = DEFAULT_BLOCK_TOKENS
        self.kv_pool: PagedKVCache | None = None  # continuous batching's, built on first use
        self.last_sweeps: list[SweepRecord] = []

    # ------------------------------------------------------------------ policy
    def _base_policy(self, ubs: int, n_ub: int) -> Policy:
        wg = self.store.gpu_weight_fraction if self.store is not None else 1.0
        kv = "cpu" if self.attention_device == "cpu" else "gpu"
        return Policy.from_micro_batches(
            ubs, n_ub, gpu_weight_fraction=float(wg), attention_device=self.attention_device,
            kv_cache_device=kv, page_bytes=self.store.page_bytes_setting if self.store else
            DEFAULT_PAGE_BYTES, overlap=True)

    def policy_for(self, batch: int, prompt_len: int, gen_len: int) -> Policy:
        """Policy of a `batch`-row batch: the given one (ubs capped at the batch), else the
        placement's knobs with `schedule.search.search_micro_batches` on the local hardware."""
        if self.policy is not None:
            ubs = min(self.policy.micro_batch_size, batch)
            size, mc = ubs * math.ceil(batch / ubs), self.policy.max_concurrency
            return self.policy.replace(micro_batch_size=ubs, num_micro_batches=math.ceil(
                batch / ubs), batch_size=size, max_concurrency=None if mc is None else
                min(mc, size))
        if not self.offload:
            return self._base_policy(batch, 1)
        if self.micro_batch_size is not None:
            ubs = min(self.micro_batch_size, batch)
            return self._base_policy(ubs, math.ceil(batch / ubs))
        # calibrated with this model's expert shape: the GEMM line and page curve are
        return search_micro_batches(self.cfg, local_hardware(model=self.cfg),
                                    self._workload(prompt_len, gen_len), batch,
                                    self._base_policy(batch, 1), self.store.budget)

    # ------------------------------------------------------------------ running
    def _workload(self, prompt_len: int, gen_len: int):
        """The batch's `Workload`: lengths and KV element size (1 byte for int8)."""
        return Workload(int(prompt_len), int(gen_len),
                        kv_bytes_per_elem=1 if self.kv_dtype == "int8" else None)

    def _device_need(self, policy: Policy, prompt_len: int, gen_len: int):
        """(`predict.memory_bytes` peak at `_run`'s lengths, budget), or None unbudgeted."""
        budget = self.store.budget if self.store is not None else None
        if budget is None:
            return None
        dev, _ = memory_bytes(self.cfg, self._workload(prompt_len, gen_len),
                              policy.micro_batch_size, policy.num_micro_batches,
                              self.store.gpu_weight_fraction, policy.attention_device,
                              policy.kv_cache_device, devices=self.store.shards)
        return float(dev), budget

    def check_memory(self, num_prompts: int, prompt_len: int, max_new_tokens: int) -> None:
        """`generate`'s device-memory check, without running: ValueError naming the shortfall."""
        size = self.policy.batch_size if self.policy is not None else num_prompts
        self._batch_policy(min(num_prompts, size), prompt_len, max_new_tokens)

    def _batch_policy(self, rows: int, prompt_len: int, gen_len: int) -> tuple[int, Policy]:
        """(padded prompt length, policy) of one batch, checked to fit its budget."""
        t = padded_len(prompt_len)
        policy = self.policy_for(rows, t, gen_len)
        self._check_fits(policy, t, gen_len)
        return t, policy

    def _check_fits(self, policy: Policy, prompt_len: int, gen_len: int) -> None:
        """ValueError before running when `_device_need` exceeds the store's budget."""
        need = self._device_need(policy, prompt_len, gen_len)
        if need is None:
            return
        dev, budget = need
        if dev > budget:
            lower_wg = self.store.can_lower_weight_fraction
            raise ValueError(
                f"a batch of {policy.batch_size} ({policy.micro_batch_size}×"
                f"{policy.num_micro_batches}), prompt {prompt_len}, {gen_len} new tokens, "
                f"attention on the {policy.attention_device} needs ~{fmt_bytes(dev)} of "
                f"device memory; device_memory_bytes={budget} ({fmt_bytes(budget)}) is too "
                "small: use smaller micro-batches, "
                + ("a lower gpu_weight_fraction " if lower_wg else "")
                + "or a larger budget")

    def _stream_plan(self) -> StreamPlan:
        w, n = self.weights, self.cfg.num_layers
        pages = tuple(tuple(w.page_bytes(i, p) for p in range(w.num_pages(i)))
                      for i in range(n))
        return StreamPlan(pages)

    def _run(self, prompts, max_new_tokens: int, eos_token_id=None, progress=None,
             full_logits: bool = False, sampling=None, request_index=None) -> BatchRun:
        """One batch padded to the policy's rows, timeline built and executed (`request_index`)."""
        cfg, b = self.cfg, len(prompts)
        lens = np.array([len(p) for p in prompts], np.int64)
        t, policy = self._batch_policy(b, int(lens.max()), max_new_tokens)
        rows = policy.batch_size
        tokens = np.zeros((rows, t), np.int32)
        for r in range(rows):  # padding rows repeat prompt 0; their output is dropped
            p = prompts[r] if r < b else prompts[0]
            tokens[r, :len(p)] = p
        lens = np.concatenate([lens, np.full(rows - b, lens[0])])
        idx = np.arange(b) if request_index is None else np.asarray(request_index)
        idx = np.concatenate([idx, np.full(rows - b, idx[0])])  # padding: any stream
        steps = max_new_tokens - 1
        entries = build_timeline(cfg, policy, t, steps, self._stream_plan())
        cache_len = int(lens.max()) + max_new_tokens
        kv, reservation = None, contextlib.nullcontext()
        if policy.attention_device == "cpu":
            kv = HostKVCache(cfg, rows, cache_len, self.kv_dtype)
        else:
            # a multiple of 16 where that is no longer than what the budget check
            # priced (padded prompt + new tokens), so shapes repeat across calls
            cache_len = min(padded_len(cache_len), t + max_new_tokens)
            if self.store is not None:
                reservation = self.store.kv_reservation(
                    cfg.kv_bytes_per_token() * rows * cache_len)
        on_step = None if progress is None else (lambda s: progress(s + 1))
        with reservation:
            run = BatchRun(cfg, self.weights, kv, policy, tokens, lens, cache_len, steps,
                           eos_token_id, on_step, full_logits, sampling, idx)
            try:
                trace = execute(entries, run.handlers(), overlap=policy.overlap)
            finally:  # an early stop (EOS) or an error leaves passes holding slots
                self.weights.release_all()
        decoded = "decode" in run.router_counts
        need = self._device_need(policy, t, max_new_tokens)
        self.last_run = RunRecord(policy, entries, trace, b, t, run.steps_run,
                                  run.expert_imbalance("prefill"),
                                  run.expert_imbalance("decode") if decoded else None,
                                  need[0] if need else None, peak_device_bytes(self.device))
        self._check_peak(self.last_run)
        return run

    def _check_peak(self, rec: RunRecord) -> None:
        """Say so when the allocator's measured peak passed the device budget."""
        budget = self.store.budget if self.store is not None else None
        peak = rec.peak_device_bytes_measured
        if budget is not None and peak is not None and peak > budget:
            logging.warning("measured peak device memory %s exceeds the budget %s (predicted "
                            "%s)", fmt_bytes(peak), fmt_bytes(budget),
                            fmt_bytes(rec.peak_device_bytes_predicted or 0))

    def prompt_logits(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """float32 logits [B, max prompt length, vocab] of right-padded prompts, this placement."""
        validate_request(self.cfg, prompts, 1, None, logits_only=True)
        run = self._run(prompts, 1, full_logits=True)
        return np.concatenate(run.logits)[:len(prompts), :max(map(len, prompts))]

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens,
                 eos_token_id: int | Sequence[int] | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 sampling: Sampling | None = None,
                 request_indices: Sequence[int] | None = None, *,
                 batching: str = "continuous") -> list[list[int]]:
        """Greedy (or `sampling`) decoding of ragged prompts: rows of `max_new_tokens` (an int,
        or one per prompt), or up to and including their first `eos_token_id` (one id or a
        list). Prompt i samples from the stream of `request_indices[i]` (default i): same
        index and seed, same tokens, whatever the batching.
        batching "continuous" (the default): `stream`'s rows in prompt order (MoE-Lens's
        scheduler where the engine is offloaded with attention on the CPU, else static);
        `progress(tokens_done, Σ max_new_tokens)` after every sweep, a finished row counting
        all its max_new_tokens. "static" (the reference): batches of the policy's batch_size
        (at most what the host KV budget holds at full length) one after the other, each to
        its longest row; `progress(steps_done, steps_total)` after every step, steps_total =
        Σ over batches of their max_new_tokens, ending at (steps_total, steps_total)."""
        if batching not in BATCHING:
            raise ValueError(f"batching={batching!r} not in {BATCHING}")
        if batching == "continuous" and self.continuous:
            if progress is not None and not callable(progress):
                raise ValueError(f"progress must be callable, got {type(progress).__name__}")
            out: list = [None] * len(prompts) if isinstance(prompts, (list, tuple)) else []
            for i, toks, _ in self.stream(prompts, max_new_tokens, eos_token_id,
                                          sampling=sampling, request_indices=request_indices,
                                          _progress=progress):
                out[i] = toks
            return out
        max_new = self._max_new_list(prompts, max_new_tokens)
        validate_request(self.cfg, prompts, max(max_new), eos_token_id)
        indices = validate_sampling(sampling, request_indices, len(prompts))
        if progress is not None and not callable(progress):
            raise ValueError(f"progress must be callable, got {type(progress).__name__}")
        return [t for _, t, _ in self._static_rows(prompts, max_new, eos_token_id, sampling,
                                                   indices, progress)]

    @staticmethod
    def _max_new_list(prompts, max_new_tokens) -> list[int]:
        """max_new_tokens (an int, or a list of one int per prompt) as a list per prompt."""
        n = len(prompts) if isinstance(prompts, (list, tuple)) else None
        if isinstance(max_new_tokens, (list, tuple, np.ndarray)):
            vals = list(max_new_tokens)
            if n is not None and len(vals) != n:
                raise ValueError(f"max_new_tokens has {len(vals)} values for {n} prompts")
            for v in vals:
                if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                    raise ValueError(f"max_new_tokens values must be integers >= 1, got "
                                     f"{v!r}")
            if not vals:
                raise ValueError("max_new_tokens is an empty list")
            return [int(v) for v in vals]
        if isinstance(max_new_tokens, bool) or not isinstance(
                max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        return [int(max_new_tokens)] * (n or 1)

    def _static_rows(self, prompts, max_new: list[int], eos_token_id, sampling, indices,
                     progress=None) -> Iterator[tuple[int, list[int], str]]:
        """(index, tokens, finish reason) of every row, batch after batch (each run to its
        longest max_new_tokens, rows cut to theirs)."""
        size = self.policy.batch_size if self.policy is not None else len(prompts)
        size = min(size, self._static_kv_rows(prompts, max_new))
        starts = range(0, len(prompts), size)
        gens = [max(max_new[i:i + size]) for i in starts]
        total, done = sum(gens), 0
        eos = set(self._eos_list(eos_token_id))
        for i, gen in zip(starts, gens):
            chunk = list(prompts[i:i + size])
            on_step = None if progress is None else (
                lambda s, done=done: progress(done + s, total))
            run = self._run(chunk, gen, eos_token_id, on_step,
                            sampling=sampling, request_index=indices[i:i + size])
            if progress is not None and self.last_run.steps < gen:
                progress(done + gen, total)  # stopped early: batch done
            done += gen
            for r, row in enumerate(run.tokens_out(len(chunk))):
                row = row[:max_new[i + r]]
                yield i + r, row, "eos" if row and row[-1] in eos else "length"

    @staticmethod
    def _eos_list(eos_token_id) -> list[int]:
        return [] if eos_token_id is None else [int(t) for t in np.atleast_1d(eos_token_id)]

    # ------------------------------------------------------------ continuous batching
    @property
    def continuous(self) -> bool:
        """Whether `stream` runs continuous batching here (offloaded, attention on the CPU)."""
        return bool(self.offload) and self.attention_device == "cpu"

    def stream(self, prompts: Sequence[Sequence[int]], max_new_tokens,
               eos_token_id: int | Sequence[int] | None = None, *,
               sampling: Sampling | None = None,
               request_indices: Sequence[int] | None = None,
               _progress=None) -> Iterator[tuple[int, list[int], str]]:
        """Yield (prompt index, new tokens, finish reason "eos" | "length") as each sequence
        finishes; `max_new_tokens` an int or one per prompt. Offloaded with attention on the
        CPU: continuous batching (docs/design.md §7) — a paged host KV cache of
        `host_kv_bytes`; FIFO admission while its KV plan fits (`continuous.KVPlan`: prompt
        + max_new_tokens, or with policy.kv_reservation="lookahead" the KV as it grows, at
        every future sweep) and fewer than the policy's batch_size run; each sweep runs every running sequence's
        decode token (micro-batches of the policy's micro_batch_size) and the prefill of
        those admitted since the last one (`timeline.build_sweep`); a finished sequence
        frees its blocks at once. Elsewhere: static batches, rows yielded per batch.
        Tokens equal each prompt run alone (greedy, or `sampling`'s stream of request
        index, step = tokens so far). Inputs are checked before the first yield."""
        max_new = self._max_new_list(prompts, max_new_tokens)
        validate_request(self.cfg, prompts, max(max_new), eos_token_id)
        indices = validate_sampling(sampling, request_indices, len(prompts))
        if not self.continuous:
            return self._static_rows(prompts, max_new, eos_token_id, sampling, indices)
        pool = self._kv_pool_for(prompts, max_new)
        policy = self._continuous_policy(prompts, max_new)
        return self._continuous_rows(pool, policy, prompts, max_new, eos_token_id, sampling,
                                     indices, _progress)

    def _kv_bytes_per_token(self) -> int:
        cfg, int8 = self.cfg, self.kv_dtype == "int8"
        item = 1 if int8 else np.dtype(jnp.dtype(self.kv_dtype or cfg.dtype)).itemsize
        return 2 * cfg.num_layers * cfg.num_kv_heads * (cfg.head_dim * item + 4 * int8)

    def host_kv_budget(self) -> int:
        """Bytes the host KV cache may take: `host_kv_bytes`, else HOST_KV_SHARE of the host
        memory available now (what the weights left)."""
        if self.host_kv_bytes is not None:
            return int(self.host_kv_bytes)
        free = available_host_bytes()
        return int(HOST_KV_SHARE * free) if free is not None else 2 ** 30

    def _static_kv_rows(self, prompts, max_new) -> int:
        """Rows of a static batch whose host KV fits the budget at full length, padded
        longest prompt + longest max_new_tokens (all rows, where the KV is on the device);
        ValueError naming both sizes if not even one fits."""
        if not self.continuous:
            return len(prompts)
        kv_bytes = self.host_kv_budget()
        row = (padded_len(max(map(len, prompts))) + max(max_new)) * self._kv_bytes_per_token()
        if row > kv_bytes:
            raise ValueError(f"host_kv_bytes={kv_bytes} ({fmt_bytes(kv_bytes)}) is too small "
                             f"for one static row of {row} bytes ({fmt_bytes(row)}): the "
                             f"longest prompt padded + {max(max_new)} new tokens")
        return kv_bytes // row

    def _kv_pool_for(self, prompts, max_new) -> PagedKVCache:
        """The paged host KV cache (built on first use), checked to hold the longest request."""
        per_tok, bt = self._kv_bytes_per_token(), self.kv_block_tokens
        longest = max(range(len(prompts)), key=lambda i: len(prompts[i]) + max_new[i])
        need_tok = -(-(len(prompts[longest]) + max_new[longest]) // bt) * bt
        if self.kv_pool is None:
            kv_bytes = self.host_kv_budget()
            cap = kv_bytes // per_tok // bt * bt
        else:
            kv_bytes, cap = self.kv_pool.capacity_tokens * per_tok, self.kv_pool.capacity_tokens
        if need_tok > cap:
            raise ValueError(
                f"host_kv_bytes={kv_bytes} ({fmt_bytes(kv_bytes)}, {cap} KV tokens) is too "
                f"small for the longest request, prompt {len(prompts[longest])} + "
                f"{max_new[longest]} new tokens = {need_tok} tokens in blocks of {bt}, "
                f"{need_tok * per_tok} bytes ({fmt_bytes(need_tok * per_tok)})")
        if self.kv_pool is None:
            self.kv_pool = PagedKVCache(self.cfg, cap, bt, self.kv_dtype)
        return self.kv_pool

    def _continuous_policy(self, prompts, max_new) -> Policy:
        """The policy whose batch_size caps the running sequences, checked to fit."""
        t = padded_len(max(map(len, prompts)))
        n = len(prompts) if self.policy is None else min(len(prompts),
                                                         self.policy.batch_size)
        policy = self.policy_for(n, t, max(max_new))
        if self.store is not None and self.store.shards > 1:
            self._check_fits(policy, t, max(max_new))  # the static bound, per device
            return policy
        if policy.prefill_tokens_per_sweep is None:  # all of them at once, if it fits;
            try:                                     # else a micro-batch of them a sweep
                self._check_fits_continuous(policy, prompts, max_new)
                return policy
            except ValueError:
                policy = policy.replace(prefill_tokens_per_sweep=policy.micro_batch_size * t)
        self._check_fits_continuous(policy, prompts, max_new)
        return policy

    def _check_fits_continuous(self, policy: Policy, prompts, max_new) -> None:
        """ValueError before running when `schedule.continuous.device_bytes` (decode
        micro-batches of ubs rows, prefill ones of `prefill_rows`) exceeds the budget."""
        budget = self.store.budget if self.store is not None else None
        if budget is None:
            return
        wl = Workload.from_lengths(list(map(len, prompts)), max_new, kv_bytes_per_elem=1
                                   if self.kv_dtype == "int8" else None)
        need = float(cont_device_bytes(
            self.cfg, wl, policy.micro_batch_size, policy.batch_size,
            self.store.gpu_weight_fraction, prefill_tokens(
                wl, policy.prefill_tokens_per_sweep, policy.concurrency),
            policy.prefill_micro_batch_tokens))
        if need > budget:
            raise ValueError(
                f"continuous batching of up to {policy.concurrency} sequences (micro-batches "
                f"of {policy.micro_batch_size}, prefill ≤ {policy.prefill_tokens_per_sweep} "
                f"tokens a sweep in micro-batches of ≤ {policy.prefill_micro_batch_tokens}) "
                f"needs ~{fmt_bytes(need)} of device memory; device_memory_bytes={budget} "
                f"({fmt_bytes(budget)}) is too small: use smaller micro-batches, a prefill "
                "budget, a larger budget, or batching='static'")

    def _continuous_rows(self, kv: PagedKVCache, policy: Policy, prompts, max_new,
                         eos_token_id, sampling, indices, progress=None):
        cfg, ubs = self.cfg, policy.micro_batch_size
        eos, plan = set(self._eos_list(eos_token_id)), self._stream_plan()
        reqs = [(len(p), g) for p, g in zip(prompts, max_new)]
        nxt, running = 0, {}  # running: index -> tokens so far, in admission order
        total, done_tokens = sum(max_new), 0
        self.last_sweeps = []
        sweep = 0

        kvp = KVPlan(kv.num_free_blocks, max(max_new), kv.block_tokens,
                      policy.kv_reservation)

        def try_reserve(p, g):  # the sequence nxt + admitted so far
            i = nxt + len(new)
            if not kvp.try_reserve(p, g, seq=i):
                return False
            kv.reserve(i, kvp.tokens(p, g, 0))
            new.append(i)
            return True

        try:
            while nxt < len(prompts) or running:
                new: list[int] = []
                nxt += admit(reqs, nxt, len(running), policy, try_reserve)
                dec = list(running)
                for i in dec:  # lookahead: the blocks its next token needs (planned)
                    kv.grow(i, kvp.tokens(reqs[i][0], max_new[i], len(running[i])))
                dgroups = [dec[j:j + ubs] for j in range(0, len(dec), ubs)]
                pgroups = [[new[j] for j in g] for g in pack_prefill(
                    [reqs[i][0] for i in new], ubs, policy.prefill_micro_batch_tokens)]
                decode = [(g, [running[i][-1] for i in g],
                           [len(prompts[i]) + len(running[i]) - 1 for i in g],
                           [indices[i] for i in g], [len(running[i]) for i in g])
                          for g in dgroups]
                prefill = [(g, [list(prompts[i]) for i in g], [indices[i] for i in g])
                           for g in pgroups]
                entries = build_sweep(cfg, policy, [[p + 1 for p in m[2]] for m in decode],
                                      [[len(p) for p in m[1]] for m in prefill], plan,
                                      step=sweep, first_pages=sweep == 0, next_pages=True)
                run = SweepRun(cfg, self.weights, kv, policy, ubs, decode, prefill, sampling)
                trace = execute(entries, run.handlers(), overlap=policy.overlap)
                self.last_sweeps.append(SweepRecord(
                    tuple(map(len, dgroups)), tuple(map(len, pgroups)), len(entries),
                    trace.makespan_s, run.device_rows))
                for i in new:
                    running[i] = []
                sweep, finished = sweep + 1, []
                for k, g in enumerate(dgroups + pgroups):
                    for i, tok in zip(g, run.results[k].tolist()):
                        toks = running[i]
                        toks.append(int(tok))
                        done_tokens += 1
                        reason = ("eos" if toks[-1] in eos else
                                  "length" if len(toks) >= max_new[i] else None)
                        if reason is not None:
                            kv.release(i)
                            kvp.finish(i)
                            del running[i]
                            done_tokens += max_new[i] - len(toks)
                            finished.append((i, toks, reason))
                kvp.advance()
                if progress is not None:
                    progress(done_tokens, total)
                yield from finished
        finally:
            self.weights.release_all()
            for s in kv.live_sequences:
                kv.release(s)
