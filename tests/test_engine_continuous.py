"""Continuous batching (Engine.stream / generate(batching="continuous")) equals each prompt
run alone; the paged host KV cache is empty after a run; sweeps stay bounded."""

import numpy as np
import pytest

import moejax
from moejax.schedule import Policy
from moejax.schedule.continuous import admission
from moejax.schedule.policy import padded_len
from tests.oracle import hf_model

PAGE = 4 * 1000
LENS = (5, 11, 2, 7, 3, 9)
MAX_NEW = [6, 3, 5, 1, 4, 6]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Tiny HF Mixtral, 5 MoE layers, small pages so experts stream (as test_engine_offload)."""
    _, d = hf_model("mixtral", tmp_path_factory.mktemp("mixtral5c"), num_hidden_layers=5)
    return moejax.load_pretrained(d)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(1)
    return [list(map(int, rng.integers(0, 101, n))) for n in LENS]


@pytest.fixture(scope="module")
def alone(model, prompts):
    """Each prompt run alone on the all-on-device reference, to its max new tokens."""
    ref = moejax.Engine(model)
    return [ref.generate([p], m)[0] for p, m in zip(prompts, MAX_NEW)]


@pytest.fixture(scope="module")
def engine(model):
    pol = Policy.from_micro_batches(2, 2, gpu_weight_fraction=0.0, page_bytes=PAGE)
    e = moejax.Engine(model, policy=pol)
    e.kv_block_tokens = 16  # several blocks per sequence
    return e


def _eos(alone):
    """A token some rows emit before their last step (others never)."""
    for row in alone:
        for t in row[:-1]:
            if sum(t in r for r in alone) < len(alone):
                return t
    pytest.skip("no suitable EOS token")


def test_continuous_greedy_equals_each_prompt_alone(engine, prompts, alone):
    assert engine.store.num_pages(0) > 0  # experts stream
    eos = _eos(alone)
    want = []
    for row in alone:
        want.append(row[:row.index(eos) + 1] if eos in row else row)
    got = engine.generate(prompts, MAX_NEW, eos, batching="continuous")
    assert got == want
    assert any(len(w) < m for w, m in zip(want, MAX_NEW))  # some rows hit EOS
    sw = engine.last_sweeps
    # cap 4 < 6 prompts: some were admitted after the first sweep
    assert max(sum(s.decode_rows) + sum(s.prefill_rows) for s in sw) <= 4
    assert any(s.prefill_rows for s in sw[1:])
    pool = engine.kv_pool
    assert pool.num_free_blocks == pool.num_blocks and not pool.live_sequences


def test_stream_yields_each_index_once_with_its_reason(engine, prompts, alone):
    eos = _eos(alone)
    seen = {}
    for i, toks, reason in engine.stream(prompts, MAX_NEW, eos):
        assert i not in seen
        seen[i] = (toks, reason)
    assert sorted(seen) == list(range(len(prompts)))
    for i, (toks, reason) in seen.items():
        assert reason == ("eos" if toks[-1] == eos else "length")
        assert reason == "eos" or len(toks) == MAX_NEW[i]


def test_sweep_timeline_size_is_bounded(engine, prompts):
    engine.generate(prompts[:2], 12, batching="continuous")
    sizes = [s.entries for s in engine.last_sweeps]
    assert len(sizes) == 12
    assert len(set(sizes[1:])) == 1  # same micro-batches, same entries, however long


def test_sampling_equals_each_prompt_alone(engine, model, prompts):
    s = moejax.Sampling(temperature=0.8, seed=3)
    ref = moejax.Engine(model)
    want = [ref.generate([p], m, sampling=s, request_indices=[i])[0]
            for i, (p, m) in enumerate(zip(prompts, MAX_NEW))]
    assert engine.generate(prompts, MAX_NEW, sampling=s, batching="continuous") == want


def test_static_placements_stream_and_take_lists(model, prompts, alone):
    ref = moejax.Engine(model)
    assert ref.generate(prompts, MAX_NEW) == alone
    assert ref.generate(prompts, MAX_NEW, batching="continuous") == alone
    assert sorted(i for i, _, _ in ref.stream(prompts, 2)) == list(range(len(prompts)))


def test_bad_inputs_are_one_line_errors(engine, model, prompts, alone):
    for kw, msg in [(dict(max_new_tokens=[1, 2]), "6 prompts"),
                    (dict(max_new_tokens=[1, 0, 1, 1, 1, 1]), ">= 1"),
                    (dict(max_new_tokens=3, batching="dynamic"), "batching")]:
        with pytest.raises(ValueError, match=msg) as err:
            engine.generate(prompts, **kw)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="6 prompts"):
        engine.stream(prompts, [1, 2])
    small = moejax.Engine(model, gpu_weight_fraction=0.0, page_bytes=PAGE, host_kv_bytes=100)
    with pytest.raises(ValueError, match="host_kv_bytes=100 .*longest request") as err:
        small.generate(prompts, 3, batching="continuous")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="host_kv_bytes"):
        moejax.Engine(model, gpu_weight_fraction=0.0, host_kv_bytes=0)
    with pytest.raises(ValueError, match="host_kv_bytes=100 .*one static row") as err:
        small.generate(prompts, MAX_NEW, batching="static")  # the budget binds both modes
    assert "\n" not in str(err.value)
    assert engine.generate(prompts, MAX_NEW) == alone  # still usable


def test_kv_capacity_bounds_admission_and_closing_frees_blocks(model, prompts, alone):
    probe = moejax.Engine(model, gpu_weight_fraction=0.0, page_bytes=PAGE)
    e = moejax.Engine(model, gpu_weight_fraction=0.0, page_bytes=PAGE,
                      host_kv_bytes=48 * probe._kv_bytes_per_token(), micro_batch_size=2)
    e.kv_block_tokens = 16  # 3 blocks: at most three short requests, one long one at once
    assert e.generate(prompts, MAX_NEW, batching="continuous") == alone
    assert e.kv_pool.capacity_tokens == 48
    assert max(sum(s.decode_rows) + sum(s.prefill_rows) for s in e.last_sweeps) <= 3
    it = e.stream(prompts, MAX_NEW)
    next(it)
    it.close()  # stopped early: every block back
    assert e.kv_pool.num_free_blocks == e.kv_pool.num_blocks


def test_engine_admits_as_the_model_does(model, prompts, alone):
    # concurrency 3 < 6 prompts, ≤ 32 padded prompt tokens a sweep (two of 16), prefill
    # micro-batches of ≤ 2 prompts: the engine's sweeps are the model's `admission`
    pol = Policy.from_micro_batches(2, 2, gpu_weight_fraction=0.0, page_bytes=PAGE,
                                    max_concurrency=3, prefill_tokens_per_sweep=32)
    e = moejax.Engine(model, policy=pol)
    assert e.generate(prompts, MAX_NEW) == alone  # the default is continuous
    sh = admission(list(zip(LENS, MAX_NEW)), 1e9, pol).shape
    sw = e.last_sweeps
    assert len(sw) == len(sh.n_d)
    assert [len(s.prefill_rows) for s in sw] == sh.n_p.astype(int).tolist()
    assert [sum(s.prefill_rows) for s in sw] == np.rint(sh.n_p * sh.rows_p).tolist()
    assert [sum(s.decode_rows) for s in sw] == np.rint(sh.n_d * sh.rows_d).tolist()
    assert max(sum(s.prefill_rows) for s in sw) == 2 < 3 == max(
        sum(s.decode_rows) + sum(s.prefill_rows) for s in sw)


def test_device_runs_the_padded_rows_the_model_prices(model, prompts, alone):
    # micro-batches of up to 4, 3 running, prefill ≤ 48 padded tokens (three of 16): groups
    # of 3 run as 4 device rows (the next power of two), of 1 as 1, as `admission` prices
    pol = Policy.from_micro_batches(4, 1, gpu_weight_fraction=0.0, page_bytes=PAGE,
                                    max_concurrency=3, prefill_tokens_per_sweep=48)
    e = moejax.Engine(model, policy=pol)
    assert e.generate(prompts, MAX_NEW) == alone
    sh = admission(list(zip(LENS, MAX_NEW)), 1e9, pol).shape
    sw = e.last_sweeps
    dev_d = [sum(s.device_rows[:len(s.decode_rows)]) for s in sw]
    dev_p = [sum(s.device_rows[len(s.decode_rows):]) for s in sw]
    assert dev_d == np.rint(sh.n_d * sh.dev_rows_d).tolist()
    assert dev_p == np.rint(sh.n_p * sh.dev_rows_p).tolist()
    assert 3 in [sum(s.prefill_rows) for s in sw] and 4 in dev_p and 1 in dev_d


def test_static_batches_fit_the_host_kv_budget(model, prompts, alone):
    probe = moejax.Engine(model, gpu_weight_fraction=0.0, page_bytes=PAGE)
    row = (padded_len(max(LENS)) + max(MAX_NEW)) * probe._kv_bytes_per_token()
    e = moejax.Engine(model, gpu_weight_fraction=0.0, page_bytes=PAGE,
                      host_kv_bytes=2 * row + 1)
    assert e.generate(prompts, MAX_NEW, batching="static") == alone
    assert e.last_run.policy.batch_size == 2  # six prompts in batches of two


def _kv_engine(model, tokens, block, reservation):
    probe = moejax.Engine(model, gpu_weight_fraction=0.0, page_bytes=PAGE)
    pol = Policy.from_micro_batches(2, 3, gpu_weight_fraction=0.0, page_bytes=PAGE,
                                    kv_reservation=reservation)  # up to 6 running
    e = moejax.Engine(model, policy=pol, host_kv_bytes=tokens * probe._kv_bytes_per_token())
    e.kv_block_tokens = block
    return e


def _peak_running(e):
    return max(sum(s.decode_rows) + sum(s.prefill_rows) for s in e.last_sweeps)


def test_lookahead_admits_more_in_the_same_kv_and_equals_alone(model, prompts, alone):
    peak = {}
    for res in ("max", "lookahead"):
        e = _kv_engine(model, 32, 4, res)  # 8 blocks of 4
        assert e.generate(prompts, MAX_NEW) == alone
        assert e.kv_pool.num_free_blocks == e.kv_pool.num_blocks
        peak[res] = _peak_running(e)
    assert peak["max"] < peak["lookahead"]


def test_lookahead_engine_admits_as_the_model_does(model, prompts, alone):
    e = _kv_engine(model, 24, 1, "lookahead")  # blocks of one token: the model's unit
    assert e.generate(prompts, MAX_NEW) == alone
    a = admission(list(zip(LENS, MAX_NEW)), 24, e.policy)
    assert [len(s.prefill_rows) for s in e.last_sweeps] == a.shape.n_p.astype(int).tolist()
    assert [sum(s.decode_rows) + sum(s.prefill_rows) for s in e.last_sweeps] == \
        a.running.astype(int).tolist()
