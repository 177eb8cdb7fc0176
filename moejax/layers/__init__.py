"""Flax (linen) layers. They take arrays already on their device: offload is not here."""

from moejax.layers.attention import (AttentionProjections, cache_mask, causal_mask,
                                     gqa_attention, prompt_positions)
from moejax.layers.decoder import DecoderLayer, MoETransformer
from moejax.layers.experts import DenseMLP, Experts, expert_counts, moe_ffn, moe_ffn_reference
from moejax.layers.norm import Norm, layer_norm, rms_norm
from moejax.layers.rotary import RotaryEmbedding, apply_rotary
from moejax.layers.router import Router, route
