"""What runs where: an Engine's knobs resolved into one `Placement`, and the checks of a
generate() call (docs/design.md §2). Every bad knob is one ValueError naming it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from moejax.host_offload.kv_cache import KV_DTYPES
from moejax.host_offload.memory import default_device, device_memory_limit
from moejax.host_offload.sharding import check_devices, check_split
from moejax.host_offload.weight_store import HostWeightStore, make_plan
from moejax.model import MoEModel
from moejax.sampling import Sampling
from moejax.schedule.policy import DEVICES, Policy

# Of a device budget given alone (no wg, no policy), the share the store leaves to
# activations when it picks how many experts stay resident (the batch is not known yet).
ACTIVATION_SHARE = 0.1


@dataclass(frozen=True)
class Placement:
    """The resolved knobs: offloaded or all on the device, where attention runs, the
    host KV cache dtype, a fixed policy or micro-batch size, and the store's knobs
    (`store_knobs`, for `HostWeightStore.from_params`; empty for a given store)."""

    offload: bool
    attention_device: str
    kv_dtype: str | None = None
    policy: Policy | None = None
    micro_batch_size: int | None = None
    store_knobs: dict = field(default_factory=dict)


def budget_weight_fraction(cfg, page_bytes, budget, shards: int = 1) -> float | None:
    """The resident fraction a device budget alone buys: the most resident pages that
    leave ACTIVATION_SHARE of it free; None (the store then fills the whole budget, or
    names the shortfall) when even streaming everything does not leave that much."""
    try:
        return make_plan(cfg, page_bytes, None, budget,
                         reserved_bytes=int(ACTIVATION_SHARE * budget),
                         shards=shards).gpu_weight_fraction
    except (ValueError, TypeError):
        return None


def _policy_knobs(policy, gpu_weight_fraction, page_bytes, micro_batch_size,
                  attention_device):
    """(wg, page_bytes, attention_device) a policy fixes; ValueError for a knob given
    beside it or a placement the engine does not run."""
    if not isinstance(policy, Policy):
        raise ValueError(f"policy must be a moejax.schedule.Policy, got "
                         f"{type(policy).__name__}")
    if gpu_weight_fraction is not None or page_bytes is not None or (
            micro_batch_size is not None) or (
            attention_device is not None and attention_device != policy.attention_device):
        raise ValueError("policy given: gpu_weight_fraction, page_bytes, "
                         "micro_batch_size and attention_device come from it")
    if policy.attention_device == "gpu" and policy.kv_cache_device == "cpu":
        raise ValueError("policy kv_cache_device='cpu' with attention_device='gpu' "
                         "is priced by the model but not run by the engine: its "
                         "device attention keeps the KV cache on the device "
                         "(kv_cache_device='gpu')")
    return policy.gpu_weight_fraction, policy.page_bytes, policy.attention_device


def _check_choices(micro_batch_size, offload, attention_device, kv_dtype):
    if micro_batch_size is not None and (isinstance(micro_batch_size, bool) or not
                                         isinstance(micro_batch_size, (int, np.integer))
                                         or micro_batch_size < 1):
        raise ValueError(f"micro_batch_size={micro_batch_size!r} must be a positive "
                         "integer")
    if offload not in (None, True, False):
        raise ValueError(f"offload={offload!r} must be None, True or False")
    if attention_device is not None and attention_device not in DEVICES:
        raise ValueError(f"attention_device={attention_device!r} not in {DEVICES}")
    if kv_dtype is not None and kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype={kv_dtype!r} not in {KV_DTYPES}")


def resolve_placement(model, device_memory_bytes=None, gpu_weight_fraction=None,
                      attention_device=None, page_bytes=None, *, policy=None,
                      micro_batch_size=None, kv_dtype=None, host_memory="auto",
                      offload=None, devices=None) -> Placement:
    """The Placement an `Engine(model, ...)` runs with (its docstring lists the knobs):
    offloaded iff a knob, a policy, `devices` or a HostWeightStore is given (or
    `offload=True`); `devices` are checked (they exist, the model's sizes split)."""
    if policy is not None:
        gpu_weight_fraction, page_bytes, attention_device = _policy_knobs(
            policy, gpu_weight_fraction, page_bytes, micro_batch_size, attention_device)
    _check_choices(micro_batch_size, offload, attention_device, kv_dtype)
    store_knobs = dict(device_memory_bytes=device_memory_bytes,
                       gpu_weight_fraction=gpu_weight_fraction, page_bytes=page_bytes)
    given = any(v is not None for v in (*store_knobs.values(), attention_device,
                                         kv_dtype, policy, devices)) or host_memory != "auto"
    is_store = isinstance(model, HostWeightStore)
    if not is_store and not isinstance(model, MoEModel):
        raise ValueError(f"model must be a MoEModel or a HostWeightStore, got "
                         f"{type(model).__name__}")
    offload = (given or is_store) if offload is None else offload
    if not offload and (given or is_store):
        raise ValueError("offload=False takes no offload knobs and no HostWeightStore")
    attention_device = attention_device or ("cpu" if offload else "gpu")
    if kv_dtype is not None and attention_device != "cpu":
        raise ValueError(f"kv_dtype={kv_dtype!r} needs attention_device='cpu' (the "
                         "device KV cache keeps the model dtype)")
    shards = 1
    if devices is not None:
        devices = check_devices(devices)
        shards = len(devices)
        check_split(model.cfg if is_store else model.config, shards)
    if is_store:
        if device_memory_bytes is not None or host_memory != "auto" or (
                devices is not None and devices != model.devices) or (
                policy is None and (gpu_weight_fraction, page_bytes) != (None, None)):
            raise ValueError("a HostWeightStore was given: its knobs are already set")
        if policy is not None:
            model.check_policy(policy)
        store_knobs = {}
    else:
        model.check_params()
        budget = device_memory_bytes if device_memory_bytes is not None else \
            device_memory_limit(default_device())  # an accelerator's allocator limit
        if offload and budget is not None and gpu_weight_fraction is None:
            store_knobs["gpu_weight_fraction"] = budget_weight_fraction(
                model.config, page_bytes, budget, shards)
        store_knobs["host_memory"] = host_memory
        if devices is not None:
            store_knobs["devices"] = devices
    return Placement(offload, attention_device, kv_dtype, policy, micro_batch_size,
                     store_knobs if offload else {})


def _eos_ids(eos_token_id) -> list:
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, np.ndarray):
        return np.atleast_1d(eos_token_id).tolist()
    return list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]


def _is_token(t, vocab: int) -> bool:
    return not isinstance(t, bool) and isinstance(t, (int, np.integer)) and 0 <= t < vocab


def validate_request(cfg, prompts, max_new_tokens, eos_token_id,
                     logits_only: bool = False) -> None:
    """ValueError naming the first problem with a generate() call (`logits_only`: a
    prompt_logits() call, whose prompts may fill every position)."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    for e in _eos_ids(eos_token_id):
        if not _is_token(e, cfg.vocab_size):
            raise ValueError(f"eos_token_id {eos_token_id!r}: {e!r} is not a token id in "
                             f"[0, {cfg.vocab_size})")
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)) or not isinstance(p, (Sequence, np.ndarray)):
            raise ValueError(f"prompt {i} must be a list of token ids, got "
                             f"{type(p).__name__} {p!r}")
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        bad = [t for t in p if not _is_token(t, cfg.vocab_size)]
        if bad:
            raise ValueError(f"prompt {i}: token id {bad[0]!r} outside the vocabulary "
                             f"[0, {cfg.vocab_size})")
        if logits_only and len(p) > cfg.max_positions:
            raise ValueError(f"prompt {i}: {len(p)} tokens exceed max_positions "
                             f"{cfg.max_positions}")
        if not logits_only and len(p) + max_new_tokens > cfg.max_positions:
            raise ValueError(f"prompt {i}: {len(p)} tokens + max_new_tokens "
                             f"{max_new_tokens} exceeds max_positions {cfg.max_positions}")


def validate_sampling(sampling, request_indices, n: int) -> np.ndarray:
    """int64 [n] request indices of a generate() call; ValueError for a `sampling` that
    is not a Sampling (or None) or indices that are not n distinct integers ≥ 0."""
    if sampling is not None and not isinstance(sampling, Sampling):
        raise ValueError(f"sampling must be a moejax.Sampling or None, got "
                         f"{type(sampling).__name__}")
    if request_indices is None:
        return np.arange(n)
    idx = list(request_indices) if isinstance(request_indices, (list, tuple, range,
                                                               np.ndarray)) else None
    if idx is None or len(idx) != n or any(
            isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not
            0 <= i < 2 ** 31 for i in idx) or len(set(map(int, idx))) != n:
        raise ValueError(f"request_indices must be {n} distinct integers in [0, 2**31), "
                         "one per prompt")
    return np.asarray(idx, np.int64)
