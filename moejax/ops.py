"""Jitted pieces of the forward pass, shared by every engine path.

Each takes only the parameters it needs, already on its device; `cfg` (a frozen,
hashable ModelConfig) and `moe` are static, so all layers of one kind share one
compiled function.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from moejax.layers.attention import cache_mask, gqa_attention
from moejax.layers.decoder import DecoderLayer, MoETransformer
from moejax.layers.experts import expert_counts
from moejax.model_config.model import ModelConfig


@partial(jax.jit, static_argnames=("cfg",))
def embed(cfg: ModelConfig, params: dict, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] -> [B, T, h]; params holds at least 'embed'."""
    return MoETransformer(cfg).apply({"params": params}, tokens, method="embed_tokens")


@partial(jax.jit, static_argnames=("cfg",))
def head(cfg: ModelConfig, params: dict, x: jax.Array) -> jax.Array:
    """x [B, T, h] -> float32 logits; params holds 'final_norm', 'lm_head'/'embed'."""
    return MoETransformer(cfg).apply({"params": params}, x, method="head")


@partial(jax.jit, static_argnames=("cfg", "moe"))
def pre_attention(cfg, moe, lp, x, positions):
    """x [B, T, h] -> q [B, T, Hq, d], k, v [B, T, Hkv, d]."""
    return DecoderLayer(cfg, moe).apply({"params": lp}, x, positions,
                                        method="pre_attention")


@partial(jax.jit, static_argnames=("cfg", "moe"))
def post_attention(cfg, moe, lp, x, o):
    """-> h, normed, routing weights, expert ids, per-expert token counts [E]."""
    h, normed, w, ids = DecoderLayer(cfg, moe).apply({"params": lp}, x, o,
                                                     method="post_attention")
    return h, normed, w, ids, expert_counts(ids, cfg.num_experts if moe else 1)


@partial(jax.jit, static_argnames=("cfg", "moe", "capacity"))
def ffn(cfg, moe, lp, h, normed, w, ids, capacity=None):
    return DecoderLayer(cfg, moe).apply({"params": lp}, h, normed, w, ids, capacity,
                                        method="ffn")


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


def capacity_bucket(max_count: int, num_tokens: int) -> int:
    """Expert capacity C ≥ max_count, rounded up to a quarter-octave step (≤ 25 % padding,
    few distinct compiled shapes), never above the token count (dropless)."""
    if max_count <= 8:
        c = 8
    else:
        step = 1 << max(0, max_count.bit_length() - 3)
        c = -(-max_count // step) * step
    return int(min(c, num_tokens))
