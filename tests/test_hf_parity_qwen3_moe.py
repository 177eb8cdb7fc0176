"""Qwen3-MoE against the oracle: HF transformers' Qwen3MoeForCausalLM, float32.

The tiny config (tests/oracle.py) has head_dim 16 ≠ hidden / heads = 12, per-head q/k
RMSNorm and 8 experts top-3 with `norm_topk_prob` (renormalised); the variants cover dense
layers chosen by `mlp_only_layers` and by `decoder_sparse_step` (the latter also with raw,
not renormalised, top-k probabilities) and tied embeddings.
"""

import copy

import numpy as np
import pytest

import moejax
from tests.oracle import (ENGINES, batch_and_alone, bf16_logits_err, greedy_mismatches,
                          hf_logits, hf_model, padded_logits_err, rel_err)

VOCAB = 101
# variant -> (HF overrides, expected ModelConfig.dense_layers, expected topk_norm_p)
VARIANTS = {
    "base": ({}, (), 1.0),
    "mlp_only_1": (dict(mlp_only_layers=[1]), (1,), 1.0),
    "sparse_step_2": (dict(decoder_sparse_step=2, norm_topk_prob=False), (0,), None),
    "tied": (dict(tie_word_embeddings=True), (), 1.0),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """variant -> (HF model, moejax model), built on first use."""
    cache = {}

    def get(name):
        if name not in cache:
            hf, d = hf_model("qwen3_moe", tmp_path_factory.mktemp(name), seed=len(cache),
                             **VARIANTS[name][0])
            cache[name] = hf, moejax.load_pretrained(d)
        return cache[name]
    return get


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_hf(models, variant):
    hf, ours = models(variant)
    _, dense, p = VARIANTS[variant]
    c = ours.config
    assert (c.family, c.qk_norm, c.head_dim, c.dense_layers, c.topk_norm_p) == (
        "qwen3_moe", True, 16, dense, p)
    assert c.dense_ffn_size == (56 if dense else 0)
    assert c.tie_word_embeddings == (variant == "tied")
    tok = np.random.default_rng(0).integers(0, VOCAB, (3, 17))
    assert rel_err(ours.logits(tok), hf_logits(hf, tok)) <= 1e-4


@pytest.mark.parametrize("variant", ["base", "mlp_only_1"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_logits_match_hf(models, side, variant):
    hf, ours = models(variant)
    assert padded_logits_err(hf, ours, VOCAB, side) <= 1e-4


@pytest.mark.parametrize("engine_kw", ENGINES.values(), ids=ENGINES.keys())
@pytest.mark.parametrize("variant", ["base", "mlp_only_1"])
def test_ragged_greedy_generation_matches_hf(models, variant, engine_kw):
    hf, ours = models(variant)
    assert not greedy_mismatches(hf, ours, VOCAB, engine_kw)


def test_ragged_batch_equals_each_prompt_alone(models):
    _, ours = models("base")
    batch, alone = batch_and_alone(ours, VOCAB)
    assert batch == alone


def test_bfloat16_checkpoint_loads_close_to_float32(models, tmp_path):
    import torch

    hf, ours = models("mlp_only_1")
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(str(tmp_path))
    m = moejax.load_pretrained(tmp_path, dtype="float32")
    tok = np.random.default_rng(5).integers(0, VOCAB, (1, 6))
    assert rel_err(m.logits(tok), ours.logits(tok)) < 0.05
    assert moejax.load_pretrained(tmp_path).config.dtype == "bfloat16"


def test_bfloat16_checkpoint_runs_like_hf_in_bfloat16(models, tmp_path):
    """Loaded in bf16, moejax's logits against HF's bf16 model's (median over positions:
    a bf16 router near-tie may flip an expert at one position)."""
    hf, _ = models("mlp_only_1")
    assert bf16_logits_err(hf, tmp_path, VOCAB) < 0.03
