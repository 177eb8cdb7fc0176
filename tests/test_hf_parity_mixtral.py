"""Mixtral against the oracle: HF transformers' MixtralForCausalLM, float32."""

import copy

import numpy as np
import pytest

import moejax
from tests.oracle import (batch_and_alone, bf16_logits_err, greedy_mismatches, hf_logits,
                          hf_model, padded_logits_err, rel_err)

VOCAB = 101


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf, d = hf_model("mixtral", tmp_path_factory.mktemp("mixtral"))
    return hf, moejax.load_pretrained(d)


def test_logits_match_hf(pair):
    hf, ours = pair
    tok = np.random.default_rng(0).integers(0, VOCAB, (3, 17))
    assert rel_err(ours.logits(tok), hf_logits(hf, tok)) <= 1e-4


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_logits_match_hf(pair, side):
    hf, ours = pair
    assert padded_logits_err(hf, ours, VOCAB, side) <= 1e-4


def test_ragged_greedy_generation_matches_hf(pair):
    hf, ours = pair
    assert not greedy_mismatches(hf, ours, VOCAB, {})


def test_ragged_batch_equals_each_prompt_alone(pair):
    _, ours = pair
    batch, alone = batch_and_alone(ours, VOCAB)
    assert batch == alone


def test_sharded_checkpoint_loads_identically(pair, tmp_path):
    hf, ours = pair
    hf.save_pretrained(str(tmp_path), max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    tok = np.random.default_rng(4).integers(0, VOCAB, (1, 6))
    np.testing.assert_array_equal(moejax.load_pretrained(tmp_path).logits(tok),
                                  ours.logits(tok))


def test_bfloat16_checkpoint_loads_close_to_float32(pair, tmp_path):
    import torch

    hf, ours = pair
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(str(tmp_path))
    m = moejax.load_pretrained(tmp_path, dtype="float32")
    assert m.config.dtype == "float32"
    tok = np.random.default_rng(5).integers(0, VOCAB, (1, 6))
    assert rel_err(m.logits(tok), ours.logits(tok)) < 0.05
    assert moejax.load_pretrained(tmp_path).config.dtype == "bfloat16"


def test_bfloat16_checkpoint_runs_like_hf_in_bfloat16(pair, tmp_path):
    """Loaded in bf16, moejax's logits against HF's bf16 model's (median over positions:
    a bf16 router near-tie may flip an expert at one position)."""
    hf, _ = pair
    assert bf16_logits_err(hf, tmp_path, VOCAB) < 0.03
