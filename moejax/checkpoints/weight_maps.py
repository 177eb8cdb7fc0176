"""Per-family maps from HF checkpoint tensor names to moejax parameter paths (data).

A map is `rules(cfg) -> {param path: Rule}`. A Rule names its source tensor(s), the shape
each source must have on disk, and a per-source transform; several sources (one per
expert) are stacked along a new leading axis, filled one at a time into the result.
HF stores Linear weights as [out, in]; moejax kernels are [in, out] (x @ W), hence `T`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from moejax.model_config.model import ModelConfig

Path = tuple[str, ...]


def T(a: np.ndarray) -> np.ndarray:
    """[out, in] → [in, out]."""
    return a.T


def ident(a: np.ndarray) -> np.ndarray:
    return a


@dataclass(frozen=True)
class Rule:
    sources: tuple[str, ...]
    src_shape: tuple[int, ...]
    transform: Callable[[np.ndarray], np.ndarray] = ident
    stacked: bool = False  # sources are experts, stacked along axis 0


# Buffers some checkpoints carry that are recomputed, not loaded.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _linear(name: str, out_dim: int, in_dim: int) -> Rule:
    return Rule((name,), (out_dim, in_dim), T)


def _vector(name: str, dim: int) -> Rule:
    return Rule((name,), (dim,))


def llama_style_attention(c: ModelConfig, p: str, lp: str) -> dict[Path, Rule]:
    """input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm."""
    h, d = c.hidden_size, c.head_dim
    r = {
        (lp, "attn_norm", "scale"): _vector(p + "input_layernorm.weight", h),
        (lp, "attn", "q_proj", "kernel"): _linear(p + "self_attn.q_proj.weight",
                                                  c.num_heads * d, h),
        (lp, "attn", "k_proj", "kernel"): _linear(p + "self_attn.k_proj.weight",
                                                  c.num_kv_heads * d, h),
        (lp, "attn", "v_proj", "kernel"): _linear(p + "self_attn.v_proj.weight",
                                                  c.num_kv_heads * d, h),
        (lp, "attn", "o_proj", "kernel"): _linear(p + "self_attn.o_proj.weight",
                                                  h, c.num_heads * d),
        (lp, "ffn_norm", "scale"): _vector(p + "post_attention_layernorm.weight", h),
    }
    if c.qk_norm:
        r[(lp, "attn", "q_norm", "scale")] = _vector(p + "self_attn.q_norm.weight", d)
        r[(lp, "attn", "k_norm", "scale")] = _vector(p + "self_attn.k_norm.weight", d)
    return r


def embeddings(c: ModelConfig, prefix: str = "model.") -> dict[Path, Rule]:
    r = {("embed", "embedding"): Rule((prefix + "embed_tokens.weight",),
                                      (c.vocab_size, c.hidden_size)),
         ("final_norm", "scale"): _vector(prefix + "norm.weight", c.hidden_size)}
    if not c.tie_word_embeddings:
        r[("lm_head", "kernel")] = _linear("lm_head.weight", c.vocab_size, c.hidden_size)
    return r


def stacked_experts(names: Callable[[int, str], str], c: ModelConfig, lp: str,
                    w: tuple[str, str, str] = ("w1", "w3", "w2")) -> dict[Path, Rule]:
    """Experts stored one tensor per expert and projection: names(e, proj) → tensor."""
    h, f, E = c.hidden_size, c.expert_ffn_size, c.num_experts
    shapes = {w[0]: (f, h), w[1]: (f, h), w[2]: (h, f)}
    return {(lp, "experts", ours): Rule(tuple(names(e, theirs) for e in range(E)),
                                        shapes[theirs], T, stacked=True)
            for ours, theirs in zip(("w1", "w3", "w2"), w)}


def mixtral_rules(c: ModelConfig) -> dict[Path, Rule]:
    r = embeddings(c)
    for i in range(c.num_layers):
        p, lp = f"model.layers.{i}.", f"layers_{i}"
        r.update(llama_style_attention(c, p, lp))
        moe = p + "block_sparse_moe."
        r[(lp, "router", "gate", "kernel")] = _linear(moe + "gate.weight", c.num_experts,
                                                      c.hidden_size)
        r.update(stacked_experts(lambda e, w: f"{moe}experts.{e}.{w}.weight", c, lp))
    return r


# family → rules(cfg)
WEIGHT_MAPS: dict[str, Callable[[ModelConfig], dict[Path, Rule]]] = {
    "mixtral": mixtral_rules,
}
