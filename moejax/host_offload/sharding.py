"""k devices on one host: a one-axis `jax.sharding.Mesh` ("tp") and where every weight
lives on it (docs/design.md §10). Tensor parallel as MoE-Lightning runs it on 2 and 4 T4s:

- experts split along the FFN axis f: w1, w3 [E, h, f] and w2 [E, f, h] sharded on f, so
  each device holds 1/k of every resident column block and streams 1/k of every page over
  its own link; the k partial FFN sums are reduced after w2 (`ops.ffn`'s psum);
- attention projections split by heads: q/k/v kernels [h, H·d] on their output axis, the
  o kernel [Hq·d, h] on its input axis (XLA reduces after o_proj); the attention output
  comes back from the host already split by heads (`ATTN_OUT_SPEC`);
- everything else (embedding, LM head, norms, routers, dense MLPs) replicated.

One device is a 1-device mesh: the same code, no reduction.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

TP = "tp"  # the mesh axis
# the FFN axis f of each expert tensor is sharded
EXPERT_SPECS = {"w1": P(None, None, TP), "w3": P(None, None, TP), "w2": P(None, TP, None)}
# attention projections split by heads (kernels [in, out])
HEAD_SPECS = {"q_proj": P(None, TP), "k_proj": P(None, TP), "v_proj": P(None, TP),
              "o_proj": P(TP, None)}
ATTN_OUT_SPEC = P(None, None, TP, None)  # attention output o [B, T, Hq, d], by heads
REPLICATED = P()


def check_devices(devices) -> tuple[jax.Device, ...]:
    """`devices` as a tuple of distinct jax devices of one platform that exist here;
    ValueError (one line) naming what is wrong, e.g. more devices than exist."""
    if isinstance(devices, jax.Device):
        devices = [devices]
    if not isinstance(devices, (list, tuple)) or not devices:
        raise ValueError(f"devices={devices!r} must be a non-empty list of jax devices")
    bad = [d for d in devices if not isinstance(d, jax.Device)]
    if bad:
        raise ValueError(f"devices: {bad[0]!r} is not a jax.Device")
    have = jax.devices(devices[0].platform)
    if len(devices) > len(have):
        raise ValueError(f"devices: {len(devices)} requested but only {len(have)} "
                         f"{devices[0].platform} device(s) exist")
    if len(set(devices)) != len(devices):
        raise ValueError(f"devices lists a device twice: {list(devices)}")
    missing = [d for d in devices if d not in have]
    if missing:
        raise ValueError(f"devices: {missing[0]} is not one of this process's "
                         f"{devices[0].platform} devices {have}")
    return tuple(devices)


def check_split(cfg, k: int) -> None:
    """ValueError naming the first size of `cfg` that k devices do not divide: heads and
    KV heads (attention split by heads), expert_ffn_size (experts split along f)."""
    for name in ("num_heads", "num_kv_heads", "expert_ffn_size"):
        n = getattr(cfg, name)
        if n % k:
            raise ValueError(f"{k} devices do not divide {name}={n} of {cfg.name}: "
                             f"tensor parallel splits {name} evenly over the devices")


def make_mesh(devices: Sequence[jax.Device]) -> Mesh:
    """The one-axis ("tp") mesh over `devices` (checked)."""
    return Mesh(np.array(check_devices(devices)), (TP,))


def param_spec(path: tuple[str, ...]) -> P:
    """PartitionSpec of parameter `path` (e.g. ("layers_0", "attn", "q_proj", "kernel"))."""
    if len(path) >= 2 and path[-2] == "experts" and path[-1] in EXPERT_SPECS:
        return EXPERT_SPECS[path[-1]]
    if len(path) >= 3 and path[-3] == "attn" and path[-1] == "kernel":
        return HEAD_SPECS.get(path[-2], REPLICATED)
    return REPLICATED


def sharding(mesh: Mesh, spec: P, memory_kind: str | None = None) -> NamedSharding:
    return NamedSharding(mesh, spec, memory_kind=memory_kind)


def per_device_bytes(nbytes: int, spec: P, k: int) -> int:
    """Bytes one device holds of an array of `nbytes` under `spec`: nbytes/k if split."""
    return nbytes // k if any(a is not None for a in spec) else nbytes
