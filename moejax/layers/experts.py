"""Stacked SwiGLU experts, w1 (gate), w3 (up) [E, h, f] and w2 (down) [E, f, h]:
FFN_e(x) = (silu(x·w1_e) ⊙ (x·w3_e))·w2_e and a token's output is Σ_k w_k · FFN_{e_k}(x),
by two exact, dropless dispatch paths (docs/design.md §4.3 and "Choices")."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moejax.model_config.dispatch import sorted_blocks
from moejax.quant import QTensor, is_qtensor, quantize, weight


def swiglu(x: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array) -> jax.Array:
    """Batched over experts: x [E, C, h] -> [E, C, h]."""
    g = jnp.einsum("ech,ehf->ecf", x, w1)
    u = jnp.einsum("ech,ehf->ecf", x, w3)
    return jnp.einsum("ecf,efh->ech", jax.nn.silu(g) * u, w2)


def dispatch_slots(ids: jax.Array, num_experts: int, capacity: int) -> jax.Array:
    """ids [N, k] -> [N·k] slots in an [E·C] buffer: e·C + rank of the token among those
    routed to e, or E·C (a dump row) when rank ≥ C."""
    flat = ids.reshape(-1)
    onehot = jax.nn.one_hot(flat, num_experts, dtype=jnp.int32)  # [N·k, E]
    rank = jnp.take_along_axis(jnp.cumsum(onehot, axis=0) - onehot, flat[:, None], 1)[:, 0]
    return jnp.where(rank < capacity, flat * capacity + rank, num_experts * capacity)


def expert_counts(ids: jax.Array, num_experts: int) -> jax.Array:
    """Tokens routed to each expert: ids [N, k] -> [E] int32."""
    return jnp.sum(jax.nn.one_hot(ids.reshape(-1), num_experts, dtype=jnp.int32), axis=0)


def _quantized(parts) -> bool:
    return any(is_qtensor(w) for p in parts for w in p)


def swiglu_parts(x: jax.Array, parts) -> jax.Array:
    """Σ_p swiglu(x, *p) over FFN-column parts [(w1 [E, h, c], w3, w2 [E, c, h]), …]: SwiGLU
    is a sum over f, so experts split along f (resident columns, streamed pages) need
    no assembling. One part: exactly `swiglu`. x [E, C, h] -> [E, C, h]. Quantized parts
    (`moejax.quant.QTensor`) run expert by expert (`lax.map`), each expert's part
    dequantized inside the loop: at most one expert's part exists as floats."""
    if _quantized(parts):
        def one(args):  # x [C, h], parts of one expert
            xe, pe = args
            ws = [tuple(weight(w, xe.dtype) for w in p) for p in pe]
            y = _swiglu2(xe, *ws[0])
            for w in ws[1:]:
                y = y + _swiglu2(xe, *w)
            return y
        return jax.lax.map(one, (x, parts))
    y = swiglu(x, *parts[0])
    for p in parts[1:]:
        y = y + swiglu(x, *p)
    return y


def _swiglu2(x, w1, w3, w2):  # x [C, h], w1, w3 [h, c], w2 [c, h] -> [C, h]
    return jnp.dot(jax.nn.silu(x @ w1) * (x @ w3), w2)


def _expert_weight(w, e, dtype):
    """Expert e of a stacked part tensor, dequantized if it is a QTensor."""
    return weight(w.expert(e), dtype) if is_qtensor(w) else w[e]


def moe_ffn_sorted(x, weights, ids, w1, w3, w2, blocks: tuple[int, int] | None = None
                   ) -> jax.Array:
    """Sorted path: x [N, h], routing weights/ids [N, k] -> [N, h]. The N·k rows, sorted by
    expert (stable), run in row blocks (`sorted_blocks`) whose counts are run-time values:
    work Σ_e ⌈count_e / block⌉·block ≈ N·k rows, no capacity and no host-known count."""
    return sorted_parts(x, weights, ids, [(w1, w3, w2)], blocks)


def sorted_parts(x, weights, ids, parts, blocks: tuple[int, int] | None = None):
    """`moe_ffn_sorted` over FFN-column parts (`swiglu_parts`)."""
    n, h = x.shape
    e, k = parts[0][0].shape[0], ids.shape[1]
    nk = n * k
    big, small = blocks or sorted_blocks(nk / e)
    flat = ids.reshape(-1).astype(jnp.int32)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)  # sorted row -> pair
    counts = jnp.zeros((e,), jnp.int32).at[flat].add(1)
    starts = jnp.cumsum(counts) - counts
    xs = jnp.concatenate([x[order // k], jnp.zeros((big, h), x.dtype)])  # [N·k + big, h]

    # A block overhanging an expert's last row writes rows that the next expert (or the
    # `big` rows of tail padding) overwrites afterwards: experts run in order.
    def expert(ei, ys):
        # [h, c], [h, c], [c, h]; quantized: this expert's part dequantized, no more
        mine = [tuple(_expert_weight(w, ei, x.dtype) for w in p) for p in parts]
        count, start = counts[ei], starts[ei]

        def blocks_of(size, first):
            def body(j, ys):
                r0 = first + j * size
                xb = jax.lax.dynamic_slice_in_dim(xs, r0, size)
                yb = jnp.dot(jax.nn.silu(xb @ mine[0][0]) * (xb @ mine[0][1]), mine[0][2])
                for a1, a3, a2 in mine[1:]:
                    yb = yb + jnp.dot(jax.nn.silu(xb @ a1) * (xb @ a3), a2)
                return jax.lax.dynamic_update_slice_in_dim(ys, yb.astype(ys.dtype), r0, 0)
            return body

        n_big = count // big
        ys = jax.lax.fori_loop(0, n_big, blocks_of(big, start), ys)
        rest = count - n_big * big
        return jax.lax.fori_loop(0, (rest + small - 1) // small,
                                 blocks_of(small, start + n_big * big), ys)

    ys = jax.lax.fori_loop(0, e, expert, jnp.zeros_like(xs))
    where = jnp.zeros((nk,), jnp.int32).at[order].set(jnp.arange(nk, dtype=jnp.int32))
    y = ys[where].reshape(n, k, h) * weights[..., None].astype(ys.dtype)
    return jnp.sum(y, axis=1)


def moe_ffn(x, weights, ids, w1, w3, w2, capacity: int | None = None) -> jax.Array:
    """x [N, h], routing weights/ids [N, k] -> [N, h]: with `capacity` C (≥ the max router
    count, else tokens drop) the capacity path, tokens scattered into [E, C, h] and one
    batched GEMM; without, the sorted path."""
    return moe_ffn_parts(x, weights, ids, [(w1, w3, w2)], capacity)


def moe_ffn_parts(x, weights, ids, parts, capacity: int | None = None) -> jax.Array:
    """`moe_ffn` with the experts given as FFN-column parts [(w1, w3, w2), …]."""
    if capacity is None:
        return sorted_parts(x, weights, ids, parts)
    n, h = x.shape
    e, c = parts[0][0].shape[0], capacity
    slots = dispatch_slots(ids, e, c)  # [N·k]
    tok = jnp.arange(slots.shape[0]) // ids.shape[1]
    buf = jnp.zeros((e * c + 1, h), x.dtype).at[slots].set(x[tok])
    y = swiglu_parts(buf[:-1].reshape(e, c, h), parts).reshape(e * c, h)
    y = jnp.concatenate([y, jnp.zeros((1, h), y.dtype)])[slots]  # [N·k, h]
    y = y.reshape(n, ids.shape[1], h) * weights[..., None].astype(y.dtype)
    return jnp.sum(y, axis=1)


def moe_ffn_reference(x, weights, ids, w1, w3, w2) -> jax.Array:
    """Naive reference: every expert on every token, combined by dense gate weights."""
    e = w1.shape[0]
    dense = jnp.zeros((x.shape[0], e), jnp.float32)
    dense = dense.at[jnp.arange(x.shape[0])[:, None], ids].add(weights)
    y = swiglu(jnp.broadcast_to(x, (e,) + x.shape), w1, w3, w2)  # [E, N, h]
    return jnp.einsum("ne,enh->nh", dense.astype(y.dtype), y)


class Experts(nn.Module):
    """E stacked SwiGLU experts (params w1, w3 [E, h, f], w2 [E, f, h])."""

    num_experts: int
    hidden: int
    ffn: int
    dtype: jnp.dtype = jnp.float32
    quant: tuple[int, int] | None = None  # (bits, group): params are `QTensor`s

    @nn.compact
    def __call__(self, x, weights, ids, capacity: int | None = None):
        init = nn.initializers.lecun_normal(batch_axis=(0,))
        if self.quant is not None:
            bits, group = self.quant
            init = _quantized_init(init, bits, group)
        e, h, f = self.num_experts, self.hidden, self.ffn
        w1 = self.param("w1", init, (e, h, f), self.dtype)
        w3 = self.param("w3", init, (e, h, f), self.dtype)
        w2 = self.param("w2", init, (e, f, h), self.dtype)
        return moe_ffn(x, weights, ids, w1, w3, w2, capacity)


def _quantized_init(init, bits: int, group: int):
    def q_init(key, shape, dtype) -> QTensor:
        return quantize(init(key, shape, dtype), bits, group)
    return q_init


class DenseMLP(nn.Module):
    """Dense SwiGLU MLP (layers a family marks dense): params w1, w3 [h, f], w2 [f, h]."""

    hidden: int
    ffn: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):  # [..., h] -> [..., h]
        init = nn.initializers.lecun_normal()
        w1 = self.param("w1", init, (self.hidden, self.ffn), self.dtype)
        w3 = self.param("w3", init, (self.hidden, self.ffn), self.dtype)
        w2 = self.param("w2", init, (self.ffn, self.hidden), self.dtype)
        return (jax.nn.silu(x @ w1) * (x @ w3)) @ w2
