"""Greedy batched generation with a KV cache.

The loop reads like the paper's pseudocode: prefill the whole (right-padded) batch,
then one decode step per new token; every layer is
pre-attention → attention over the KV cache → post-attention/router → experts.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moejax import ops
from moejax.layers.attention import causal_mask
from moejax.model import MoEModel


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


class Engine:
    """`Engine(model).generate(prompts, max_new_tokens)` → new tokens per prompt."""

    def __init__(self, model: MoEModel):
        self.model = model
        self.cfg = model.config
        p = model.params
        self._embed_params = {"embed": p["embed"]}
        self._head_params = {k: p[k] for k in ("embed", "final_norm", "lm_head") if k in p}

    # ------------------------------------------------------------ one layer
    def _layer(self, i: int, x, positions, attention):
        """x [B, T, h] through layer i; `attention(q, k, v) -> o` owns the KV cache."""
        cfg, lp, moe = self.cfg, self.model.params[f"layers_{i}"], self.cfg.is_moe_layer(i)
        q, k, v = ops.pre_attention(cfg, moe, lp, x, positions)
        h, normed, w, ids, counts = ops.post_attention(cfg, moe, lp, x, attention(q, k, v))
        cap = ops.capacity_bucket(int(jnp.max(counts)), normed.shape[0]) if moe else None
        return ops.ffn(cfg, moe, lp, h, normed, w, ids, cap)

    # ------------------------------------------------------------- generate
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 eos_token_id: int | None = None) -> list[list[int]]:
        """Greedy decoding of a ragged batch; rows are `max_new_tokens` long, or end at
        (and include) `eos_token_id` when given."""
        cfg = self.cfg
        validate_request(cfg, prompts, max_new_tokens, eos_token_id)
        b = len(prompts)
        lens = np.array([len(p) for p in prompts], np.int32)
        t, s = bucket(int(lens.max())), bucket(int(lens.max()) + max_new_tokens)
        tokens = np.zeros((b, t), np.int32)
        for r, p in enumerate(prompts):
            tokens[r, :len(p)] = p
        dt = jnp.dtype(cfg.dtype)
        shape = (b, s, cfg.num_kv_heads, cfg.head_dim)
        caches = [[jnp.zeros(shape, dt), jnp.zeros(shape, dt)] for _ in range(cfg.num_layers)]

        # Prefill: right-padded prompts, causal over real tokens.
        am = jnp.asarray(np.arange(t)[None, :] < lens[:, None], jnp.int32)
        mask, positions = causal_mask(am), jnp.broadcast_to(jnp.arange(t), (b, t))
        x = ops.embed(cfg, self._embed_params, jnp.asarray(tokens))
        for i in range(cfg.num_layers):
            def prefill_attn(q, k, v, c=caches[i]):
                c[0], c[1] = ops.write_prefill(c[0], c[1], k, v)
                return ops.attend(q, k, v, mask)
            x = self._layer(i, x, positions, prefill_attn)
        last = x[jnp.arange(b), jnp.asarray(lens - 1)][:, None]
        nxt = np.asarray(jnp.argmax(ops.head(cfg, self._head_params, last)[:, 0], -1))

        out = [[int(tok)] for tok in nxt]
        done = np.zeros(b, bool) if eos_token_id is None else nxt == eos_token_id
        pos = jnp.asarray(lens)
        for _ in range(max_new_tokens - 1):
            if done.all():
                break
            x = ops.embed(cfg, self._embed_params, jnp.asarray(nxt, jnp.int32)[:, None])
            for i in range(cfg.num_layers):
                def decode_attn(q, k, v, c=caches[i]):
                    o, c[0], c[1] = ops.decode_attention(c[0], c[1], q, k, v, pos)
                    return o
                x = self._layer(i, x, pos[:, None], decode_attn)
            nxt = np.asarray(jnp.argmax(ops.head(cfg, self._head_params, x)[:, 0], -1))
            pos = pos + 1
            for r in np.flatnonzero(~done):
                out[r].append(int(nxt[r]))
            if eos_token_id is not None:
                done |= nxt == eos_token_id
        return out
