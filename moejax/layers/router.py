"""Top-k router: softmax over experts, top-k, optional p-norm renormalisation."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def route(logits: jax.Array, top_k: int, norm_p: float | None):
    """logits [N, E] -> (weights [N, k] float32, ids [N, k] int32): top-k of softmax, then
    w /= (Σ |w|^p)^(1/p), p = norm_p (Mixtral 1, DBRX `moe_normalize_expert_weights`;
    None keeps w: Qwen3 without `norm_topk_prob`)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    w, idx = jax.lax.top_k(probs, top_k)  # exact ties: lower index (CPU torch.topk differs)
    if norm_p is not None:
        w = w / jnp.sum(jnp.abs(w) ** norm_p, axis=-1, keepdims=True) ** (1.0 / norm_p)
    return w, idx.astype(jnp.int32)


class Router(nn.Module):
    """Linear gate [hidden, E] followed by `route`."""

    num_experts: int
    top_k: int
    norm_p: float | None = 1.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array):  # [N, h] -> ([N, k], [N, k])
        logits = nn.Dense(self.num_experts, use_bias=False, dtype=self.dtype,
                          param_dtype=self.dtype, name="gate")(x)
        return route(logits, self.top_k, self.norm_p)
