"""The MoE transformer; a decoder layer is split where the offloaded schedule splits it
(docs/design.md §2), and `DecoderLayer.__call__` chains the pieces (all-device reference):
  pre_attention   norm → q, k, v (+ rotary)                       device
  attention       gqa_attention over the KV cache                  host or device
  post_attention  o_proj + residual → ffn norm → router            device
  ffn             experts (or dense MLP) + residual                device
"""

from __future__ import annotations

import flax.linen as nn

import jax.numpy as jnp

from moejax.layers.attention import (AttentionProjections, causal_mask, gqa_attention,
                                     prompt_positions)
from moejax.layers.experts import DenseMLP, Experts
from moejax.layers.norm import Norm
from moejax.layers.router import Router
from moejax.model_config.model import ModelConfig
from moejax.quant import expert_format


class DecoderLayer(nn.Module):
    cfg: ModelConfig
    moe: bool = True  # False: a dense SwiGLU MLP (cfg.dense_layers)

    def setup(self):
        c, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        self.attn_norm = Norm(c.hidden_size, c.norm_eps, c.norm_type, dt)
        self.attn = AttentionProjections(c)
        self.ffn_norm = Norm(c.hidden_size, c.norm_eps, c.norm_type, dt)
        if self.moe:
            self.router = Router(c.num_experts, c.top_k, c.topk_norm_p, dt)
            self.experts = Experts(c.num_experts, c.hidden_size, c.expert_ffn_size, dt,
                                   expert_format(c))
        else:
            self.mlp = DenseMLP(c.hidden_size, c.dense_ffn_size, dt)

    def pre_attention(self, x, positions):
        """x [B, T, h] -> q [B, T, Hq, d], k, v [B, T, Hkv, d]."""
        return self.attn.qkv(self.attn_norm(x), positions)

    def post_attention(self, x, o):
        """Residual after attention and the router. x [B, T, h], o [B, T, Hq, d] ->
        h [B, T, h], normed [N, h], weights [N, k], ids [N, k] (N = B·T; dense: k = 1)."""
        h = x + self.attn.out(o)
        normed = self.ffn_norm(h).reshape(-1, h.shape[-1])
        if self.moe:
            w, ids = self.router(normed)
        else:
            w = jnp.ones((normed.shape[0], 1), jnp.float32)
            ids = jnp.zeros((normed.shape[0], 1), jnp.int32)
        return h, normed, w, ids

    def ffn(self, h, normed, weights, ids, capacity: int | None = None):
        """h + FFN(normed) -> [B, T, h]."""
        if self.moe:
            y = self.experts(normed, weights, ids, capacity)
        else:
            y = self.mlp(normed)
        return h + y.reshape(h.shape).astype(h.dtype)

    def __call__(self, x, positions, mask):
        q, k, v = self.pre_attention(x, positions)
        h, normed, w, ids = self.post_attention(x, gqa_attention(q, k, v, mask))
        return self.ffn(h, normed, w, ids)


class MoETransformer(nn.Module):
    """Embedding → decoder layers → final norm → LM head (tied when the config says)."""

    cfg: ModelConfig

    def setup(self):
        c, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        self.embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=dt, param_dtype=dt)
        self.layers = [DecoderLayer(c, c.is_moe_layer(i)) for i in range(c.num_layers)]
        self.final_norm = Norm(c.hidden_size, c.norm_eps, c.norm_type, dt)
        if not c.tie_word_embeddings:
            self.lm_head = nn.Dense(c.vocab_size, use_bias=False, dtype=dt, param_dtype=dt)

    def embed_tokens(self, tokens):  # [B, T] int -> [B, T, h]
        return self.embed(tokens)

    def head(self, x):  # [B, T, h] -> float32 logits [B, T, vocab]
        x = self.final_norm(x)
        if self.cfg.tie_word_embeddings:
            return self.embed.attend(x).astype(jnp.float32)
        return self.lm_head(x).astype(jnp.float32)

    def __call__(self, tokens, attention_mask=None):
        """Full causal forward: tokens [B, T] (mask [B, T], 1 = real) -> logits."""
        if attention_mask is None:
            attention_mask = jnp.ones(tokens.shape, jnp.int32)
        positions, mask = prompt_positions(attention_mask), causal_mask(attention_mask)
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, positions, mask)
        return self.head(x)
