"""Hugging Face `config.json` → ModelConfig, one small parser per `model_type`."""

from __future__ import annotations

from typing import Any, Callable

from moejax.model_config.model import ModelConfig

_HF_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
              "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _dtype(d: dict) -> str:
    raw = d.get("dtype") or d.get("torch_dtype") or "bfloat16"
    raw = str(raw).replace("torch.", "")
    if raw not in _HF_DTYPES:
        raise ValueError(f"HF config: unsupported dtype {raw!r}")
    return _HF_DTYPES[raw]


def _rope_theta(d: dict, default: float = 10000.0) -> float:
    """transformers ≥ 5 nests it in `rope_parameters`; older configs keep `rope_theta`."""
    rp = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if rp.get("rope_type", rp.get("type", "default")) not in ("default", None):
        raise ValueError(f"HF config: rope scaling {rp!r} is not supported")
    return float(rp.get("rope_theta", d.get("rope_theta", default)))


def _need(d: dict, *keys: str) -> list[Any]:
    missing = [k for k in keys if d.get(k) is None]
    if missing:
        raise ValueError(f"HF config ({d.get('model_type')}): missing keys {missing}")
    return [d[k] for k in keys]


def _check_window(d: dict) -> None:
    w = d.get("sliding_window")
    if w is not None and d.get("use_sliding_window", True) and w < d.get(
            "max_position_embeddings", w + 1):
        raise ValueError(f"HF config: sliding_window={w} is not supported "
                         "(moejax attends over the full context)")


def _mixtral(d: dict, name: str) -> ModelConfig:
    _check_window(d)
    vocab, h, f, L, heads = _need(d, "vocab_size", "hidden_size", "intermediate_size",
                                  "num_hidden_layers", "num_attention_heads")
    kv = d.get("num_key_value_heads") or heads
    return ModelConfig(
        name=name, family="mixtral", vocab_size=vocab, hidden_size=h, expert_ffn_size=f,
        num_layers=L, num_heads=heads, num_kv_heads=kv,
        head_dim=d.get("head_dim") or h // heads,
        num_experts=d.get("num_local_experts", 8), top_k=d.get("num_experts_per_tok", 2),
        rope_theta=_rope_theta(d, 1e6), norm_eps=d.get("rms_norm_eps", 1e-5),
        max_positions=d.get("max_position_embeddings", 4096 * 32), dtype=_dtype(d),
        topk_norm_p=1.0, tie_word_embeddings=bool(d.get("tie_word_embeddings", False)))


# model_type → parser(config dict, name) -> ModelConfig
PARSERS: dict[str, Callable[[dict, str], ModelConfig]] = {"mixtral": _mixtral}


def config_from_hf(d: dict, name: str) -> ModelConfig:
    mt = d.get("model_type")
    if mt not in PARSERS:
        raise ValueError(f"unsupported model_type {mt!r}; supported: "
                         f"{', '.join(sorted(PARSERS))}")
    return PARSERS[mt](d, name)
