import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.layers.norm import Norm, layer_norm, rms_norm


def test_rms_norm_hand_value():
    # mean(x²) = (9 + 16) / 2 = 12.5
    y = rms_norm(jnp.array([[3.0, 4.0]]), jnp.array([1.0, 2.0]), eps=0.0)
    np.testing.assert_allclose(y, [[3 / np.sqrt(12.5), 8 / np.sqrt(12.5)]], rtol=1e-6)


def test_layer_norm_hand_value_no_bias():
    # mean 2, variance 1 → (x − 2) / 1 · scale
    y = layer_norm(jnp.array([[1.0, 3.0]]), jnp.array([1.0, 3.0]), eps=0.0)
    np.testing.assert_allclose(y, [[-1.0, 3.0]], rtol=1e-6)


def test_norm_module_selects_kind_and_has_one_scale_param():
    x = jnp.array([[1.0, 3.0]])
    m = Norm(2, 0.0, "layernorm")
    params = m.init(jax.random.PRNGKey(0), x)
    assert list(params["params"]) == ["scale"]
    np.testing.assert_allclose(m.apply(params, x), [[-1.0, 1.0]], rtol=1e-6)


def _bf16_pair(seed: int = 0):
    import ml_dtypes

    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((8, 256)) * 3).astype(ml_dtypes.bfloat16)
    w = (1 + 0.5 * rng.standard_normal(256)).astype(ml_dtypes.bfloat16)
    return x, w


def test_rms_norm_in_bfloat16_matches_hf_bit_for_bit():
    """bf16 in, statistics in float32, rounded, then scaled in bf16 (MixtralRMSNorm)."""
    torch = pytest.importorskip("torch")
    from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

    x, w = _bf16_pair()
    hf = MixtralRMSNorm(256, eps=1e-5)
    hf.weight.data = torch.tensor(w.astype(np.float32)).to(torch.bfloat16)
    with torch.no_grad():
        want = hf(torch.tensor(x.astype(np.float32)).to(torch.bfloat16)).float().numpy()
    got = rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-5)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)


def test_layer_norm_in_bfloat16_matches_torch():
    """DBRX's bias-free nn.LayerNorm in bf16: one rounding at the end (torch computes in
    float32 on the CPU); at most one bf16 ulp apart."""
    torch = pytest.importorskip("torch")

    x, w = _bf16_pair(1)
    ln = torch.nn.LayerNorm(256, eps=1e-5, bias=False).to(torch.bfloat16)
    ln.weight.data = torch.tensor(w.astype(np.float32)).to(torch.bfloat16)
    with torch.no_grad():
        want = ln(torch.tensor(x.astype(np.float32)).to(torch.bfloat16)).float().numpy()
    got = np.asarray(layer_norm(jnp.asarray(x), jnp.asarray(w), 1e-5), np.float32)
    np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=0)
