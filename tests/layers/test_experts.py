import jax
import jax.numpy as jnp
import numpy as np

from moejax.layers.experts import (DenseMLP, expert_counts, moe_ffn, moe_ffn_reference)
from moejax.layers.router import route


def _random(n=13, h=8, f=6, e=4, k=2, seed=0):
    rng = np.random.default_rng(seed)
    arr = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    w, ids = route(arr(n, e), k, 1.0)
    return arr(n, h), w, ids, arr(e, h, f), arr(e, h, f), arr(e, f, h)


def test_single_expert_hand_value():
    # h = f = 1, w1 = 1, w3 = 2, w2 = 3: y = 3 · silu(x) · 2x
    x = jnp.array([[0.5]])
    one = lambda v: jnp.full((1, 1, 1), v)
    y = moe_ffn(x, jnp.ones((1, 1)), jnp.zeros((1, 1), jnp.int32), one(1.0), one(2.0),
                one(3.0))
    silu = 0.5 / (1 + np.exp(-0.5))
    np.testing.assert_allclose(y, [[3 * silu * 2 * 0.5]], rtol=1e-6)


def test_dispatch_equals_dense_reference():
    x, w, ids, w1, w3, w2 = _random()
    np.testing.assert_allclose(moe_ffn(x, w, ids, w1, w3, w2),
                               moe_ffn_reference(x, w, ids, w1, w3, w2), rtol=1e-5, atol=1e-6)


def test_capacity_at_max_count_is_still_exact():
    x, w, ids, w1, w3, w2 = _random(n=40)
    cap = int(jnp.max(expert_counts(ids, 4)))
    np.testing.assert_allclose(moe_ffn(x, w, ids, w1, w3, w2, capacity=cap),
                               moe_ffn_reference(x, w, ids, w1, w3, w2), rtol=1e-5, atol=1e-6)


def test_capacity_below_max_count_drops_tokens():
    x, w, ids, w1, w3, w2 = _random(n=40)
    cap = int(jnp.max(expert_counts(ids, 4))) - 1
    assert not np.allclose(moe_ffn(x, w, ids, w1, w3, w2, capacity=cap),
                           moe_ffn_reference(x, w, ids, w1, w3, w2), atol=1e-6)



def test_expert_counts():
    np.testing.assert_array_equal(expert_counts(jnp.array([[0, 2], [2, 1]]), 4), [1, 1, 2, 0])


def test_dense_mlp_shapes():
    m = DenseMLP(hidden=8, ffn=5)
    p = m.init(jax.random.PRNGKey(0), jnp.ones((2, 3, 8)))
    assert p["params"]["w2"].shape == (5, 8)
    assert m.apply(p, jnp.ones((2, 3, 8))).shape == (2, 3, 8)
