"""Top-k router: softmax over experts, top-k, optional p-norm renormalisation."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def route(logits: jax.Array, top_k: int, norm_p: float | None):
    """logits [N, E] -> (weights [N, k] float32, expert ids [N, k] int32).

    Mixtral: p = softmax(logits); top-k of p; w /= Σ w (norm_p = 1). DBRX divides by the
    p-norm `moe_normalize_expert_weights`; Qwen3 without `norm_topk_prob` keeps p as is.

    Exact ties go to the lower expert index (`lax.top_k`); `torch.topk` on the CPU breaks
    them otherwise (for [.1, .3, .3, .3], top-2: experts 1, 2 here, 2, 3 in torch), and
    no rule matches it in general. Rare in float32; with bf16 router logits a tie at
    rank k / k+1 hit ~7 % of tokens per layer of a Qwen3-like router (128 experts, top-8)
    and ~0.4 % of a Mixtral-like one, so bf16 parity is checked per position, not as
    a maximum.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    w, idx = jax.lax.top_k(probs, top_k)
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
