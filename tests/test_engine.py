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
])
def test_bad_requests_raise_and_engine_stays_usable(engine, prompts, max_new, needle):
    with pytest.raises(ValueError, match=needle):
        engine.generate(prompts, max_new)
    assert len(engine.generate([[1, 2, 3]], 2)[0]) == 2


def test_rows_have_exactly_max_new_tokens(engine):
    outs = engine.generate([[5], [1, 2, 3, 4, 5, 6, 7]], max_new_tokens=9)
    assert [len(o) for o in outs] == [9, 9]


def test_eos_stops_a_row_early_and_is_included(engine):
    full = engine.generate([[3, 4, 5]], max_new_tokens=8)[0]
    eos = full[2]
    stopped = engine.generate([[3, 4, 5]], max_new_tokens=8, eos_token_id=eos)[0]
    assert stopped == full[:full.index(eos) + 1]


def test_logits_reject_out_of_vocab_tokens(engine):
    with pytest.raises(ValueError, match="token id 999"):
        engine.model.logits(np.array([[1, 999]]))
