"""Engine.generate input checking and stopping rules (public API only)."""

import numpy as np
import pytest

import moejax
from moejax.model import MoEModel


@pytest.fixture(scope="module")
def engine():
    return moejax.Engine(MoEModel.random(moejax.get_model("tiny_mixtral"), seed=1))


@pytest.mark.parametrize("prompts,max_new,needle", [
    ([[1, 2], []], 3, "prompt 1 is empty"),
    ([[1, 128]], 3, "token id 128"),
    ([[1, -1]], 3, "token id -1"),
    ([[1] * 250], 10, "exceeds max_positions 256"),
    ([[1, 2]], 0, "max_new_tokens must be an integer >= 1, got 0"),
    ([], 3, "non-empty list"),
    ([1, 2, 3], 3, "prompt 0 must be a list of token ids, got int 1"),
    ([[1, True]], 3, "token id True"),
])
def test_bad_requests_raise_and_engine_stays_usable(engine, prompts, max_new, needle):
    with pytest.raises(ValueError, match=needle):
        engine.generate(prompts, max_new)
    assert len(engine.generate([[1, 2, 3]], 2)[0]) == 2


def test_prompt_plus_new_tokens_may_fill_every_position(engine):
    assert len(engine.generate([[1] * 250], 6)[0]) == 6  # 256 = max_positions
    with pytest.raises(ValueError, match="250 tokens \\+ max_new_tokens 7 exceeds"):
        engine.generate([[1] * 250], 7)


def test_prompt_logits_take_a_prompt_of_max_positions(engine):
    logits = engine.prompt_logits([[1] * 256])
    assert logits.shape == (1, 256, 128)
    with pytest.raises(ValueError, match="257 tokens exceed max_positions 256"):
        engine.prompt_logits([[1] * 257])


def test_prompts_may_be_any_sequence_of_ids(engine):
    assert engine.generate([range(1, 4)], 2) == engine.generate([[1, 2, 3]], 2)


def test_rows_have_exactly_max_new_tokens(engine):
    outs = engine.generate([[5], [1, 2, 3, 4, 5, 6, 7]], max_new_tokens=9)
    assert [len(o) for o in outs] == [9, 9]


def test_eos_stops_a_row_early_and_is_included(engine):
    full = engine.generate([[3, 4, 5]], max_new_tokens=8)[0]
    eos = full[2]
    stopped = engine.generate([[3, 4, 5]], max_new_tokens=8, eos_token_id=eos)[0]
    assert stopped == full[:full.index(eos) + 1]
    assert engine.last_run.steps == full.index(eos) + 1  # the run itself stopped there


def test_logits_reject_out_of_vocab_tokens(engine):
    with pytest.raises(ValueError, match="token id 999"):
        engine.model.logits(np.array([[1, 999]]))


def test_any_of_a_list_of_eos_ids_stops_a_row(engine):
    full = engine.generate([[3, 4, 5]], max_new_tokens=8)[0]
    stopped = engine.generate([[3, 4, 5]], max_new_tokens=8,
                              eos_token_id=[full[3], full[1]])[0]
    assert stopped == full[:min(full.index(full[3]), full.index(full[1])) + 1]


def test_eos_ids_may_be_a_numpy_array(engine):
    full = engine.generate([[3, 4, 5]], max_new_tokens=8)[0]
    stopped = engine.generate([[3, 4, 5]], max_new_tokens=8,
                              eos_token_id=np.array([full[3], full[1]]))[0]
    assert stopped == full[:min(full.index(full[3]), full.index(full[1])) + 1]
    scalar = engine.generate([[3, 4, 5]], max_new_tokens=8, eos_token_id=np.array(full[2]))
    assert scalar[0] == full[:full.index(full[2]) + 1]


@pytest.mark.parametrize("eos", ["2", 1.5, True, [2, 999]])
def test_bad_eos_ids_are_refused(engine, eos):
    with pytest.raises(ValueError, match="eos_token_id"):
        engine.generate([[1, 2]], 3, eos_token_id=eos)


def test_progress_must_be_callable(engine):
    with pytest.raises(ValueError, match="progress must be callable"):
        engine.generate([[1, 2]], 3, progress=5)


@pytest.mark.parametrize("tokens,mask,needle", [
    (np.zeros((1, 0), int), None, "must not be empty"),
    (np.zeros((0, 3), int), None, "must not be empty"),
    (np.ones((1, 3), int), np.full((1, 3), 2), "only 0 and 1"),
    (np.ones((1, 3), int), np.array([[1, 0, 1]]), "row 0 has no token or a hole"),
    (np.ones((2, 3), int), np.array([[1, 1, 1], [0, 0, 0]]), "row 1 has no token"),
])
def test_logits_reject_empty_input_and_bad_masks(engine, tokens, mask, needle):
    with pytest.raises(ValueError, match=needle):
        engine.model.logits(tokens, mask)


def test_last_run_fits_the_routing_of_each_stage(engine):
    engine.generate([[1, 2, 3, 4]] * 4, 3)
    run = engine.last_run
    assert run.decode_expert_imbalance is not None
    assert run.imbalance == {"prefill": run.expert_imbalance,
                             "decode": run.decode_expert_imbalance}
    engine.generate([[1, 2, 3, 4]] * 4, 1)  # prefill only: no decode routing seen
    assert engine.last_run.decode_expert_imbalance is None
    assert engine.last_run.imbalance["decode"] == engine.last_run.expert_imbalance


def _tiny_params(edit):
    m = MoEModel.random(moejax.get_model("tiny_mixtral").replace(num_layers=2), seed=1)
    edit(m.params)
    return m


@pytest.mark.parametrize("edit,needle", [
    (lambda p: p["layers_0"]["attn"]["q_proj"].__setitem__(
        "kernel", np.zeros((64, 48), np.float32)), "'layers_0/attn/q_proj/kernel': "
     "float32\\(64, 48\\), config 'tiny_mixtral' needs float32"),
    (lambda p: p.__setitem__("layers_7", p["layers_1"]), "have an extra 'layers_7/"),
    (lambda p: p.pop("layers_1"), "lack 'layers_1/"),
    (lambda p: p["embed"].__setitem__("embedding", p["embed"]["embedding"].astype(
        np.float16)), "'embed/embedding': float16"),
])
@pytest.mark.parametrize("offload", [False, True])
def test_params_that_do_not_match_the_config_are_named(edit, needle, offload):
    with pytest.raises(ValueError, match=needle):
        moejax.Engine(_tiny_params(edit), offload=offload)


def test_frozen_dict_params_run_as_before():
    from flax.core import freeze

    m = MoEModel.random(moejax.get_model("tiny_mixtral").replace(num_layers=2), seed=1)
    want = moejax.Engine(m).generate([[1, 2, 3]], 3)
    assert moejax.Engine(MoEModel(m.config, freeze(m.params))).generate([[1, 2, 3]], 3) \
        == want
