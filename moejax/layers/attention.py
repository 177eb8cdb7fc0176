"""GQA: Flax projections and a pure core that runs on device or host (docs/design.md §2)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.layers.norm import Norm
from moejax.layers.rotary import apply_rotary
from moejax.model_config.model import ModelConfig


def gqa_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """softmax(q·kᵀ/√d, masked)·v, kv heads shared by groups of g = Hq/Hkv q heads:
    q [B, T, Hq, d], k, v [B, S, Hkv, d], mask [B, T, S] (True: attend) -> [B, T, Hq, d].
    Scores in float32; a query with no visible key gets the uniform average."""
    if q.shape[1] == 1:
        return _attend_one(q, k, v, mask)
    return _attend_dots(q, k, v, mask)


def _attend_dots(q, k, v, mask):
    """Prompts (T > 1): one [g·T, d]·[d, S] dot per (row, kv head), the largest GEMMs."""
    b, t, hq, d = q.shape
    s_len, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    # [B, T, Hq, d] -> [B, Hkv, g·T, d]: a group's heads and the queries are one row axis
    qg = q.reshape(b, t, hkv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * t, d)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, S, d]
    s = jnp.einsum("bkmd,bksd->bkms", qg, kt, preferred_element_type=jnp.float32)
    s = s * (1.0 / jnp.sqrt(jnp.float32(d)))
    m = jnp.broadcast_to(mask[:, None, None], (b, hkv, g, t, s_len)).reshape(s.shape)
    s = jnp.where(m, s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("bkms,bksd->bkmd", p, vt, preferred_element_type=jnp.float32)
    o = o.reshape(b, hkv, g, t, d).transpose(0, 3, 1, 2, 4)
    return o.reshape(b, t, hq, d).astype(q.dtype)


def _attend_one(q, k, v, mask):
    """Decode (T = 1): multiply-and-reduce, one read per cached k, v (no tiny GEMMs)."""
    b, _, hq, d = q.shape
    hkv = k.shape[2]
    f32 = jnp.float32
    qg = q.reshape(b, 1, hkv, hq // hkv, d).astype(f32)  # [B, 1, Hkv, g, d]
    s = jnp.sum(qg * k.astype(f32)[:, :, :, None, :], axis=-1)  # [B, S, Hkv, g]
    s = s * (1.0 / jnp.sqrt(f32(d)))
    s = jnp.where(mask[:, 0, :, None, None], s, jnp.finfo(f32).min)
    p = jax.nn.softmax(s, axis=1)
    o = jnp.sum(p[..., None] * v.astype(f32)[:, :, :, None, :], axis=1)  # [B, Hkv, g, d]
    return o.reshape(b, 1, hq, d).astype(q.dtype)


def prompt_positions(attention_mask: jax.Array) -> jax.Array:
    """Positions of a left- or right-padded batch: the i-th real token is at i.
    attention_mask [B, T] (1 = real) -> [B, T] int32 (pads get the previous position)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)


def causal_mask(attention_mask: jax.Array) -> jax.Array:
    """[B, T] padding mask -> [B, T, T]: query i sees real keys j ≤ i (either padding)."""
    t = attention_mask.shape[1]
    causal = jnp.tril(jnp.ones((t, t), bool))
    return causal[None] & attention_mask.astype(bool)[:, None, :]


def cache_mask(lengths: jax.Array, cache_len: int) -> jax.Array:
    """Decode against a cache: [B] valid lengths (new token included) -> [B, 1, S]."""
    return (jnp.arange(cache_len)[None, :] < lengths[:, None])[:, None, :]


class AttentionProjections(nn.Module):
    """q, k, v, o projections; switches `clip_qkv` (clamp) and `qk_norm`; then rotary."""

    cfg: ModelConfig

    def setup(self):
        c, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=dt, param_dtype=dt,
                                         name=name)
        self.q_proj = dense(c.num_heads * c.head_dim, "q_proj")
        self.k_proj = dense(c.num_kv_heads * c.head_dim, "k_proj")
        self.v_proj = dense(c.num_kv_heads * c.head_dim, "v_proj")
        self.o_proj = dense(c.hidden_size, "o_proj")
        if c.qk_norm:
            self.q_norm = Norm(c.head_dim, c.norm_eps, "rmsnorm", dt)
            self.k_norm = Norm(c.head_dim, c.norm_eps, "rmsnorm", dt)

    def qkv(self, x: jax.Array, positions: jax.Array):
        """x [B, T, h], positions [B, T] -> q [B, T, Hq, d], k, v [B, T, Hkv, d]."""
        c = self.cfg
        b, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if c.clip_qkv is not None:
            q, k, v = (jnp.clip(a, -c.clip_qkv, c.clip_qkv) for a in (q, k, v))
        q = q.reshape(b, t, c.num_heads, c.head_dim)
        k = k.reshape(b, t, c.num_kv_heads, c.head_dim)
        v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rotary(q, positions, c.rope_theta), apply_rotary(k, positions,
                                                                      c.rope_theta), v

    def out(self, o: jax.Array) -> jax.Array:
        """o [B, T, Hq, d] -> [B, T, h]."""
        return self.o_proj(o.reshape(o.shape[0], o.shape[1], -1))

    def __call__(self, x, positions, mask):
        q, k, v = self.qkv(x, positions)
        return self.out(gqa_attention(q, k, v, mask))
