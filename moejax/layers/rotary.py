"""Rotary position embedding, HF "rotate_half" (non-interleaved) convention."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def rotary_cos_sin(positions: jax.Array, head_dim: int, theta: float):
    """Integer positions [B, T] -> cos, sin [B, T, head_dim]: inv_freq_i = theta^(−2i/d),
    angle = pos · inv_freq, duplicated over both halves."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, d/2]
    ang = jnp.concatenate([ang, ang], axis=-1)  # [B, T, d]
    return jnp.cos(ang), jnp.sin(ang)


def apply_rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """x [B, T, heads, d] rotated by positions [B, T]: x·cos + rotate_half(x)·sin."""
    cos, sin = rotary_cos_sin(positions, x.shape[-1], theta)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x.astype(jnp.float32) * cos + rot.astype(jnp.float32) * sin).astype(x.dtype)


class RotaryEmbedding(nn.Module):
    """Parameter-free module wrapper of `apply_rotary`."""

    theta: float

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        return apply_rotary(x, positions, self.theta)
