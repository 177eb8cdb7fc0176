"""RMSNorm and bias-free LayerNorm; the kind is config data (`ModelConfig.norm_type`)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """y = x / sqrt(mean(x²) + eps) · scale, computed in float32 (HF MixtralRMSNorm)."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return scale * y.astype(x.dtype)


def layer_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """y = (x − mean) / sqrt(var + eps) · scale, no bias (DBRX's LayerNorm)."""
    xf = x.astype(jnp.float32)
    mu = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
    return (scale * ((xf - mu) * jax.lax.rsqrt(var + eps))).astype(x.dtype)


NORMS = {"rmsnorm": rms_norm, "layernorm": layer_norm}


class Norm(nn.Module):
    """Normalisation over the last axis with a learned scale [dim]."""

    dim: int
    eps: float
    kind: str = "rmsnorm"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [..., dim] -> [..., dim]
        scale = self.param("scale", nn.initializers.ones, (self.dim,), self.dtype)
        return NORMS[self.kind](x, scale, self.eps)
