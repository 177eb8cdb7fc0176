import jax.numpy as jnp
import numpy as np

from moejax.layers.attention import (cache_mask, causal_mask, gqa_attention,
                                     prompt_positions)


def _rand(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_single_visible_key_returns_its_value():
    q, k, v = _rand(1, 1, 2, 4), _rand(1, 3, 1, 4, seed=1), _rand(1, 3, 1, 4, seed=2)
    mask = jnp.array([[[False, True, False]]])
    o = gqa_attention(q, k, v, mask)
    np.testing.assert_allclose(o[0, 0, 0], v[0, 1, 0], rtol=1e-6)
    np.testing.assert_allclose(o[0, 0, 1], v[0, 1, 0], rtol=1e-6)


def test_equal_scores_average_the_values():
    q = jnp.zeros((1, 1, 1, 4))
    v = jnp.array([[[[1.0, 0, 0, 0]], [[3.0, 0, 0, 0]]]])
    o = gqa_attention(q, _rand(1, 2, 1, 4), v, jnp.ones((1, 1, 2), bool))
    np.testing.assert_allclose(o[0, 0, 0, 0], 2.0, rtol=1e-6)


def test_gqa_equals_multi_head_with_repeated_kv():
    q, k, v = _rand(2, 3, 6, 8), _rand(2, 5, 2, 8, seed=1), _rand(2, 5, 2, 8, seed=2)
    mask = jnp.ones((2, 3, 5), bool)
    mha = gqa_attention(q, jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2), mask)
    np.testing.assert_allclose(gqa_attention(q, k, v, mask), mha, rtol=1e-5, atol=1e-6)


def test_causal_mask_left_and_right_padding():
    am = jnp.array([[0, 1, 1], [1, 1, 0]])
    m = np.asarray(causal_mask(am))
    np.testing.assert_array_equal(m[0, 2], [False, True, True])
    np.testing.assert_array_equal(m[1, 1], [True, True, False])
    np.testing.assert_array_equal(m[1, 0], [True, False, False])


def test_prompt_positions_count_real_tokens():
    np.testing.assert_array_equal(prompt_positions(jnp.array([[0, 0, 1, 1], [1, 1, 1, 0]])),
                                  [[0, 0, 0, 1], [0, 1, 2, 2]])


def test_cache_mask_per_row_lengths():
    np.testing.assert_array_equal(cache_mask(jnp.array([1, 3]), 4)[:, 0],
                                  [[1, 0, 0, 0], [1, 1, 1, 0]])
