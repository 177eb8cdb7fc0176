"""Stacked SwiGLU experts with capacity-bucketed, dropless dispatch.

Weights: w1 (gate) and w3 (up) [E, h, f], w2 (down) [E, f, h]; expert e computes
FFN_e(x) = (silu(x·w1_e) ⊙ (x·w3_e))·w2_e, and a token's output is Σ_k w_k · FFN_{e_k}(x).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def swiglu(x: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array) -> jax.Array:
    """Batched over experts: x [E, C, h] -> [E, C, h]."""
    g = jnp.einsum("ech,ehf->ecf", x, w1)
    u = jnp.einsum("ech,ehf->ecf", x, w3)
    return jnp.einsum("ecf,efh->ech", jax.nn.silu(g) * u, w2)


def dispatch_slots(ids: jax.Array, num_experts: int, capacity: int) -> jax.Array:
    """Slot of each (token, choice) in an [E·C] buffer: e·C + rank of the token among
    those routed to e; E·C (a dump row) when rank ≥ C. ids [N, k] -> [N·k]."""
    flat = ids.reshape(-1)
    onehot = jax.nn.one_hot(flat, num_experts, dtype=jnp.int32)  # [N·k, E]
    rank = jnp.take_along_axis(jnp.cumsum(onehot, axis=0) - onehot, flat[:, None], 1)[:, 0]
    return jnp.where(rank < capacity, flat * capacity + rank, num_experts * capacity)


def expert_counts(ids: jax.Array, num_experts: int) -> jax.Array:
    """Tokens routed to each expert: ids [N, k] -> [E] int32."""
    return jnp.sum(jax.nn.one_hot(ids.reshape(-1), num_experts, dtype=jnp.int32), axis=0)


def moe_ffn(x, weights, ids, w1, w3, w2, capacity: int | None = None) -> jax.Array:
    """x [N, h], routing weights/ids [N, k] -> [N, h].

    Tokens are scattered into a [E, C, h] buffer (C = `capacity`, default N: dropless for
    any routing), run through all experts as one batched GEMM, and gathered back. Callers
    pass C ≥ max(expert_counts) — rounded to a bucket — to keep the work near N·k/E per
    expert instead of N; with C below the max count tokens would be dropped.
    """
    n, h = x.shape
    e = w1.shape[0]
    c = n if capacity is None else capacity
    slots = dispatch_slots(ids, e, c)  # [N·k]
    tok = jnp.arange(slots.shape[0]) // ids.shape[1]
    buf = jnp.zeros((e * c + 1, h), x.dtype).at[slots].set(x[tok])
    y = swiglu(buf[:-1].reshape(e, c, h), w1, w3, w2).reshape(e * c, h)
    y = jnp.concatenate([y, jnp.zeros((1, h), y.dtype)])[slots]  # [N·k, h]
    y = y.reshape(n, ids.shape[1], h) * weights[..., None].astype(y.dtype)
    return jnp.sum(y, axis=1)


def moe_ffn_reference(x, weights, ids, w1, w3, w2) -> jax.Array:
    """Naive reference: every expert on every token, combined by dense gate weights."""
    e = w1.shape[0]
    dense = jnp.zeros((x.shape[0], e), jnp.float32)
    dense = dense.at[jnp.arange(x.shape[0])[:, None], ids].add(weights)
    y = swiglu(jnp.broadcast_to(x, (e,) + x.shape), w1, w3, w2)  # [E, N, h]
    return jnp.einsum("ne,enh->nh", dense.astype(y.dtype), y)


class Experts(nn.Module):
    """E stacked SwiGLU experts (params w1, w3 [E, h, f], w2 [E, f, h])."""

    num_experts: int
    hidden: int
    ffn: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, weights, ids, capacity: int | None = None):
        init = nn.initializers.lecun_normal(batch_axis=(0,))
        e, h, f = self.num_experts, self.hidden, self.ffn
        w1 = self.param("w1", init, (e, h, f), self.dtype)
        w3 = self.param("w3", init, (e, h, f), self.dtype)
        w2 = self.param("w2", init, (e, f, h), self.dtype)
        return moe_ffn(x, weights, ids, w1, w3, w2, capacity)


class DenseMLP(nn.Module):
    """Dense SwiGLU MLP (layers a family marks dense): params w1, w3 [h, f], w2 [f, h]."""

    hidden: int
    ffn: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # [..., h] -> [..., h]
        init = nn.initializers.lecun_normal()
        w1 = self.param("w1", init, (self.hidden, self.ffn), self.dtype)
        w3 = self.param("w3", init, (self.hidden, self.ffn), self.dtype)
        w2 = self.param("w2", init, (self.ffn, self.hidden), self.dtype)
        return (jax.nn.silu(x @ w1) * (x @ w3)) @ w2
