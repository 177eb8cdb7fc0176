"""The timeline executor through the real data plane: overlapped == serial == reference."""

import numpy as np
import pytest

import moejax
from moejax.model import MoEModel
from moejax.schedule.policy import Policy

CFG = moejax.get_model("tiny_mixtral").replace(num_layers=3)


@pytest.fixture(scope="module")
def model():
    return MoEModel.random(CFG, seed=3)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(1)
    return [list(map(int, rng.integers(0, 128, n))) for n in (3, 9, 5, 1, 7)]


@pytest.fixture(scope="module")
def reference(model, prompts):
    return moejax.Engine(model).generate(prompts, 5, batching="static")


def _policy(**kw):
    base = dict(gpu_weight_fraction=0.25, page_bytes=4 * 3000, overlap=True)
    return Policy.from_micro_batches(2, 3, **{**base, **kw})


@pytest.mark.parametrize("kw", [dict(), dict(overlap=False),
                                dict(attention_device="gpu", kv_cache_device="gpu"),
                                dict(gpu_weight_fraction=0.0, page_bytes=4 * 777)],
                         ids=["overlap", "serial", "gpu-attention", "stream-all"])
def test_micro_batched_policy_matches_reference(model, prompts, reference, kw):
    eng = moejax.Engine(model, policy=_policy(**kw))
    assert eng.generate(prompts, 5, batching="static") == reference
    assert eng.last_run.policy.num_micro_batches == 3  # 5 rows → 3 micro-batches of 2


def test_trace_respects_every_edge(model, prompts):
    eng = moejax.Engine(model, policy=_policy())
    eng.generate(prompts, 4, batching="static")
    run = eng.last_run
    assert run.trace.start_s.shape == (len(run.entries),)
    for e in run.entries:
        assert run.trace.end_s[e.id] >= run.trace.start_s[e.id]
        for d in e.deps:
            assert run.trace.end_s[d] <= run.trace.start_s[e.id] + 1e-9
    assert run.prefill_s > 0 and run.decode_s > 0


def test_batch_larger_than_policy_runs_in_chunks(model, prompts, reference):
    pol = Policy.from_micro_batches(1, 2, gpu_weight_fraction=0.5, page_bytes=4 * 3000)
    assert moejax.Engine(model, policy=pol).generate(prompts, 5, batching="static") == reference


def test_eos_stops_early_with_the_executor(model, prompts, reference):
    eos = reference[0][1]
    out = moejax.Engine(model, policy=_policy()).generate(prompts, 5, batching="static", eos_token_id=eos)
    for got, full in zip(out, reference):
        assert got == (full[:full.index(eos) + 1] if eos in full else full)


def test_single_moe_layer_overlapped_matches_serial(prompts):
    cfg = CFG.replace(num_layers=1)  # consecutive passes stream the same layer
    one = MoEModel.random(cfg, seed=5)
    serial = moejax.Engine(one, policy=_policy(overlap=False)).generate(prompts, 6, batching="static")
    eng = moejax.Engine(one, policy=_policy())
    for _ in range(3):  # racy before passes had their own slots: fails most runs
        assert eng.generate(prompts, 6, batching="static") == serial


def test_run_after_an_eos_stop_reuses_the_slots(model, prompts, reference):
    eng = moejax.Engine(model, policy=_policy())
    eng.generate(prompts, 5, batching="static", eos_token_id=[r[0] for r in reference])  # every row ends
    assert eng.last_run.steps == 1  # stopped after the prefill, passes holding slots
    assert eng.generate(prompts, 5, batching="static") == reference


def test_progress_reports_every_token(model, prompts):
    seen = []
    moejax.Engine(model, policy=_policy()).generate(prompts, 4, batching="static", progress=lambda d, n:
                                                    seen.append((d, n)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_progress_counts_across_the_batches_of_a_request(model, prompts):
    seen = []  # 5 prompts, a policy of 6 rows capped to 2: three batches of 2 steps
    moejax.Engine(model, policy=_policy().replace(batch_size=2, num_micro_batches=1)
                  ).generate(prompts, 2, batching="static", progress=lambda d, n: seen.append((d, n)))
    assert seen == [(1, 6), (2, 6), (3, 6), (4, 6), (5, 6), (6, 6)]


def test_progress_ends_at_its_total_when_a_batch_stops_at_eos(model, prompts, reference):
    seen = []  # every row of each batch stops after its first token
    moejax.Engine(model, policy=_policy().replace(batch_size=2, num_micro_batches=1)
                  ).generate(prompts, 3, batching="static", eos_token_id=[r[0] for r in reference],
                             progress=lambda d, n: seen.append((d, n)))
    assert seen == [(1, 9), (3, 9), (4, 9), (6, 9), (7, 9), (9, 9)]


@pytest.mark.parametrize("knob", [dict(gpu_weight_fraction=0.5), dict(page_bytes=4000),
                                  dict(micro_batch_size=2)])
def test_policy_and_knobs_conflict(model, knob):
    with pytest.raises(ValueError, match="come from it"):
        moejax.Engine(model, policy=_policy(), **knob)


def test_device_attention_with_a_host_cache_is_refused_up_front(model):
    pol = _policy(attention_device="gpu", kv_cache_device="cpu")
    with pytest.raises(ValueError, match="kv_cache_device='cpu' with attention_device="):
        moejax.Engine(model, policy=pol)


def test_searched_micro_batching_runs(model, prompts, reference):
    eng = moejax.Engine(model, gpu_weight_fraction=0.0, page_bytes=4 * 3000)
    assert eng.generate(prompts, 5, batching="static") == reference
    assert eng.last_run.policy.batch_size >= len(prompts)
