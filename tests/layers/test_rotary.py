import jax.numpy as jnp
import numpy as np

from moejax.layers.rotary import RotaryEmbedding, apply_rotary


def test_position_zero_is_identity():
    x = jnp.arange(8.0).reshape(1, 1, 1, 8)
    np.testing.assert_allclose(apply_rotary(x, jnp.zeros((1, 1), jnp.int32), 1e4), x)


def test_head_dim_two_rotates_by_position_radians():
    # d = 2: one frequency, inv_freq = 1 → angle = position.
    x = jnp.array([1.0, 0.0]).reshape(1, 1, 1, 2)
    y = apply_rotary(x, jnp.array([[3]]), 10.0)
    np.testing.assert_allclose(y.reshape(2), [np.cos(3), np.sin(3)], atol=1e-6)


def test_dot_product_depends_only_on_relative_position():
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32) for _ in range(2))
    rot = RotaryEmbedding(1e4)
    dot = lambda m, n: float(jnp.sum(rot(q, jnp.array([[m]])) * rot(k, jnp.array([[n]]))))
    np.testing.assert_allclose(dot(7, 3), dot(14, 10), rtol=1e-4)
    assert abs(dot(7, 3) - dot(7, 4)) > 1e-4
