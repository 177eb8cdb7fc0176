"""Device sampling of next tokens (temperature, then top-k, then top-p, as transformers).
Row b draws at step s with key fold_in(fold_in(key(seed), request_index[b]), s), so a
request's tokens depend only on (seed, its index, step), never on its batch-mates."""

from __future__ import annotations

from dataclasses import dataclass
import jax
import jax.numpy as jnp
import numpy as np

SEED_LIMIT = 2 ** 64  # a seed is a 64-bit unsigned integer (two uint32 key words)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(
        v, (bool, np.bool_))


@dataclass(frozen=True)
class Sampling:
    """temperature ≥ 0 (0: greedy), top_k ≥ 0 (0: off), top_p ∈ (0, 1] (1: off), seed in
    [0, 2**64)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        t, k, p, s = self.temperature, self.top_k, self.top_p, self.seed
        if not _is_real(t) or not np.isfinite(t) or t < 0:
            raise ValueError(f"Sampling: temperature={t!r} must be a finite number >= 0")
        if not _is_int(k) or k < 0:
            raise ValueError(f"Sampling: top_k={k!r} must be an integer >= 0 (0: off)")
        if not _is_real(p) or not 0 < p <= 1:
            raise ValueError(f"Sampling: top_p={p!r} must be in (0, 1] (1: off)")
        if not _is_int(s) or not 0 <= s < SEED_LIMIT:
            raise ValueError(f"Sampling: seed={s!r} must be an integer in [0, 2**64)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def base_key(self) -> np.ndarray:
        """uint32 [2] threefry key of the seed (= jax.random.PRNGKey(seed) below 2**32)."""
        s = int(self.seed)
        return np.array([s >> 32, s & 0xFFFFFFFF], np.uint32)

    def args(self) -> tuple:
        """(temperature, top_k, top_p) as device scalars: one compilation for all."""
        return (jnp.float32(self.temperature), jnp.int32(self.top_k),
                jnp.float32(self.top_p))


def row_keys(base_key: jax.Array, request_index: jax.Array, step) -> jax.Array:
    """uint32 [B, 2]: fold_in(fold_in(base_key, request_index[b]), step) per row."""
    fold = jax.random.fold_in
    if jnp.ndim(step):  # one step per row (continuous batching)
        return jax.vmap(lambda i, s: fold(fold(base_key, i), s))(request_index, step)
    return jax.vmap(lambda i: fold(fold(base_key, i), step))(request_index)


def filter_logits(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """float32 [B, V] / temperature, −inf outside top_k (ties kept) and HF's top_p nucleus."""
    x = logits / jnp.where(temperature > 0, temperature, 1.0)  # [B, V]
    v = x.shape[-1]
    desc = jnp.sort(x, axis=-1)[:, ::-1]  # [B, V]
    kth = desc[:, jnp.clip(top_k, 1, v) - 1][:, None]  # [B, 1]
    x = jnp.where((top_k > 0) & (x < kth), -jnp.inf, x)
    asc = jnp.sort(x, axis=-1)  # [B, V]
    cum = jnp.cumsum(jax.nn.softmax(asc, axis=-1), axis=-1)  # [B, V]
    drop = (cum <= 1 - top_p).at[:, -1].set(False)  # always keep the most likely
    # the cut in value: the smallest kept sorted logit; below it is dropped
    cut = jnp.min(jnp.where(drop, jnp.inf, asc), axis=-1, keepdims=True)  # [B, 1]
    return jnp.where(x < cut, -jnp.inf, x)


def sample_logits(logits, keys, temperature, top_k, top_p) -> jax.Array:
    """float32 logits [B, V] + keys [B, 2] → int32 ids [B]; temperature 0: argmax."""
    x = filter_logits(logits, temperature, top_k, top_p)
    drawn = jax.vmap(jax.random.categorical)(keys, x)  # [B]
    return jnp.where(temperature > 0, drawn, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


@jax.jit
def sample(logits, base_key, request_index, step, temperature, top_k, top_p):
    """Jitted: logits [B, V] of rows `request_index` [B] at `step` → token ids [B]."""
    keys = row_keys(base_key, request_index, step)
    return sample_logits(logits.astype(jnp.float32), keys, temperature, top_k, top_p)


__all__ = ["Sampling", "sample", "sample_logits", "filter_logits", "row_keys"]
