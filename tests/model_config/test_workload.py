import json
import os

import pytest

from moejax.model_config.workload import Workload, get_workload, load_trace, workload_names

TRACES = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "workloads")


def test_presets():
    for g in (32, 64, 128, 256):
        w = get_workload(f"mtbench_g{g}")
        assert (w.prompt_len, w.gen_len, w.context_len) == (77, g, 77 + g)
    assert get_workload("mtbench") == Workload(77, 32, name="mtbench")
    assert "tiny" in workload_names()
    with pytest.raises(ValueError, match="unknown workload 'x'.*mtbench_g32"):
        get_workload("x")


@pytest.mark.parametrize("kw, bad", [(dict(prompt_len=0, gen_len=4), "prompt_len=0"),
                                     (dict(prompt_len=4, gen_len=2.5), "gen_len=2.5"),
                                     (dict(prompt_len=4, gen_len=4, num_sequences=0),
                                      "num_sequences=0"),
                                     (dict(prompt_len=4, gen_len=4, kv_bytes_per_elem=True),
                                      "kv_bytes_per_elem=True"),
                                     (dict(prompt_len=4, gen_len=4, expert_imbalance=0.5),
                                      "expert_imbalance=0.5"),
                                     (dict(prompt_len=4, gen_len=4,
                                           decode_expert_imbalance=True),
                                      "decode_expert_imbalance=True")])
def test_validation_names_bad_value(kw, bad):
    with pytest.raises(ValueError, match=bad):
        Workload(**kw)


def test_decode_imbalance_defaults_to_the_prefill_one():
    assert Workload(4, 4, expert_imbalance=1.5).imbalance == {"prefill": 1.5, "decode": 1.5}
    wl = Workload(4, 4, expert_imbalance=1.5, decode_expert_imbalance=1.0)
    assert wl.imbalance == {"prefill": 1.5, "decode": 1.0}


def test_lengths_lists_and_their_means():
    wl = Workload.from_lengths([70, 80, 90], [32, 64, 257], name="t")
    assert (wl.prompt_len, wl.gen_len) == (80, 118)
    assert wl.prompt_lens == (70, 80, 90) and wl.gen_lens == (32, 64, 257)
    assert wl.requests() == [(70, 32), (80, 64), (90, 257)]
    assert wl.replace(num_sequences=4).requests() == [(70, 32), (80, 64), (90, 257),
                                                      (70, 32)]
    assert Workload(5, 7).requests(2) == [(5, 7), (5, 7)]  # fixed: the special case


@pytest.mark.parametrize("kw, bad", [
    (dict(prompt_len=4, gen_len=4, prompt_lens=(4,)), "come together"),
    (dict(prompt_len=4, gen_len=4, prompt_lens=(4, 4), gen_lens=(4,)), "2 prompt_lens"),
    (dict(prompt_len=4, gen_len=4, prompt_lens=(4, 0), gen_lens=(4, 4)), "positive"),
    (dict(prompt_len=4, gen_len=4, prompt_lens=(), gen_lens=()), "non-empty"),
    (dict(prompt_len=5, gen_len=4, prompt_lens=(4,), gen_lens=(4,)), "not the mean")])
def test_length_lists_validated(kw, bad):
    with pytest.raises(ValueError, match=bad):
        Workload(**kw)


def test_load_trace(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('{"name": "t", "source": "test", "requests": [{"prompt_len": 3, '
                    '"output_len": 5}, {"prompt_len": 5, "output_len": 7}]}')
    wl = load_trace(str(path), num_sequences=10)
    assert (wl.name, wl.prompt_len, wl.gen_len, wl.num_sequences) == ("t", 4, 6, 10)
    path.write_text('{"requests": [{"prompt_len": 3}]}')
    with pytest.raises(ValueError, match="not a trace"):
        load_trace(str(path))


@pytest.mark.parametrize("name, prompt, gen", [("mtbench", 77, (32, 256)),
                                                ("rag", 926, (128, 128)),
                                                ("longgen", 77, (512, 512))])
def test_shipped_traces(name, prompt, gen):
    wl = load_trace(os.path.join(TRACES, f"{name}.json"))
    assert 200 <= len(wl.prompt_lens) <= 1000
    assert abs(wl.prompt_len - prompt) < 0.1 * prompt
    assert min(wl.gen_lens) == gen[0] and max(wl.gen_lens) == gen[1]
    with open(os.path.join(TRACES, f"{name}.json")) as f:
        assert "default_rng" in json.load(f)["source"]
