"""Jitted forward pieces (docs/design.md §3), each given only its parameters, placed; `cfg`
(hashable) and `moe` are static, so all layers of one kind share one compiled function."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax.host_offload.sharding import EXPERT_SPECS, TP

from moejax.layers.attention import cache_mask, gqa_attention
from moejax.layers.decoder import DecoderLayer, MoETransformer
from moejax.layers.experts import expert_counts, moe_ffn_parts
from moejax.model_config.dispatch import (capacity_bucket,  # noqa: F401 (re-export)
                                          capacity_buckets, uses_capacity)
from moejax.model_config.model import ModelConfig
from moejax.sampling import sample


@partial(jax.jit, static_argnames=("cfg",))
def embed(cfg: ModelConfig, params: dict, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] -> [B, T, h]; params holds at least 'embed'."""
    return MoETransformer(cfg).apply({"params": params}, tokens, method="embed_tokens")


@partial(jax.jit, static_argnames=("cfg",))
def head(cfg: ModelConfig, params: dict, x: jax.Array) -> jax.Array:
    """x [B, T, h] -> float32 logits; params holds 'final_norm', 'lm_head'/'embed'."""
    return MoETransformer(cfg).apply({"params": params}, x, method="head")


@partial(jax.jit, static_argnames=("cfg",))
def next_tokens(cfg: ModelConfig, params: dict, x: jax.Array) -> jax.Array:
    """x [B, T, h] -> greedy ids [B] int32, last position; norm, head, argmax in one op."""
    return jnp.argmax(head(cfg, params, x[:, -1:])[:, 0], axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("cfg",))
def sampled_tokens(cfg: ModelConfig, params: dict, x: jax.Array, base_key, request_index,
                   step, temperature, top_k, top_p) -> jax.Array:
    """x [B, T, h] -> sampled next token ids [B] int32 of the last position: final norm,
    LM head and `sampling.sample` (row b's key from request_index[b] and step) as one
    device op."""
    logits = head(cfg, params, x[:, -1:])[:, 0]  # [B, V] float32
    return sample(logits, base_key, request_index, step, temperature, top_k, top_p)


@partial(jax.jit, static_argnames=("cfg", "moe"))
def pre_attention(cfg, moe, lp, x, positions):
    """x [B, T, h] -> q [B, T, Hq, d], k, v [B, T, Hkv, d]."""
    return DecoderLayer(cfg, moe).apply({"params": lp}, x, positions,
                                        method="pre_attention")


@partial(jax.jit, static_argnames=("cfg", "moe"))
def pre_attention_packed(cfg, moe, lp, x, positions):
    """x [B, T, h] -> q, k, v packed as one [B, T, Hq + 2·Hkv, d] array: what goes to the
    host for CPU attention, as one transfer."""
    q, k, v = DecoderLayer(cfg, moe).apply({"params": lp}, x, positions,
                                           method="pre_attention")
    return jnp.concatenate([q, k.astype(q.dtype), v.astype(q.dtype)], axis=2)


@partial(jax.jit, static_argnames=("cfg", "moe"))
def post_attention(cfg, moe, lp, x, o):
    """x, o -> h [B, T, h], normed [N, h], weights, ids [N, k], counts [E] (N = B·T)."""
    h, normed, w, ids = DecoderLayer(cfg, moe).apply({"params": lp}, x, o,
                                                     method="post_attention")
    return h, normed, w, ids, expert_counts(ids, cfg.num_experts if moe else 1)


def needs_capacity(cfg: ModelConfig, moe: bool, num_tokens: int) -> bool:
    """Whether `ffn` over `num_tokens` tokens takes the capacity path (dense layers: never;
    `model_config.dispatch.uses_capacity`)."""
    return bool(moe and uses_capacity(num_tokens, cfg.top_k, cfg.num_experts))


def _moe_ffn(cfg, parts, normed, w, ids, capacity):
    """[N, h]: the capacity path at `capacity`, or with capacity "device" at the bucket of
    the max router count, picked on the device (`lax.switch` over `capacity_buckets`)."""
    if capacity != "device":
        return moe_ffn_parts(normed, w, ids, parts, capacity)
    caps = capacity_buckets(normed.shape[0], cfg.top_k, cfg.num_experts)
    top = jnp.max(expert_counts(ids, cfg.num_experts))
    pick = jnp.minimum(jnp.searchsorted(jnp.asarray(caps, jnp.int32), top), len(caps) - 1)
    branches = [partial(moe_ffn_parts, capacity=c) for c in caps]
    return jax.lax.switch(pick, branches, normed, w, ids, parts)


def _tp_moe_ffn(cfg, mesh, parts, normed, w, ids, capacity):
    """[N, h] on a tensor-parallel mesh: each device runs `_moe_ffn` over its 1/k of
    every part's f columns (`EXPERT_SPECS`), then the partial sums are reduced (psum, in
    float32): SwiGLU is a sum over f, so the k partials add up to the whole FFN."""
    def local(parts, normed, w, ids):
        y = _moe_ffn(cfg, parts, normed, w, ids, capacity)  # [N, h], this device's columns
        return jax.lax.psum(y.astype(jnp.float32), TP).astype(y.dtype)

    specs = [tuple(EXPERT_SPECS[n] for n in ("w1", "w3", "w2")) for _ in parts]
    return jax.shard_map(local, mesh=mesh, in_specs=(specs, P(), P(), P()),
                         out_specs=P())(list(parts), normed, w, ids)


@partial(jax.jit, static_argnames=("cfg", "moe", "capacity", "mesh"))
def _ffn(cfg, moe, lp, h, normed, w, ids, capacity=None, mesh=None):
    if not moe:
        return DecoderLayer(cfg, moe).apply({"params": lp}, h, normed, w, ids, None,
                                            method="ffn")
    if mesh is None:
        y = _moe_ffn(cfg, lp["experts"], normed, w, ids, capacity)
    else:
        y = _tp_moe_ffn(cfg, mesh, lp["experts"], normed, w, ids, capacity)
    return h + y.reshape(h.shape).astype(h.dtype)


def ffn(cfg, moe, lp, h, normed, w, ids, capacity="device", mesh=None):
    """h + FFN(normed) -> [B, T, h]. MoE layers take `lp["experts"]` as FFN-column parts
    [(w1, w3, w2), …] (`layers.experts.moe_ffn_parts`); if `needs_capacity`, `capacity`
    is an int (≥ the max router count, else tokens drop) or "device" (the bucket is
    picked on the device), else the sorted path: one compiled shape per token count.
    `mesh`: the parts are sharded along f over it (`host_offload.sharding`), reduced
    after w2."""
    if not needs_capacity(cfg, moe, normed.shape[0]):
        capacity = None
    return _ffn(cfg, moe, lp, h, normed, w, ids, capacity, mesh)


attend = jax.jit(gqa_attention)


@partial(jax.jit, donate_argnums=(0, 1))
def write_prefill(k_cache, v_cache, k, v):
    """Prompt k, v [B, T, Hkv, d] into slots [0, T) of caches [B, S, Hkv, d]."""
    return (jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), 0, 1),
            jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), 0, 1))


@partial(jax.jit, donate_argnums=(0, 1))
def decode_attention(k_cache, v_cache, q, k, v, pos):
    """Write the new k, v [B, 1, Hkv, d] at slot pos[b] of each row, then attend q over
    slots ≤ pos[b]. Returns (o [B, 1, Hq, d], k_cache, v_cache)."""
    rows = jnp.arange(k_cache.shape[0])
    k_cache = k_cache.at[rows, pos].set(k[:, 0].astype(k_cache.dtype))
    v_cache = v_cache.at[rows, pos].set(v[:, 0].astype(v_cache.dtype))
    o = gqa_attention(q, k_cache, v_cache, cache_mask(pos + 1, k_cache.shape[1]))
    return o, k_cache, v_cache
