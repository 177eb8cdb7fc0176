"""moejax's native checkpoint format: orbax-checkpoint, laid out as the host store streams.

    DIR/moejax_native.json   format, version, ModelConfig, page_bytes, per leaf its stored
                             shape, dtype, CRC-32 (written last: marks a complete save)
    DIR/params/<group>/      orbax PyTree (OCDBT + tensorstore) of one group, `embed`,
                             `layers_i`, `final_norm` or `lm_head` (format 1: one tree)

Non-expert leaves are stored as in the parameter tree; expert w1, w3 [E, h, f] and w2
[E, f, h] flat in moejax layout (transposed from HF's [out, in], stacked by expert) and
chunked at `page_bytes`, so a store page (docs/design.md §2) is one chunk of one leaf.
Loading hands one leaf at a time to `place(path, array)`, so the host holds the placed
weights plus one leaf; a truncated, missing or altered leaf fails its CRC-32 check: a
ValueError naming it, never a silent half-model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import zlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from moejax.checkpoints.hf import param_shapes, unflatten
from moejax.checkpoints.safetensors_io import _int
from moejax.host_offload.memory import DEFAULT_PAGE_BYTES
from moejax.model_config.model import ModelConfig
from moejax.quant import QTensor, check_expert, is_qtensor

FORMAT, VERSION = "moejax-native", 2  # 1: one orbax tree; 2: one per group (layer)
META, PARAMS = "moejax_native.json", "params"
PARTIAL = ".moejax-partial"  # marks a `.tmp` directory as an unfinished save
Path = tuple[str, ...]
Placer = Callable[[Path, np.ndarray], object]


def is_native_checkpoint(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, META))


def _is_expert(path: Path) -> bool:
    return len(path) >= 3 and path[1] == "experts"


def _stored(spec, path: Path) -> dict[Path, tuple[tuple[int, ...], np.dtype]]:
    """{storage path: (stored shape, dtype)} of one model leaf: a float leaf as is
    (experts flat); a quantized expert (`quant.QTensor`) as two flat leaves, its codes
    `<path>/q` and scales `<path>/scale`, written and CRC-checked side by side."""
    if is_qtensor(spec):
        return {path + (k,): ((int(np.prod(a.shape)),), np.dtype(a.dtype))
                for k, a in (("q", spec.q), ("scale", spec.scale))}
    shape = tuple(spec.shape)
    return {path: ((int(np.prod(shape)),) if _is_expert(path) else shape,
                   np.dtype(spec.dtype))}


def _key(path: Path) -> str:
    return "/".join(path)


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def _config_dict(cfg: ModelConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["dense_layers"] = list(cfg.dense_layers)
    return d


class NativeWriter:
    """`add(path, leaf)` buffers leaves until their group (`embed`, `layers_i`, …) is
    complete, then writes it as `params/<group>/`: host memory holds one layer, not the
    model. `finish()` writes the metadata; all under `directory.tmp`, renamed at the end,
    so an interrupted save never looks like a checkpoint."""

    def __init__(self, directory: str, cfg: ModelConfig, page_bytes: int | None = None):
        page_bytes = DEFAULT_PAGE_BYTES if page_bytes is None else int(page_bytes)
        if page_bytes <= 0 or page_bytes % cfg.bytes_per_param:
            raise ValueError(f"page_bytes={page_bytes} must be a positive multiple of "
                             f"{cfg.bytes_per_param}")
        if os.path.exists(directory):
            raise ValueError(f"output directory {directory!r} already exists")
        self.directory, self.cfg, self.page_bytes = directory, cfg, page_bytes
        self.shapes, self.dtype = param_shapes(cfg), np.dtype(jnp.dtype(cfg.dtype))
        self.pending: dict[str, set[Path]] = {}
        for path in self.shapes:
            self.pending.setdefault(path[0], set()).add(path)
        self.groups: dict[str, dict[Path, np.ndarray]] = {}
        self.leaves: dict[str, dict] = {}
        self.tmp = directory.rstrip("/") + ".tmp"
        if os.path.exists(self.tmp):  # an interrupted save's leftover, nothing else
            if os.listdir(self.tmp) and not os.path.exists(os.path.join(self.tmp, PARTIAL)):
                raise ValueError(f"{self.tmp!r} exists and is not an unfinished moejax "
                                 "save; move it away first")
            shutil.rmtree(self.tmp)
        os.makedirs(self.tmp)
        open(os.path.join(self.tmp, PARTIAL), "w").close()  # first: all after is ours
        os.makedirs(os.path.join(self.tmp, PARAMS))

    def add(self, path: Path, leaf) -> None:
        """Take one leaf (NumPy or jax, already in `cfg.dtype`; a quantized expert a
        `quant.QTensor`); returns None, so a loader's placed tree keeps nothing alive."""
        if path not in self.pending.get(path[0], ()):
            raise ValueError(f"params do not match the config at {_key(path)}")
        spec = self.shapes[path]
        if is_qtensor(spec) or is_qtensor(leaf):
            check_expert(self.cfg, _key(path), path[-1], leaf)
            arrays = {path + ("q",): np.asarray(leaf.q), path + ("scale",): np.asarray(leaf.scale)}
        else:
            a = np.asarray(leaf)
            if a.shape != spec.shape or a.dtype != self.dtype:
                raise ValueError(f"{_key(path)}: {a.dtype}{a.shape}, expected "
                                 f"{self.dtype}{spec.shape}")
            arrays = {path: a}
        for p, a in arrays.items():
            a = a.reshape(-1) if _is_expert(p) else a
            self.leaves[_key(p)] = {"shape": list(a.shape), "crc32": _crc(a)}
            self.groups.setdefault(path[0], {})[p] = a
        self.pending[path[0]].discard(path)
        if not self.pending[path[0]]:
            self._write(path[0])

    def _write(self, group: str) -> None:
        import orbax.checkpoint as ocp

        tree = self.groups.pop(group)
        save_args = {p: ocp.SaveArgs(chunk_byte_size=self.page_bytes if _is_expert(p)
                                     else None) for p in tree}
        ocp.PyTreeCheckpointer().save(
            os.path.join(self.tmp, PARAMS, group),
            args=ocp.args.PyTreeSave(unflatten(tree), save_args=unflatten(save_args)))

    def finish(self) -> None:
        missing = sorted(p for ps in self.pending.values() for p in ps)
        if missing:
            raise ValueError(f"params do not match the config at {_key(missing[0])}")
        meta = {"format": FORMAT, "version": VERSION, "config": _config_dict(self.cfg),
                "page_bytes": self.page_bytes, "dtype": self.cfg.dtype,
                "leaves": self.leaves}
        with open(os.path.join(self.tmp, META), "w") as f:
            json.dump(meta, f, indent=1)
        os.rename(self.tmp, self.directory)  # a failure here leaves a marked leftover
        os.remove(os.path.join(self.directory, PARTIAL))


def save_native(directory: str, cfg: ModelConfig, params: dict,
                page_bytes: int | None = None) -> None:
    """Write `params` (leaves NumPy or jax, already in `cfg.dtype`) to `directory`
    (`NativeWriter`)."""
    flat = {tuple(k.key for k in kp): leaf for kp, leaf in
            jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qtensor)[0]}
    shapes = param_shapes(cfg)
    if set(flat) != set(shapes):
        bad = sorted(set(flat) ^ set(shapes))[0]
        raise ValueError(f"params do not match the config at {_key(bad)}")
    writer = NativeWriter(directory, cfg, page_bytes)
    for path, leaf in flat.items():
        writer.add(path, leaf)
    writer.finish()


def read_meta(directory: str) -> dict:
    file = os.path.join(directory, META)
    try:
        with open(file) as f:
            meta = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # JSON and UTF-8 errors included
        raise ValueError(f"unreadable native checkpoint metadata {file}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{file}: not a {FORMAT} checkpoint")
    if meta.get("version") not in (1, VERSION):
        raise ValueError(f"{file}: format version {meta.get('version')!r}, this moejax "
                         f"reads 1 and {VERSION}")
    for k, kind in (("config", dict), ("leaves", dict), ("page_bytes", int)):
        if not isinstance(meta.get(k), kind) or isinstance(meta[k], bool):
            raise ValueError(f"{file}: {k!r} must be a JSON "
                             f"{'object' if kind is dict else 'integer'}, got "
                             f"{str(meta.get(k))[:60]}")
    for key, leaf in meta["leaves"].items():
        if not (isinstance(leaf, dict) and _int(leaf.get("crc32"))
                and isinstance(leaf.get("shape"), list)
                and all(_int(d) and d >= 0 for d in leaf["shape"])):
            raise ValueError(f"{file}: leaf {key!r} must be an object with an integer "
                             f"'crc32' and a 'shape' list, got {str(leaf)[:60]}")
    return meta


def native_config(directory: str) -> ModelConfig:
    d = dict(read_meta(directory)["config"])
    try:
        d["dense_layers"] = tuple(d.get("dense_layers", ()))
        return ModelConfig(**d)
    except TypeError as e:
        raise ValueError(f"{directory}: bad config in {META}: {e}") from None


def _check_leaves(directory: str, cfg: ModelConfig, leaves: dict) -> dict[Path, dict]:
    """{model path: its `_stored` leaves}, after checking the metadata names exactly the
    model's stored leaves, each of its stored length (a quantized expert's packed codes
    and scales by name: a wrong group size or packing is named, not a CRC failure)."""
    shapes = param_shapes(cfg)
    plan = {path: _stored(spec, path) for path, spec in shapes.items()}
    want = {_key(p) for parts in plan.values() for p in parts}
    missing, extra = sorted(want - set(leaves)), sorted(set(leaves) - want)
    if missing or extra:
        what = f"missing leaf {missing[0]!r}" if missing else f"unexpected leaf {extra[0]!r}"
        if cfg.expert_quantized or any(k.endswith("/scale") for k in extra):
            what += f" (the config says {cfg.expert_dtype or 'float'} experts)"
        raise ValueError(f"native checkpoint {directory}: {what}")
    for path, parts in plan.items():
        for p, (stored, _) in parts.items():
            if tuple(leaves[_key(p)]["shape"]) != stored:
                kind = {"q": "packed codes", "scale": "scales"}.get(p[-1], "leaf")
                extra = f" ({cfg.expert_dtype}, group size {cfg.expert_group_size})" \
                    if p[-1] in ("q", "scale") else ""
                verb = "has" if kind == "leaf" else "have"
                raise ValueError(f"native checkpoint {directory}: {kind} {_key(p)!r} {verb} "
                                 f"shape {tuple(leaves[_key(p)]['shape'])}, expected "
                                 f"{stored}{extra}")
    return plan


def _restore(ckptr, where: str, directory: str, path: Path, shape, dtype, crc) -> np.ndarray:
    """One stored leaf, read and checked against its shape, dtype and CRC-32."""
    import orbax.checkpoint as ocp

    item = unflatten({path: jax.ShapeDtypeStruct(shape, dtype)})
    args = unflatten({path: ocp.RestoreArgs(restore_type=np.ndarray)})
    try:
        got = ckptr.restore(where, args=ocp.args.PyTreeRestore(
            item=item, restore_args=args, partial_restore=True))
        for k in path:
            got = got[k]
    except Exception as e:  # orbax/tensorstore raise many kinds; name the leaf
        raise ValueError(f"corrupt native checkpoint {directory}: cannot read leaf "
                         f"{_key(path)!r}: {type(e).__name__}: {str(e)[:200]}") from None
    a = np.asarray(got)
    if a.shape != shape or a.dtype != dtype or _crc(a) != crc:
        raise ValueError(f"corrupt native checkpoint {directory}: leaf {_key(path)!r} "
                         "fails its CRC-32/shape check")
    return a


def load_native(directory: str, dtype: str | None = None,
                place: Placer | None = None) -> tuple[ModelConfig, dict]:
    """(config, parameter tree) from a native checkpoint, one leaf at a time through
    `place(path, host array)` (default: onto the device; a quantized expert arrives as
    a `quant.QTensor` of host arrays). `dtype` casts on load (a quantized expert's
    scales; its codes stay)."""
    import orbax.checkpoint as ocp

    meta = read_meta(directory)
    cfg = stored_cfg = native_config(directory)
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    target = np.dtype(jnp.dtype(cfg.dtype))
    plan = _check_leaves(directory, stored_cfg, meta["leaves"])
    shapes = param_shapes(cfg)
    ckpt = os.path.join(directory, PARAMS)
    if not os.path.isdir(ckpt):
        raise ValueError(f"native checkpoint {directory}: no {PARAMS}/ directory")
    place = place or (lambda path, a: jax.device_put(a))
    ckptr = ocp.PyTreeCheckpointer()
    out = {}
    for path, parts in plan.items():
        where = ckpt if meta["version"] == 1 else os.path.join(ckpt, path[0])
        got = {p[-1]: _restore(ckptr, where, directory, p, shape, dt,
                               meta["leaves"][_key(p)]["crc32"])
               for p, (shape, dt) in parts.items()}
        spec = shapes[path]
        if is_qtensor(spec):
            a = QTensor(got["q"].reshape(spec.q.shape),
                        got["scale"].reshape(spec.scale.shape).astype(target, copy=False),
                        spec.bits, spec.group)
        else:
            a = got[path[-1]].reshape(spec.shape).astype(target, copy=False)
        del got
        out[path] = place(path, a)
        del a
    return cfg, unflatten(out)


def convert_hf(checkpoint: str, out: str, dtype: str | None = None,
               page_bytes: int | None = None, expert_dtype: str | None = None,
               group_size: int | None = None) -> ModelConfig:
    """HF checkpoint directory → native directory `out`; returns the saved config.
    `expert_dtype` "int8" | "int4" (groups of `group_size`) quantizes the experts, one
    tensor at a time, as they are read."""
    from moejax.quant import quantized_config

    from moejax.checkpoints.hf import hf_checkpoint_config, is_hf_checkpoint, load_hf_params

    if not is_hf_checkpoint(checkpoint):
        raise ValueError(f"{checkpoint!r} is not an HF checkpoint (config.json + "
                         "model.safetensors[.index.json])")
    cfg = hf_checkpoint_config(checkpoint)
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    if expert_dtype is not None or group_size is not None:
        cfg = quantized_config(cfg, expert_dtype, group_size)
    writer = NativeWriter(out, cfg, page_bytes)
    try:
        load_hf_params(checkpoint, cfg, place=writer.add)  # a layer at a time
        writer.finish()
    except BaseException:
        shutil.rmtree(writer.tmp, ignore_errors=True)
        raise
    return cfg
