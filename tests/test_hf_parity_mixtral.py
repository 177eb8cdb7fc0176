"""Mixtral against the oracle: HF transformers' MixtralForCausalLM, float32."""

import numpy as np
import pytest

import moejax
from tests.oracle import hf_greedy, hf_logits, hf_model, rel_err, tokens_match

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
    tok = np.random.default_rng(1).integers(0, VOCAB, (3, 12))
    am = np.ones((3, 12), np.int32)
    if side == "left":
        am[0, :5], am[1, :2] = 0, 0
    else:
        am[0, 7:], am[2, 3:] = 0, 0
    real = am == 1
    assert rel_err(np.asarray(ours.logits(tok, am))[real], hf_logits(hf, tok, am)[real]) <= 1e-4


def _prompts(seed=2, lengths=(5, 13, 1, 8)):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, VOCAB, n)] for n in lengths]


def test_ragged_greedy_generation_matches_hf(pair):
    hf, ours = pair
    prompts = _prompts()
    outs = moejax.Engine(ours).generate(prompts, max_new_tokens=10)
    for p, o in zip(prompts, outs):
        theirs, scores = hf_greedy(hf, p, 10)
        assert tokens_match(o, theirs, scores), (p, o, theirs)


def test_ragged_batch_equals_each_prompt_alone(pair):
    _, ours = pair
    eng = moejax.Engine(ours)
    prompts = _prompts(seed=3)
    batch = eng.generate(prompts, max_new_tokens=6)
    assert batch == [eng.generate([p], max_new_tokens=6)[0] for p in prompts]


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
    hf.to(torch.bfloat16).save_pretrained(str(tmp_path))
    hf.to(torch.float32)
    m = moejax.load_pretrained(tmp_path, dtype="float32")
    assert m.config.dtype == "float32"
    tok = np.random.default_rng(5).integers(0, VOCAB, (1, 6))
    assert rel_err(m.logits(tok), ours.logits(tok)) < 0.05
    assert moejax.load_pretrained(tmp_path).config.dtype == "bfloat16"
