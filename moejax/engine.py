"""Greedy batched generation with a KV cache, all on the device or offloaded.

The loop reads like the paper's pseudocode: prefill the whole (right-padded) batch, then
one decode step per new token; every layer i is

    prefetch(next MoE layer)                 H2D: its expert pages stream meanwhile
    q, k, v = pre_attention(x)               device
    o = attention(q, k, v)                   host (D2H, CPU attention over the host KV
                                             cache, H2D) or device
    h, ... = post_attention(x, o)            device: o_proj, residual, norm, router
    experts = wait(i); x = ffn(h, experts)   device: resident + streamed experts
    release(i)

Two placements:
- reference (all on device): `Engine(model)` with no knob; weights, KV cache and
  attention on the device. `offload=False` forces it.
- offloaded: any knob given (or `offload=True`, or a `HostWeightStore` as the model).
  Experts live in a `HostWeightStore` (resident fraction on the device, the rest streamed
  in pages), the KV cache on the host with CPU attention (`attention_device="cpu"`,
  the default) or on the device (`"gpu"`, for ablation; it is then accounted in the
  store's device budget). Without a budget or fraction, every expert streams (wg = 0).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moejax import ops
from moejax.host_offload.kv_cache import KV_DTYPES, HostKVCache
from moejax.host_offload.weight_store import HostWeightStore
from moejax.layers.attention import causal_mask
from moejax.model import MoEModel

ATTENTION_DEVICES = ("cpu", "gpu")


def bucket(n: int, minimum: int = 16) -> int:
    """Round a length up to a power-of-two multiple of 16, so shapes (and compilations)
    repeat across calls."""
    b = minimum
    while b < n:
        b *= 2
    return b


def validate_request(cfg, prompts, max_new_tokens, eos_token_id) -> None:
    """ValueError naming the first problem with a generate() call."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if eos_token_id is not None and not 0 <= eos_token_id < cfg.vocab_size:
        raise ValueError(f"eos_token_id {eos_token_id} outside the vocabulary "
                         f"[0, {cfg.vocab_size})")
    for i, p in enumerate(prompts):
        if not hasattr(p, "__len__") or len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        bad = [t for t in p if not isinstance(t, (int, np.integer))
               or not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i}: token id {bad[0]!r} outside the vocabulary "
                             f"[0, {cfg.vocab_size})")
        if len(p) + max_new_tokens > cfg.max_positions:
            raise ValueError(f"prompt {i}: {len(p)} tokens + max_new_tokens "
                             f"{max_new_tokens} exceeds max_positions {cfg.max_positions}")


# ------------------------------------------------------------ attention backends
class DeviceAttention:
    """KV cache [B, S, Hkv, d] per layer on the device; attention jitted there."""

    def __init__(self, cfg, batch: int, max_len: int):
        shape, dt = (batch, max_len, cfg.num_kv_heads, cfg.head_dim), jnp.dtype(cfg.dtype)
        self.caches = [[jnp.zeros(shape, dt), jnp.zeros(shape, dt)]
                       for _ in range(cfg.num_layers)]
        self.nbytes = 2 * cfg.num_layers * int(np.prod(shape)) * dt.itemsize

    def prefill(self, i, q, k, v, lengths, mask):
        c = self.caches[i]
        c[0], c[1] = ops.write_prefill(c[0], c[1], k, v)
        return ops.attend(q, k, v, mask)

    def decode(self, i, q, k, v, positions):
        c = self.caches[i]
        o, c[0], c[1] = ops.decode_attention(c[0], c[1], q, k, v, jnp.asarray(positions))
        return o


class HostAttention:
    """The whole batch as one row slice of a `HostKVCache` (CPU attention)."""

    def __init__(self, cfg, batch: int, max_len: int, kv_dtype: str | None):
        self.kv = HostKVCache(cfg, batch, max_len, kv_dtype)
        self.rows = slice(0, batch)

    def prefill(self, i, q, k, v, lengths, mask):
        return self.kv.prefill(i, self.rows, q, k, v, lengths)

    def decode(self, i, q, k, v, positions):
        return self.kv.decode(i, self.rows, q, k, v, positions)


# ------------------------------------------------------------------------ engine
def _resolve_placement(model, store_knobs, attention_device, kv_dtype, host_memory,
                       offload) -> tuple[bool, str]:
    """(offload?, attention device) from Engine's knobs; ValueError naming a bad one."""
    is_store = isinstance(model, HostWeightStore)
    if not is_store and not isinstance(model, MoEModel):
        raise ValueError(f"model must be a MoEModel or a HostWeightStore, got "
                         f"{type(model).__name__}")
    given = any(v is not None for v in (*store_knobs.values(), attention_device,
                                         kv_dtype)) or host_memory != "auto"
    offload = (given or is_store) if offload is None else bool(offload)
    if not offload and (given or is_store):
        raise ValueError("offload=False takes no offload knobs and no HostWeightStore")
    if attention_device is not None and attention_device not in ATTENTION_DEVICES:
        raise ValueError(f"attention_device={attention_device!r} not in "
                         f"{ATTENTION_DEVICES}")
    attention_device = attention_device or ("cpu" if offload else "gpu")
    if kv_dtype is not None and kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype={kv_dtype!r} not in {KV_DTYPES}")
    if kv_dtype is not None and attention_device != "cpu":
        raise ValueError(f"kv_dtype={kv_dtype!r} needs attention_device='cpu' (the "
                         "device KV cache keeps the model dtype)")
    if is_store and (any(v is not None for v in store_knobs.values())
                     or host_memory != "auto"):
        raise ValueError("a HostWeightStore was given: its knobs are already set")
    return offload, attention_device


class Engine:
    """`Engine(model, ...).generate(prompts, max_new_tokens)` → new tokens per prompt.

    model                MoEModel, or a filled HostWeightStore (then no store knob).
    device_memory_bytes  device budget of the store; it picks the largest resident
                         expert fraction that fits (ValueError saying by how much if
                         nothing fits).
    gpu_weight_fraction  resident fraction of every MoE layer's experts (wg ∈ [0, 1]).
    attention_device     "cpu" (host KV cache, default when offloaded) or "gpu".
    page_bytes           streamed page size (default 16 MiB).
    kv_dtype             host KV cache dtype (default the model's; "int8" quantised).
    host_memory          "auto" | "pinned_host" | "numpy" (see HostWeightStore).
    offload              None: offload iff a knob is given; True/False force it.
    """

    def __init__(self, model, device_memory_bytes: int | None = None,
                 gpu_weight_fraction: float | None = None,
                 attention_device: str | None = None, page_bytes: int | None = None, *,
                 kv_dtype: str | None = None, host_memory: str = "auto",
                 offload: bool | None = None):
        store_knobs = dict(device_memory_bytes=device_memory_bytes,
                           gpu_weight_fraction=gpu_weight_fraction, page_bytes=page_bytes)
        is_store = isinstance(model, HostWeightStore)
        self.offload, self.attention_device = _resolve_placement(
            model, store_knobs, attention_device, kv_dtype, host_memory, offload)
        self.kv_dtype = kv_dtype
        self.cfg = model.cfg if is_store else model.config
        self.model = None if is_store else model
        self.store: HostWeightStore | None = None
        if is_store:
            self.store = model
        elif self.offload:
            self.store = HostWeightStore.from_params(self.cfg, model.params,
                                                     host_memory=host_memory, **store_knobs)
        g = self.store.global_params() if self.store else model.params
        self._embed_params = {"embed": g["embed"]}
        self._head_params = {k: g[k] for k in ("embed", "final_norm", "lm_head") if k in g}
        self._moe_layers = [i for i in range(self.cfg.num_layers) if self.cfg.is_moe_layer(i)]

    # ------------------------------------------------------------ placement hooks
    def _layer_params(self, i: int) -> dict:
        return self.store.device_params(i) if self.store else self.model.params[f"layers_{i}"]

    def _experts(self, i: int) -> dict:
        return self.store.wait(i) if self.store else self.model.params[f"layers_{i}"]["experts"]

    def _next_moe(self, i: int) -> int | None:
        """The MoE layer after i, cyclically (the next step's first one after the last)."""
        later = [j for j in self._moe_layers if j > i]
        return later[0] if later else (self._moe_layers[0] if self._moe_layers else None)

    def _prefetch_after(self, i: int) -> None:
        j = self._next_moe(i)
        if self.store is not None and j is not None:
            self.store.prefetch(j)

    def _release(self, i: int) -> None:
        if self.store is not None and self.cfg.is_moe_layer(i):
            self.store.release(i)

    # ------------------------------------------------------------ one layer / pass
    def _layer(self, i: int, x, positions, attention):
        """x [B, T, h] through layer i; `attention(i, q, k, v) -> o` owns the KV cache."""
        cfg, moe, lp = self.cfg, self.cfg.is_moe_layer(i), self._layer_params(i)
        q, k, v = ops.pre_attention(cfg, moe, lp, x, positions)
        h, normed, w, ids, counts = ops.post_attention(cfg, moe, lp, x, attention(i, q, k, v))
        cap = None
        if moe:
            cap = ops.capacity_bucket(int(jnp.max(counts)), normed.shape[0])
            lp = {**lp, "experts": self._experts(i)}
        y = ops.ffn(cfg, moe, lp, h, normed, w, ids, cap)
        self._release(i)
        return y

    def _pass(self, x, positions, attention):
        """One pass over all layers, streaming layer i+1's experts while i computes."""
        self._prefetch_after(-1)
        for i in range(self.cfg.num_layers):
            self._prefetch_after(i)
            x = self._layer(i, x, positions, attention)
        return x

    # ------------------------------------------------------------------ generate
    def _attention(self, batch: int, max_len: int):
        if self.attention_device == "cpu":
            return HostAttention(self.cfg, batch, max_len, self.kv_dtype)
        attn = DeviceAttention(self.cfg, batch, max_len)
        if self.store is not None:
            self.store.reserve("kv_cache", attn.nbytes)
        return attn

    def _free(self, attention) -> None:
        if self.store is not None and isinstance(attention, DeviceAttention):
            self.store.unreserve("kv_cache")

    def _prefill(self, prompts, max_new_tokens: int, attention_factory=None):
        """Embed and run the right-padded prompts through every layer.
        Returns (x [B, T, h], lengths [B], attention backend)."""
        cfg, b = self.cfg, len(prompts)
        lens = np.array([len(p) for p in prompts], np.int32)
        t = bucket(int(lens.max()))
        s = int(lens.max()) + max_new_tokens
        tokens = np.zeros((b, t), np.int32)
        for r, p in enumerate(prompts):
            tokens[r, :len(p)] = p
        attention = self._attention(b, s if self.attention_device == "cpu" else bucket(s))
        am = jnp.asarray(np.arange(t)[None, :] < lens[:, None], jnp.int32)
        mask, positions = causal_mask(am), jnp.broadcast_to(jnp.arange(t), (b, t))
        x = ops.embed(cfg, self._embed_params, jnp.asarray(tokens))
        try:
            x = self._pass(x, positions, lambda i, q, k, v: attention.prefill(
                i, q, k, v, lens, mask))
        except BaseException:
            self._free(attention)
            raise
        return x, lens, attention

    def prompt_logits(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """float32 logits [B, max prompt length, vocab] of right-padded prompts, through
        this engine's placement (the reference is `model.logits`)."""
        validate_request(self.cfg, prompts, 1, None)
        x, lens, attention = self._prefill(prompts, 1)
        self._free(attention)
        return np.asarray(ops.head(self.cfg, self._head_params, x))[:, :int(lens.max())]

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 eos_token_id: int | None = None) -> list[list[int]]:
        """Greedy decoding of a ragged batch; rows are `max_new_tokens` long, or end at
        (and include) `eos_token_id` when given."""
        cfg = self.cfg
        validate_request(cfg, prompts, max_new_tokens, eos_token_id)
        b = len(prompts)
        x, lens, attention = self._prefill(prompts, max_new_tokens)
        try:
            last = x[jnp.arange(b), jnp.asarray(lens - 1)][:, None]
            nxt = np.asarray(jnp.argmax(ops.head(cfg, self._head_params, last)[:, 0], -1))
            out = [[int(tok)] for tok in nxt]
            done = np.zeros(b, bool) if eos_token_id is None else nxt == eos_token_id
            pos = lens.copy()
            for _ in range(max_new_tokens - 1):
                if done.all():
                    break
                x = ops.embed(cfg, self._embed_params, jnp.asarray(nxt, jnp.int32)[:, None])
                x = self._pass(x, jnp.asarray(pos)[:, None],
                               lambda i, q, k, v, p=pos: attention.decode(i, q, k, v, p))
                nxt = np.asarray(jnp.argmax(ops.head(cfg, self._head_params, x)[:, 0], -1))
                pos = pos + 1
                for r in np.flatnonzero(~done):
                    out[r].append(int(nxt[r]))
                if eos_token_id is not None:
                    done |= nxt == eos_token_id
        finally:
            self._free(attention)
        return out
