"""Model architecture as data: one frozen dataclass per MoE transformer.

A family (Mixtral, DBRX, Qwen3-MoE) is a set of field values — norm type, QKV
clipping, per-head q/k norms, top-k renormalisation, dense layers — never an `if` on a
model name inside a layer. Derived sizes (bytes, FLOPs) are methods here and are used by
the runtime, the performance model and the tests alike.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from moejax.model_config.hf_config import hf_fields

# Bytes per element of the dtypes moejax stores weights and KV caches in.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}
NORM_TYPES = ("rmsnorm", "layernorm")
# Weight-only quantized expert formats (moejax/quant.py): bits per stored weight.
EXPERT_BITS = {"int8": 8, "int4": 4}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only MoE transformer (sizes in elements)."""

    name: str
    family: str  # "mixtral" | "dbrx" | "qwen3_moe": selects the checkpoint weight map
    vocab_size: int
    hidden_size: int
    expert_ffn_size: int  # intermediate size of one expert (f)
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_positions: int = 4096
    dtype: str = "bfloat16"
    # --- family switches (data, read by generic layers) ---
    norm_type: str = "rmsnorm"  # "rmsnorm" | "layernorm" (LayerNorm without bias, DBRX)
    clip_qkv: float | None = None  # clamp q, k, v to [-c, c] after projection (DBRX)
    qk_norm: bool = False  # per-head RMSNorm of q and k before rotary (Qwen3)
    topk_norm_p: float | None = 1.0  # renormalise top-k probs by their p-norm; None: keep
    dense_layers: tuple[int, ...] = ()  # layers with a dense SwiGLU MLP instead of experts
    dense_ffn_size: int = 0  # intermediate size of those dense MLPs
    tie_word_embeddings: bool = False
    # --- expert storage (moejax/quant.py): None = the model dtype; "int8" | "int4":
    # group-wise symmetric, groups of `expert_group_size` along the reduction axis,
    # scales in the model dtype ---
    expert_dtype: str | None = None
    expert_group_size: int = 64

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "expert_ffn_size", "num_layers",
                    "num_heads", "num_kv_heads", "head_dim", "num_experts", "top_k",
                    "max_positions")
        bad = [f"{k}={getattr(self, k)!r}" for k in positive
               if not isinstance(getattr(self, k), (int, np.integer))
               or getattr(self, k) < 1]
        if bad:
            raise ValueError(f"ModelConfig {self.name!r}: must be positive integers: "
                             + ", ".join(bad))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig {self.name!r}: num_heads={self.num_heads} is not "
                             f"a multiple of num_kv_heads={self.num_kv_heads}")
        if self.top_k > self.num_experts:
            raise ValueError(f"ModelConfig {self.name!r}: top_k={self.top_k} exceeds "
                             f"num_experts={self.num_experts}")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig {self.name!r}: head_dim={self.head_dim} must be "
                             "even for rotary embeddings")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"ModelConfig {self.name!r}: dtype={self.dtype!r} not in "
                             "('float32', 'bfloat16', 'float16')")
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"ModelConfig {self.name!r}: norm_type={self.norm_type!r} not "
                             f"in {NORM_TYPES}")
        if not self.rope_theta > 0 or not self.norm_eps > 0:
            raise ValueError(f"ModelConfig {self.name!r}: rope_theta={self.rope_theta} and "
                             f"norm_eps={self.norm_eps} must be > 0")
        if self.clip_qkv is not None and not self.clip_qkv > 0:
            raise ValueError(f"ModelConfig {self.name!r}: clip_qkv={self.clip_qkv} must be "
                             "> 0 or None")
        out = [i for i in self.dense_layers if not 0 <= i < self.num_layers]
        if out:
            raise ValueError(f"ModelConfig {self.name!r}: dense_layers {out} outside "
                             f"[0, {self.num_layers})")
        if self.dense_layers and self.dense_ffn_size < 1:
            raise ValueError(f"ModelConfig {self.name!r}: dense_layers given but "
                             f"dense_ffn_size={self.dense_ffn_size}")
        self._check_expert_format()

    def _check_expert_format(self) -> None:
        if self.expert_dtype is not None and self.expert_dtype not in EXPERT_BITS:
            raise ValueError(f"ModelConfig {self.name!r}: expert_dtype="
                             f"{self.expert_dtype!r} not in (None, 'int8', 'int4')")
        g = self.expert_group_size
        if isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 1:
            raise ValueError(f"ModelConfig {self.name!r}: expert_group_size={g!r} must be a "
                             "positive integer")
        if self.expert_dtype == "int4" and (g % 2 or self.hidden_size % 2
                                            or self.expert_ffn_size % 2):
            raise ValueError(f"ModelConfig {self.name!r}: int4 experts pack two rows per "
                             f"byte: expert_group_size={g}, hidden_size={self.hidden_size} "
                             f"and expert_ffn_size={self.expert_ffn_size} must be even")

    # ------------------------------------------------------------------ basics
    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def bytes_per_param(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def group_size(self) -> int:
        """GQA group size g = heads / kv_heads."""
        return self.num_heads // self.num_kv_heads

    def is_moe_layer(self, layer: int) -> bool:
        return layer not in self.dense_layers

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - len(self.dense_layers)

    # ------------------------------------------------------------ parameters
    def expert_params(self) -> int:
        """One expert's SwiGLU weights: w1, w3 [h, f] and w2 [f, h] → 3·h·f."""
        return 3 * self.hidden_size * self.expert_ffn_size

    def attention_params(self) -> int:
        """q, k, v, o projections (+ q/k norm scales) of one layer."""
        h, d = self.hidden_size, self.head_dim
        n = 2 * h * self.num_heads * d + 2 * h * self.num_kv_heads * d
        return n + (2 * d if self.qk_norm else 0)

    def layer_non_expert_params(self, layer: int = 0) -> int:
        """Attention + two norms + router (or dense MLP) of one layer."""
        n = self.attention_params() + 2 * self.hidden_size
        if self.is_moe_layer(layer):
            return n + self.hidden_size * self.num_experts
        return n + 3 * self.hidden_size * self.dense_ffn_size

    def embedding_params(self) -> int:
        """Token embedding + LM head (shared when tied) + final norm."""
        emb = self.vocab_size * self.hidden_size
        return emb * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    def total_params(self) -> int:
        per_layer = sum(self.layer_non_expert_params(i) for i in range(self.num_layers))
        return (self.embedding_params() + per_layer
                + self.num_moe_layers * self.num_experts * self.expert_params())

    # ----------------------------------------------------------------- bytes
    @property
    def expert_quantized(self) -> bool:
        return self.expert_dtype is not None

    @property
    def expert_bits(self) -> int:
        """Bits per stored expert weight (the model dtype's when not quantized)."""
        return EXPERT_BITS.get(self.expert_dtype, 8 * self.bytes_per_param)

    def expert_col_align(self) -> int:
        """Granularity of FFN-column splits (resident columns, page starts): one w2 group
        (w2's reduction axis is f), 1 when experts are not quantized."""
        return self.expert_group_size if self.expert_quantized else 1

    def expert_cols_bytes(self, cols: int) -> int:
        """Bytes of `cols` FFN columns of one layer's w1, w3, w2 over all E experts, the
        block starting on a group boundary: float 3·E·h·c·b; quantized
        E·(3·h·c·bits/8 + s·(2·⌈h/G⌉·c + ⌈c/G⌉·h)) — w1, w3 have ⌈h/G⌉ scales per
        column, w2 ⌈c/G⌉ per output (s: bytes of a scale, the model dtype's)."""
        e, h, c = self.num_experts, self.hidden_size, int(cols)
        if not self.expert_quantized:
            return 3 * e * h * c * self.bytes_per_param
        g, s = self.expert_group_size, self.bytes_per_param
        return e * (3 * h * c * self.expert_bits // 8
                    + s * (2 * -(-h // g) * c + -(-c // g) * h))

    def expert_bytes(self) -> int:
        """Bytes of one expert of one layer (quantized: codes + scales)."""
        return self.expert_cols_bytes(self.expert_ffn_size) // self.num_experts

    def expert_bytes_per_layer(self) -> int:
        """W_E of docs/design.md §4: all experts of one MoE layer, 2·3·h·f·E in bf16."""
        return self.num_experts * self.expert_bytes()

    def expert_col_bytes(self) -> float:
        """One FFN column of a layer's w1, w3, w2 over all experts: 3·E·h·bytes (int);
        quantized, amortised over one group of columns (a float)."""
        a = self.expert_col_align()
        return self.expert_cols_bytes(a) / a if a > 1 else self.expert_cols_bytes(1)

    def page_cols(self, page_bytes: int) -> int:
        """FFN columns of one streamed page (host_offload/weight_store.py): the most whole
        groups of `expert_col_align` columns whose bytes fit `page_bytes`, at least one
        group, at most f."""
        a, f = self.expert_col_align(), self.expert_ffn_size
        return min(f, max(a, int(page_bytes) // self.expert_cols_bytes(a) * a))

    def page_nbytes(self, page_bytes: int) -> int:
        """Bytes of one full streamed page under the `page_bytes` knob."""
        return self.expert_cols_bytes(self.page_cols(page_bytes))

    def expert_bytes_total(self) -> int:
        return self.num_moe_layers * self.expert_bytes_per_layer()

    def non_expert_bytes(self) -> int:
        """Everything that stays resident on the device: attention, norms, routers,
        dense MLPs, embedding and LM head."""
        return (self.total_params() - self.num_moe_layers * self.num_experts
                * self.expert_params()) * self.bytes_per_param

    def non_expert_bytes_per_device(self, devices: int = 1) -> int:
        """`non_expert_bytes` one of k tensor-parallel devices holds: the q, k, v, o
        projections split by heads (1/k each), everything else replicated."""
        proj = self.num_layers * self.attention_proj_params() * self.bytes_per_param
        return self.non_expert_bytes() - proj + proj // devices

    def weight_bytes(self) -> int:
        return self.non_expert_bytes() + self.expert_bytes_total()

    def kv_bytes_per_token_per_layer(self, kv_bytes_per_elem: int | None = None) -> int:
        """k and v of one token in one layer: 2·kv_heads·head_dim·bytes."""
        b = self.bytes_per_param if kv_bytes_per_elem is None else kv_bytes_per_elem
        return 2 * self.num_kv_heads * self.head_dim * b

    def kv_bytes_per_token(self, kv_bytes_per_elem: int | None = None) -> int:
        """KV cache of one token across all layers."""
        return self.num_layers * self.kv_bytes_per_token_per_layer(kv_bytes_per_elem)

    # ----------------------------------------------------------------- FLOPs
    def expert_flops_per_token(self) -> int:
        """FLOPs of one token's MoE FFN in one layer: top_k experts × 2·3·h·f."""
        return self.top_k * 2 * self.expert_params()

    def attention_proj_params(self) -> int:
        """Params of one layer's q, k, v, o projections (its attention less any q/k norms)."""
        return self.attention_params() - (2 * self.head_dim if self.qk_norm else 0)

    def attention_proj_flops_per_token(self) -> int:
        """q, k, v, o projections of one token in one layer: 2 × their params."""
        return 2 * self.attention_proj_params()

    def attention_core_flops(self, context_len: int) -> int:
        """Scores + weighted sum of one query token over `context_len` keys, one layer:
        heads·context·(2·head_dim + 2) (MoE-Lightning's count incl. softmax)."""
        return self.num_heads * context_len * (2 * self.head_dim + 2)

    # ------------------------------------------------------------------- HF
    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any],
                name: str | None = None) -> "ModelConfig":
        """Build from a Hugging Face `config.json` (a directory, a file or a dict)."""
        if isinstance(path_or_dict, Mapping):
            return cls(**hf_fields(dict(path_or_dict), name or "<dict>"))
        d, folder = read_hf_config(path_or_dict)
        return cls(**hf_fields(d, name or folder))


def read_hf_config(path: str | os.PathLike) -> tuple[Any, str]:
    """(parsed `config.json`, the name of its directory) of a checkpoint directory or a
    config file: a model is named "Mixtral-8x7B-v0.1", not by its whole path."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError("ModelConfig.from_hf takes a config.json path or a dict, got "
                         f"{type(path).__name__} {str(path)[:60]}")
    where = os.fspath(path)
    file = os.path.join(where, "config.json") if os.path.isdir(where) else where
    try:
        with open(file) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read HF config {file}: {e}") from None
    return d, os.path.basename(os.path.dirname(os.path.abspath(file))) or where


# ------------------------------------------------------------------ presets
_PRESETS: dict[str, ModelConfig] = {
    # docs/design.md §1; HF mistralai/Mixtral-8x7B-v0.1 config.json.
    "mixtral_8x7b": ModelConfig(
        name="mixtral_8x7b", family="mixtral", vocab_size=32000, hidden_size=4096,
        expert_ffn_size=14336, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
        num_experts=8, top_k=2, rope_theta=1e6, norm_eps=1e-5, max_positions=32768),
    # docs/design.md §1; HF mistralai/Mixtral-8x22B-v0.1 config.json.
    "mixtral_8x22b": ModelConfig(
        name="mixtral_8x22b", family="mixtral", vocab_size=32768, hidden_size=6144,
        expert_ffn_size=16384, num_layers=56, num_heads=48, num_kv_heads=8, head_dim=128,
        num_experts=8, top_k=2, rope_theta=1e6, norm_eps=1e-5, max_positions=65536),
    # docs/design.md §1; HF databricks/dbrx-base config.json (attn_config / ffn_config).
    "dbrx": ModelConfig(
        name="dbrx", family="dbrx", vocab_size=100352, hidden_size=6144,
        expert_ffn_size=10752, num_layers=40, num_heads=48, num_kv_heads=8, head_dim=128,
        num_experts=16, top_k=4, rope_theta=5e5, norm_eps=1e-5, max_positions=32768,
        norm_type="layernorm", clip_qkv=8.0, topk_norm_p=1.0),
    # HF Qwen/Qwen3-30B-A3B config.json: head_dim 128 ≠ hidden/heads = 64, 128 small experts
    # (moe_intermediate_size 768) top-8 renormalised, q/k RMSNorm, every layer sparse.
    "qwen3_30b_a3b": ModelConfig(
        name="qwen3_30b_a3b", family="qwen3_moe", vocab_size=151936, hidden_size=2048,
        expert_ffn_size=768, num_layers=48, num_heads=32, num_kv_heads=4, head_dim=128,
        num_experts=128, top_k=8, rope_theta=1e6, norm_eps=1e-6, max_positions=40960,
        qk_norm=True, topk_norm_p=1.0, tie_word_embeddings=False),
    # Tiny shapes for tests and the CPU demo.
    "tiny_mixtral": ModelConfig(
        name="tiny_mixtral", family="mixtral", vocab_size=128, hidden_size=64,
        expert_ffn_size=96, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        num_experts=4, top_k=2, rope_theta=1e4, norm_eps=1e-5, max_positions=256,
        dtype="float32"),
    # The "tiny Mixtral" of `experiments.bench_hf` (against HF): 4 layers, hidden 1024.
    "mixtral_4l_1024": ModelConfig(
        name="mixtral_4l_1024", family="mixtral", vocab_size=32000, hidden_size=1024,
        expert_ffn_size=3584, num_layers=4, num_heads=16, num_kv_heads=4, head_dim=64,
        num_experts=8, top_k=2, rope_theta=1e6, norm_eps=1e-5, max_positions=4096,
        dtype="float32"),
}


def register_model(cfg: ModelConfig) -> None:
    """Add a preset (used by family modules to contribute their own)."""
    _PRESETS[cfg.name] = cfg


def model_names() -> list[str]:
    return sorted(_PRESETS)


def get_model(name: str) -> ModelConfig:
    """Preset by name; an unknown name raises ValueError listing the valid ones."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(model_names())}")
    return _PRESETS[name]
