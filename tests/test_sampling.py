"""moejax.Sampling: validation, per-request streams (batch composition, concurrency and
micro-batching change nothing), and the distribution against HF's softmax."""

import numpy as np
import pytest

import moejax
from experiments.make_tiny import make_tiny
from moejax.sampling import filter_logits, sample
from moejax.schedule import Policy

PROMPTS = [[1, 5, 9, 33], [1, 200, 7], [1, 42, 42, 42, 8, 19, 3], [1, 99], [1, 3, 3, 3, 3],
           [1, 17, 300, 250, 11, 12]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(str(tmp_path_factory.mktemp("tiny") / "ckpt"))


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    """(directory, HF model) of a tiny Mixtral with a 16-token vocabulary."""
    import torch
    import transformers

    d = make_tiny(str(tmp_path_factory.mktemp("tiny16") / "ckpt"), model_vocab_size=16,
                  seed=1)
    return d, transformers.MixtralForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


@pytest.mark.parametrize("kw, needle", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(top_k=2.0), "top_k"), (dict(seed=1.5), "seed"), (dict(seed="3"), "seed"),
    (dict(seed=True), "seed"), (dict(seed=-1), "seed"), (dict(seed=2 ** 64), "seed")])
def test_invalid_values_are_one_line(kw, needle):
    with pytest.raises(ValueError, match=needle) as e:
        moejax.Sampling(**kw)
    assert "\n" not in str(e.value)


def test_engine_refuses_bad_sampling_arguments(tiny):
    eng = moejax.Engine(moejax.load_pretrained(tiny))
    with pytest.raises(ValueError, match="moejax.Sampling"):
        eng.generate(PROMPTS[:1], 2, sampling={"temperature": 1.0})
    with pytest.raises(ValueError, match="request_indices"):
        eng.generate(PROMPTS[:2], 2, sampling=moejax.Sampling(), request_indices=[3, 3])


def test_streams_do_not_depend_on_batch_concurrency_or_micro_batching(tiny):
    """Same seed → same tokens per request: alone or batched, all-on-device or offloaded
    (wg 0.5), any micro-batch size and any policy batch size; temperature 0 is greedy."""
    s = moejax.Sampling(temperature=0.9, top_k=50, top_p=0.95, seed=7)
    model = moejax.load_pretrained(tiny)
    ref = moejax.Engine(model).generate(PROMPTS, 4, sampling=s)
    greedy = moejax.Engine(model).generate(PROMPTS, 4)
    assert ref != greedy and len({tuple(r) for r in ref}) == len(ref)
    alone = moejax.Engine(model).generate(PROMPTS[2:3], 4, sampling=s, request_indices=[2])
    assert alone == ref[2:3]
    # offloaded, concurrency 4 (two batches, the second padded) in micro-batches of 2,
    # against the reference's one batch of 6 in one micro-batch
    pol = Policy.from_micro_batches(2, 2, gpu_weight_fraction=0.5)
    eng = moejax.Engine(moejax.load_pretrained(tiny, experts="host"), policy=pol)
    assert eng.generate(PROMPTS, 4, sampling=s) == ref
    eng = moejax.Engine(model)
    assert eng.generate(PROMPTS, 4, sampling=moejax.Sampling(temperature=0, seed=3)) == greedy
    other = eng.generate(PROMPTS, 4, sampling=moejax.Sampling(temperature=0.9, seed=8))
    assert other != ref


def tv(samples, p) -> float:
    emp = np.bincount(samples, minlength=len(p)) / len(samples)
    return 0.5 * float(np.abs(emp - p).sum())


def hf_first_logits(hf, prompt):
    import torch

    with torch.no_grad():
        return hf(torch.tensor([prompt])).logits[0, -1].double().numpy()


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_first_token_distribution_matches_hf_softmax(small_vocab):
    """4096 seeds (the sampling op over HF's logits) and 4096 requests of one engine call
    (one seed): both within total variation 0.05 of softmax(HF logits / T)."""
    import jax.numpy as jnp

    d, hf = small_vocab
    prompt, temp = [1, 5, 9, 3, 12], 1.3
    logits = hf_first_logits(hf, prompt)
    p = softmax(logits / temp)
    keys = [moejax.Sampling(seed=s).base_key() for s in range(4096)]
    draw = lambda k: sample(jnp.asarray(logits[None], jnp.float32), jnp.asarray(k),
                            jnp.zeros(1, jnp.int32), 0, jnp.float32(temp), jnp.int32(0),
                            jnp.float32(1.0))[0]
    import jax
    by_seed = np.asarray(jax.jit(jax.vmap(draw))(jnp.asarray(np.stack(keys))))
    assert tv(by_seed, p) < 0.05
    eng = moejax.Engine(moejax.load_pretrained(d))
    out = eng.generate([prompt] * 4096, 1, sampling=moejax.Sampling(temperature=temp, seed=5))
    by_request = np.array([o[0] for o in out])
    assert tv(by_request, p) < 0.05, (tv(by_request, p), p)


@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (0, 0.6), (5, 0.7)])
def test_top_k_top_p_never_leave_the_kept_set(small_vocab, top_k, top_p):
    d, hf = small_vocab
    prompt = [1, 7, 7, 2, 9]
    p = softmax(hf_first_logits(hf, prompt))
    order = np.argsort(-p)
    kept = order[:top_k] if top_k else order
    q = p[kept] / p[kept].sum()
    n = int(np.searchsorted(np.cumsum(q), top_p - 1e-9) + 1)  # nucleus of the top-k
    kept = set(kept[:n].tolist())
    assert 1 < len(kept) < 16
    eng = moejax.Engine(moejax.load_pretrained(d))
    s = moejax.Sampling(temperature=1.0, top_k=top_k, top_p=top_p, seed=11)
    out = {o[0] for o in eng.generate([prompt] * 512, 1, sampling=s)}
    assert out == kept


def test_filter_follows_hf_order_and_cuts():
    import jax.numpy as jnp

    x = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]], jnp.float32))
    keep = lambda t, k, p: np.isfinite(np.asarray(filter_logits(x, t, k, p)))[0].tolist()
    assert keep(1.0, 0, 0.7) == [True, True, False, False]
    assert keep(1.0, 0, 0.9) == [True, True, True, False]
    assert keep(1.0, 2, 1.0) == [True, True, False, False]
    assert keep(1.0, 0, 1.0) == [True] * 4
    assert keep(1.0, 0, 0.1) == [True, False, False, False]
