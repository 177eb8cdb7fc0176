"""DBRX against the oracle: HF transformers' DbrxForCausalLM, float32.

The tiny config (tests/oracle.py) clamps q, k, v at 0.5, so `clip_qkv` is exercised, and
keeps DBRX's own layout: fused Wqkv, bias-free LayerNorm, fused experts w1/v1/w2 [E·f, h].
"""

import copy

import numpy as np
import pytest

import moejax
from moejax.model import MoEModel
from tests.oracle import (ENGINES, TINY, batch_and_alone, bf16_logits_err,
                          greedy_mismatches, hf_logits, hf_model, padded_logits_err,
                          rel_err)

VOCAB = 101
CLIP = TINY["dbrx"][2]["attn_config"]["clip_qkv"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf, d = hf_model("dbrx", tmp_path_factory.mktemp("dbrx"))
    return hf, moejax.load_pretrained(d)


def test_config_is_dbrx_data(pair):
    _, ours = pair
    c = ours.config
    assert (c.family, c.norm_type, c.clip_qkv, c.topk_norm_p, c.qk_norm) == (
        "dbrx", "layernorm", CLIP, 1.0, False)
    assert (c.hidden_size, c.head_dim, c.num_kv_heads, c.num_experts, c.top_k,
            c.expert_ffn_size, c.dtype) == (48, 12, 2, 4, 2, 40, "float32")


def test_logits_match_hf(pair):
    hf, ours = pair
    tok = np.random.default_rng(0).integers(0, VOCAB, (3, 17))
    assert rel_err(ours.logits(tok), hf_logits(hf, tok)) <= 1e-4


def test_clamp_is_active_and_matters(pair):
    """HF's Wqkv output exceeds ±clip_qkv on the test tokens, and dropping the clamp on
    our side changes the logits far beyond the parity tolerance."""
    hf, ours = pair
    tok = np.random.default_rng(0).integers(0, VOCAB, (3, 17))
    seen = []
    h = hf.transformer.blocks[0].norm_attn_norm.attn.Wqkv.register_forward_hook(
        lambda mod, inp, out: seen.append(out.detach().abs()))
    try:
        hf_logits(hf, tok)
    finally:
        h.remove()
    assert float((seen[0] > CLIP).float().mean()) > 0.2
    unclipped = MoEModel(ours.config.replace(clip_qkv=None), ours.params)
    assert rel_err(unclipped.logits(tok), hf_logits(hf, tok)) > 1e-2


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_logits_match_hf(pair, side):
    hf, ours = pair
    assert padded_logits_err(hf, ours, VOCAB, side) <= 1e-4


@pytest.mark.parametrize("p", [2.0, None], ids=["p2", "raw"])
def test_expert_weight_norm_variants_match_hf(tmp_path, p):
    """moe_normalize_expert_weights: top-k probs divided by their 2-norm, or kept raw."""
    _, _, kw = TINY["dbrx"]
    hf, d = hf_model("dbrx", tmp_path, seed=1,
                     ffn_config={**kw["ffn_config"], "moe_normalize_expert_weights": p})
    ours = moejax.load_pretrained(d)
    assert ours.config.topk_norm_p == p
    tok = np.random.default_rng(6).integers(0, VOCAB, (2, 9))
    assert rel_err(ours.logits(tok), hf_logits(hf, tok)) <= 1e-4


@pytest.mark.parametrize("engine_kw", ENGINES.values(), ids=ENGINES.keys())
def test_ragged_greedy_generation_matches_hf(pair, engine_kw):
    hf, ours = pair
    assert not greedy_mismatches(hf, ours, VOCAB, engine_kw)


def test_ragged_batch_equals_each_prompt_alone(pair):
    _, ours = pair
    batch, alone = batch_and_alone(ours, VOCAB)
    assert batch == alone


def test_bfloat16_checkpoint_loads_close_to_float32(pair, tmp_path):
    import torch

    hf, ours = pair
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(str(tmp_path))
    m = moejax.load_pretrained(tmp_path, dtype="float32")
    tok = np.random.default_rng(5).integers(0, VOCAB, (1, 6))
    assert rel_err(m.logits(tok), ours.logits(tok)) < 0.05
    assert moejax.load_pretrained(tmp_path).config.dtype == "bfloat16"


def test_bfloat16_checkpoint_runs_like_hf_in_bfloat16(pair, tmp_path):
    """Loaded in bf16, moejax's logits against HF's bf16 model's (median over positions:
    a bf16 router near-tie may flip an expert at one position)."""
    hf, _ = pair
    assert bf16_logits_err(hf, tmp_path, VOCAB) < 0.03
