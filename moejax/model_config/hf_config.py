"""Hugging Face `config.json` → ModelConfig fields as a dict, one parser per `model_type`
(`ModelConfig.from_hf` builds the config, so this module needs nothing from model.py)."""

from __future__ import annotations

import warnings
from typing import Any, Callable

_HF_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
              "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def named_dtype(d: dict):
    """The dtype config.json names (`dtype`, or the older `torch_dtype`), else None."""
    return d.get("dtype") or d.get("torch_dtype")


def _dtype(d: dict) -> str:
    raw = named_dtype(d) or "bfloat16"
    raw = str(raw).replace("torch.", "")
    if raw not in _HF_DTYPES:
        raise ValueError(f"HF config: unsupported dtype {raw!r}")
    return _HF_DTYPES[raw]


def _rope_theta(d: dict, default: float = 10000.0) -> float:
    """θ as transformers reads it (`convert_rope_params_to_dict`): from a non-empty
    `rope_scaling`, else `rope_parameters` (transformers ≥ 5), else the top-level
    `rope_theta`, else the family's default."""
    rp = d.get("rope_scaling") or d.get("rope_parameters") or {}
    if rp.get("rope_type", rp.get("type", "default")) not in ("default", None):
        raise ValueError(f"HF config: rope scaling {rp!r} is not supported")
    theta = rp.get("rope_theta")
    return float(theta if theta is not None else d.get("rope_theta") or default)


def _need(d: dict, *keys: str) -> list[Any]:
    missing = [k for k in keys if d.get(k) is None]
    if missing:
        raise ValueError(f"HF config ({d.get('model_type')}): missing keys {missing}")
    return [d[k] for k in keys]


def _check_window(d: dict, switch: bool = False) -> None:
    """Refuse a sliding window shorter than the context. With `switch` (Qwen3) the window
    applies only when `use_sliding_window` is true (HF's default: false); without it
    (Mixtral) HF applies `sliding_window` whatever that key says."""
    w = d.get("sliding_window")
    if w is not None and (not switch or d.get("use_sliding_window", False)) and w < d.get(
            "max_position_embeddings", w + 1):
        raise ValueError(f"HF config: sliding_window={w} is not supported "
                         "(moejax attends over the full context)")


def _silu_only(d: dict, key: str = "hidden_act") -> None:
    act = d.get(key, "silu")
    if act != "silu":
        raise ValueError(f"HF config ({d.get('model_type')}): {key} {act!r} is not "
                         "supported (silu only)")


def _mixtral(d: dict, name: str) -> dict:
    _check_window(d)
    _silu_only(d)
    vocab, h, f, L, heads = _need(d, "vocab_size", "hidden_size", "intermediate_size",
                                  "num_hidden_layers", "num_attention_heads")
    kv = d.get("num_key_value_heads") or heads
    return dict(
        name=name, family="mixtral", vocab_size=vocab, hidden_size=h, expert_ffn_size=f,
        num_layers=L, num_heads=heads, num_kv_heads=kv,
        head_dim=d.get("head_dim") or h // heads,
        num_experts=d.get("num_local_experts", 8), top_k=d.get("num_experts_per_tok", 2),
        rope_theta=_rope_theta(d, 1e6), norm_eps=d.get("rms_norm_eps", 1e-5),
        max_positions=d.get("max_position_embeddings", 4096 * 32), dtype=_dtype(d),
        topk_norm_p=1.0, tie_word_embeddings=bool(d.get("tie_word_embeddings", False)))


def _dbrx(d: dict, name: str) -> dict:
    """DBRX: sizes at the top level (`d_model`, `n_layers`, ...) and in `attn_config` and
    `ffn_config`; bias-free LayerNorm (eps 1e-5), Wqkv clamped to ±`clip_qkv`, top-k probs
    over their `moe_normalize_expert_weights`-norm. θ: `attn_config.rope_theta` (5e5 in the
    released checkpoints) wins, with a warning where transformers 5's rotary, which reads
    `rope_parameters` (default 1e4), would use another θ: moejax then departs from it."""
    attn, ffn = d.get("attn_config") or {}, d.get("ffn_config") or {}
    # transformers' attribute_map aliases (hidden_size → d_model, ...) may appear instead.
    alias = {"d_model": "hidden_size", "n_layers": "num_hidden_layers",
             "n_heads": "num_attention_heads", "max_seq_len": "max_position_embeddings"}
    d = {**{k: d[v] for k, v in alias.items() if d.get(k) is None and v in d}, **d}
    vocab, h, L, heads = _need(d, "vocab_size", "d_model", "n_layers", "n_heads")
    f, E, k = _need({**ffn, "model_type": "dbrx ffn_config"}, "ffn_hidden_size",
                    "moe_num_experts", "moe_top_k")
    act = (ffn.get("ffn_act_fn") or {"name": "silu"}).get("name", "silu")
    if act != "silu":
        raise ValueError(f"HF config (dbrx): ffn_act_fn {act!r} is not supported (silu only)")
    if h % heads:
        raise ValueError(f"HF config (dbrx): d_model={h} is not a multiple of n_heads={heads}")
    if d.get("tie_word_embeddings"):
        raise ValueError("HF config (dbrx): tie_word_embeddings=true is not supported "
                         "(transformers rejects it for DBRX too)")
    theta = _rope_theta(d, 10000.0)  # what transformers 5's rotary uses
    if attn.get("rope_theta") is not None:
        if float(attn["rope_theta"]) != theta:
            warnings.warn(f"HF config (dbrx): attn_config.rope_theta={attn['rope_theta']} "
                          f"and the rope θ transformers 5 would use ({theta:g}, from "
                          "rope_parameters or its default) disagree; using attn_config's")
        theta = float(attn["rope_theta"])
    p = ffn.get("moe_normalize_expert_weights", 1.0)
    return dict(
        name=name, family="dbrx", vocab_size=vocab, hidden_size=h, expert_ffn_size=f,
        num_layers=L, num_heads=heads,
        num_kv_heads=attn.get("kv_n_heads") or d.get("num_key_value_heads") or 1,
        head_dim=h // heads, num_experts=E, top_k=k, rope_theta=theta, norm_eps=1e-5,
        max_positions=d.get("max_seq_len") or 2048, dtype=_dtype(d),
        norm_type="layernorm", clip_qkv=None if attn.get("clip_qkv") is None
        else float(attn["clip_qkv"]), topk_norm_p=None if p is None else float(p),
        tie_word_embeddings=False)


def qwen3_moe_dense_layers(num_layers: int, mlp_only_layers, decoder_sparse_step: int
                           ) -> tuple[int, ...]:
    """Layers with a dense MLP (HF Qwen3MoeDecoderLayer): listed in `mlp_only_layers`, or
    i with (i + 1) % decoder_sparse_step != 0."""
    only = set(mlp_only_layers or ())
    return tuple(i for i in range(num_layers)
                 if i in only or (i + 1) % decoder_sparse_step != 0)


def _qwen3_moe(d: dict, name: str) -> dict:
    """Qwen3-MoE: per-head q/k RMSNorm, `head_dim` independent of hidden size, optional
    top-k renormalisation (`norm_topk_prob`), no shared experts; dense layers by
    `mlp_only_layers` / `decoder_sparse_step` with `intermediate_size`."""
    _check_window(d, switch=True)
    if d.get("attention_bias"):
        raise ValueError("HF config (qwen3_moe): attention_bias=true is not supported")
    _silu_only(d)
    vocab, h, f, L, heads = _need(d, "vocab_size", "hidden_size", "moe_intermediate_size",
                                  "num_hidden_layers", "num_attention_heads")
    # transformers 5 writes `num_local_experts`; released configs say `num_experts`.
    E = d.get("num_experts", d.get("num_local_experts", 128))
    if not E:
        raise ValueError("HF config (qwen3_moe): num_experts=0 (a dense model) is not "
                         "supported")
    step = d.get("decoder_sparse_step", 1)
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"HF config (qwen3_moe): decoder_sparse_step={step!r} must be a "
                         "positive integer")
    dense = qwen3_moe_dense_layers(L, d.get("mlp_only_layers"), step)
    if len(dense) == L:
        raise ValueError(f"HF config (qwen3_moe): every layer is dense "
                         f"(mlp_only_layers={d.get('mlp_only_layers')}, "
                         f"decoder_sparse_step={step})")
    dense_f = _need(d, "intermediate_size")[0] if dense else 0
    return dict(
        name=name, family="qwen3_moe", vocab_size=vocab, hidden_size=h, expert_ffn_size=f,
        num_layers=L, num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or h // heads, num_experts=E,
        top_k=d.get("num_experts_per_tok", 8), rope_theta=_rope_theta(d, 10000.0),
        norm_eps=d.get("rms_norm_eps", 1e-6),
        max_positions=d.get("max_position_embeddings", 32768), dtype=_dtype(d),
        qk_norm=True, topk_norm_p=1.0 if d.get("norm_topk_prob", False) else None,
        dense_layers=dense, dense_ffn_size=dense_f,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)))


# model_type → parser(config dict, name) -> ModelConfig fields
PARSERS: dict[str, Callable[[dict, str], dict]] = {
    "mixtral": _mixtral, "dbrx": _dbrx, "qwen3_moe": _qwen3_moe}


# Keys the parsers read as numbers (top level or DBRX's attn_config / ffn_config).
_INT_KEYS = frozenset((
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "num_local_experts", "num_experts", "num_experts_per_tok", "max_position_embeddings",
    "decoder_sparse_step", "sliding_window", "d_model", "n_layers", "n_heads",
    "max_seq_len", "ffn_hidden_size", "moe_num_experts", "moe_top_k", "kv_n_heads"))
_FLOAT_KEYS = frozenset(("rope_theta", "rms_norm_eps", "clip_qkv",
                         "moe_normalize_expert_weights"))


def _check_types(d: Any, where: str = "config.json") -> None:
    """ValueError naming the first field whose JSON type the parsers cannot use (a
    string where a size belongs, a list where an object belongs)."""
    if not isinstance(d, dict):
        raise ValueError(f"HF config: {where} must be a JSON object, got "
                         f"{type(d).__name__} {str(d)[:60]}")
    for k, v in d.items():
        if v is None:
            continue
        if k in _INT_KEYS and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"HF config: {k}={v!r} in {where} must be an integer")
        if k in _FLOAT_KEYS and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ValueError(f"HF config: {k}={v!r} in {where} must be a number")
        if k in ("attn_config", "ffn_config", "rope_parameters", "rope_scaling",
                 "ffn_act_fn"):
            _check_types(v, f"{where} {k}")
        if k == "mlp_only_layers" and (not isinstance(v, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in v)):
            raise ValueError(f"HF config: {k}={v!r} in {where} must be a list of layer "
                             "indices")


def hf_fields(d: dict, name: str) -> dict:
    """The ModelConfig fields a parsed `config.json` describes (ValueError if unsupported)."""
    _check_types(d)
    mt = d.get("model_type")
    if mt not in PARSERS:
        raise ValueError(f"unsupported model_type {mt!r}; supported: "
                         f"{', '.join(sorted(PARSERS))}")
    return PARSERS[mt](d, name)
