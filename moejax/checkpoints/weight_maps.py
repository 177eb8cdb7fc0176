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
    rows: tuple[int, int] | None = None  # read only these rows [lo, hi) of the source


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


def dbrx_rules(c: ModelConfig) -> dict[Path, Rule]:
    """DBRX (`transformer.` prefix). Fused Wqkv [h + 2·kv·d, h] is split into q, k, v,
    each reading only its own rows (so the fused tensor is read once, not three times);
    experts are fused per layer as `ffn.experts.mlp.{w1, v1, w2}`, each [E·f, h] (the layout
    transformers 5 keeps in memory and writes to disk): expert e computes
    (silu(x·w1_eᵀ) ⊙ x·v1_eᵀ)·w2_e, so w1, v1 are transposed and w2 is taken as is."""
    h, d, E, f = c.hidden_size, c.head_dim, c.num_experts, c.expert_ffn_size
    q, kv = c.num_heads * d, c.num_kv_heads * d
    r = {("embed", "embedding"): Rule(("transformer.wte.weight",), (c.vocab_size, h)),
         ("final_norm", "scale"): _vector("transformer.norm_f.weight", h),
         ("lm_head", "kernel"): _linear("lm_head.weight", c.vocab_size, h)}
    gate_up = lambda a: a.reshape(E, f, h).transpose(0, 2, 1)  # [E·f, h] -> [E, h, f]
    down = lambda a: a.reshape(E, f, h)  # [E·f, h] -> [E, f, h]
    for i in range(c.num_layers):
        p, lp = f"transformer.blocks.{i}.", f"layers_{i}"
        na, wqkv = p + "norm_attn_norm.", p + "norm_attn_norm.attn.Wqkv.weight"
        fused = (q + 2 * kv, h)
        r.update({
            (lp, "attn_norm", "scale"): _vector(na + "norm_1.weight", h),
            (lp, "attn", "q_proj", "kernel"): Rule((wqkv,), fused, T, rows=(0, q)),
            (lp, "attn", "k_proj", "kernel"): Rule((wqkv,), fused, T, rows=(q, q + kv)),
            (lp, "attn", "v_proj", "kernel"): Rule((wqkv,), fused, T,
                                                   rows=(q + kv, q + 2 * kv)),
            (lp, "attn", "o_proj", "kernel"): _linear(na + "attn.out_proj.weight", h, q),
            (lp, "ffn_norm", "scale"): _vector(na + "norm_2.weight", h),
            (lp, "router", "gate", "kernel"): _linear(p + "ffn.router.layer.weight", E, h),
        })
        mlp = p + "ffn.experts.mlp."
        for ours, theirs, tf in (("w1", "w1", gate_up), ("w3", "v1", gate_up),
                                 ("w2", "w2", down)):
            r[(lp, "experts", ours)] = Rule((mlp + theirs,), (E * f, h), tf)
    return r


def dense_mlp(c: ModelConfig, p: str, lp: str,
              w: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
              ) -> dict[Path, Rule]:
    """A dense SwiGLU MLP stored as three Linears `{p}{gate, up, down}.weight`."""
    h, f = c.hidden_size, c.dense_ffn_size
    return {(lp, "mlp", "w1"): _linear(f"{p}{w[0]}.weight", f, h),
            (lp, "mlp", "w3"): _linear(f"{p}{w[1]}.weight", f, h),
            (lp, "mlp", "w2"): _linear(f"{p}{w[2]}.weight", h, f)}


def qwen3_moe_rules(c: ModelConfig) -> dict[Path, Rule]:
    """Qwen3-MoE: Llama-style attention with q/k norms; MoE layers hold `mlp.gate` and
    per-expert `mlp.experts.{e}.{gate,up,down}_proj` (transformers 5 fuses them in memory
    but `save_pretrained` writes this per-expert layout); dense layers `mlp.*_proj`."""
    r = embeddings(c)
    for i in range(c.num_layers):
        p, lp = f"model.layers.{i}.", f"layers_{i}"
        r.update(llama_style_attention(c, p, lp))
        if c.is_moe_layer(i):
            r[(lp, "router", "gate", "kernel")] = _linear(p + "mlp.gate.weight",
                                                          c.num_experts, c.hidden_size)
            r.update(stacked_experts(lambda e, w: f"{p}mlp.experts.{e}.{w}.weight", c, lp,
                                     ("gate_proj", "up_proj", "down_proj")))
        else:
            r.update(dense_mlp(c, p + "mlp.", lp))
    return r


# family → rules(cfg)
WEIGHT_MAPS: dict[str, Callable[[ModelConfig], dict[Path, Rule]]] = {
    "mixtral": mixtral_rules,
    "dbrx": dbrx_rules,
    "qwen3_moe": qwen3_moe_rules,
}
