"""The calibration cache: where the `local` HardwareSpec is kept, what a cache must match
to be reused (its stamp), and one process calibrating at a time (a lock)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re

from moejax.model_config.hardware import HardwareSpec

CALIBRATION_ENV = "MOEJAX_CALIBRATION"
DEFAULT_CALIBRATION_PATH = os.path.join("~", ".cache", "moejax", "local_hw.json")


def calibration_path() -> str:
    """Where `local` is cached: `$MOEJAX_CALIBRATION` or ~/.cache/moejax/local_hw.json."""
    return os.path.expanduser(os.environ.get(CALIBRATION_ENV) or DEFAULT_CALIBRATION_PATH)


CACHE_VERSION = 4  # bump when the calibrated fields or their meaning change
_WARNED: set = set()  # (cache, model shape) pairs already warned about


def cache_stamp(model) -> dict:
    """Stamp a cache must match to be reused: format, core count, where it ran (backend,
    device kind, jax version: a CPU calibration never prices a GPU), and the expert
    shape the GEMM line and page curve were fitted on."""
    stamp = {"cache_version": CACHE_VERSION, "cpu_count": os.cpu_count() or 1,
             **machine_stamp()}
    if model is not None:
        stamp["model_shape"] = [model.hidden_size, model.expert_ffn_size, model.dtype]
    return stamp


def machine_stamp() -> dict:
    """{backend, device_kind, jax}: the device the calibration measured."""
    import jax

    dev = jax.devices()[0]
    return {"backend": dev.platform, "device_kind": dev.device_kind,
            "jax": jax.__version__}


def local_calibration_path(model=None) -> str:
    """`$MOEJAX_CALIBRATION`, else ~/.cache/moejax/local_hw[_<name>_<hidden>x<ffn>].json
    (with `model`: one fit per expert shape)."""
    path = calibration_path()
    if model is None or os.environ.get(CALIBRATION_ENV):
        return path
    name = re.sub(r"[^\w.-]", "_", model.name)
    return f"{os.path.splitext(path)[0]}_{name}_{model.hidden_size}x" \
           f"{model.expert_ffn_size}.json"


def read_cache(path: str, model) -> HardwareSpec:
    """The cached spec; ValueError saying why it cannot be reused."""
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise ValueError(f"unreadable: {e}") from None
    if not isinstance(d, dict) or not isinstance(d.get("meta"), dict):
        raise ValueError("not a calibration cache")
    meta, want = d["meta"], cache_stamp(model) if model is not None else None
    if meta.get("cache_version") != CACHE_VERSION:
        raise ValueError(f"cache version {meta.get('cache_version')!r}, "
                         f"this moejax writes {CACHE_VERSION}")
    if meta.get("cpu_count") != (os.cpu_count() or 1):
        raise ValueError(f"measured on {meta.get('cpu_count')} cores, this machine has "
                         f"{os.cpu_count()}")
    for k, v in machine_stamp().items():
        if meta.get(k) != v:
            raise ValueError(f"measured with {k}={meta.get(k)!r}, this process runs {v!r}")
    if want is not None and meta.get("model_shape") != want["model_shape"] \
            and (path, str(want["model_shape"])) not in _WARNED:
        _WARNED.add((path, str(want["model_shape"])))
        logging.warning("calibration %s was fitted on a model of shape %s, not %s",
                        path, meta.get("model_shape"), want["model_shape"])
    return HardwareSpec.from_json(d.get("spec"))


@contextlib.contextmanager
def lock(path: str):
    """Exclusive lock on `path`.lock for the block; none where it cannot be made."""
    import fcntl

    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        f = open(path + ".lock", "a")
    except OSError:
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        yield


def write_cache(path: str, spec: HardwareSpec, meta: dict) -> None:
    """Write {"spec", "meta"} atomically; an unwritable path loses only the cache."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "w") as f:
            json.dump({"spec": spec.to_json(), "meta": meta}, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:  # the measurement stands; only the cache is lost
        logging.warning("calibration not cached (%s): %s", path, e)
        with contextlib.suppress(OSError):
            os.remove(tmp)
