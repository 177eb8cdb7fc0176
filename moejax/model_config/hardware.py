"""Hardware as data: one frozen `HardwareSpec` per machine (GPU + host + link).

Units are in the field names: `_bytes` (bytes), `_bytes_per_s` (bytes/s), `_flops_per_s`
(FLOP/s), `_s` (seconds). Every constant below carries its source. The `*_moe_lightning`
presets are MoE-Lightning's own constants (docs/design.md §4) and exist to reproduce its model;
`l4`, `t4`, `a40`, `h100` use vendor datasheets and typical measured link/host figures;
`local` is measured on this machine by `moejax.calibration` (registered here through
`set_local_loader`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

GiB = 2**30
MiB = 2**20
GB = 1e9
TFLOP = 1e12


def fmt_bytes(nbytes: float) -> str:
    """A size for a message: GiB from 1 GiB up, else MiB (so small models' sizes do not
    all read 0.00 GiB)."""
    return f"{nbytes / GiB:.2f} GiB" if abs(nbytes) >= GiB else f"{nbytes / MiB:.1f} MiB"


@dataclass(frozen=True)
class HardwareSpec:
    """One accelerator ("GPU"), its host, and the link between them.

    The optional `gemm_*` and `cpu_attention_bytes_per_s` fields hold calibrated kernel
    rates (docs/design.md §4, MoE-Lens calibration); where set, `moejax.schedule.costs` prices
    device GEMMs as `gemm_intercept_s + flops / gemm_flops_per_s` and CPU attention at the
    measured KV-read rate instead of the roofline peaks.
    """

    name: str
    gpu_fp16_flops_per_s: float  # dense half precision (fp16/bf16) matmul peak
    gpu_fp32_flops_per_s: float  # dense fp32 peak
    gpu_memory_bytes: float
    gpu_memory_bytes_per_s: float
    cpu_flops_per_s: float  # host fp32 peak (all cores used for attention)
    host_memory_bytes: float
    host_memory_bytes_per_s: float  # host DRAM read bandwidth (shared by CPU and DMA)
    h2d_bytes_per_s: float  # host -> device copy bandwidth (pinned)
    d2h_bytes_per_s: float  # device -> host copy bandwidth (pinned)
    cpu_cores: int
    link_latency_s: float = 0.0  # fixed cost of one host<->device transfer
    device_is_host: bool = False  # the "GPU" computes on the host cores (local testbed)
    gemm_intercept_s: float | None = None  # calibrated: one expert FFN call, fixed part
    gemm_flops_per_s: float | None = None  # calibrated: 1 / slope of that line, in FLOP/s
    cpu_attention_bytes_per_s: float | None = None  # calibrated: KV bytes read per s
    device_op_overhead_s: float = 0.0  # calibrated: fixed cost of one device op (dispatch,
    # wake-up, block) as the executor sees it; ~µs on a GPU, ms on the CPU testbed
    cpu_attention_call_s: float = 0.0  # calibrated: fixed cost of one CPU attention call
    copy_core_demand: float = 1.0  # calibrated where device_is_host: host cores one
    # host<->device copy takes from compute running beside it (memcpy contends for memory
    # bandwidth, so it can cost compute more than the one core it runs on)
    dequant_int8_elems_per_s: float | None = None  # calibrated: expert weights
    dequant_int4_elems_per_s: float | None = None  # dequantized per s (None: roofline)
    h2d_curve: tuple | None = None  # calibrated: ((transfer bytes, bytes/s), …) of single
    # h2d transfers by size; `costs.h2d_s` interpolates it (log size), flat outside; None:
    # every transfer at h2d_bytes_per_s
    source: str = ""
    # k tensor-parallel devices on one host (docs/design.md §10): every gpu_* and h2d/d2h
    # field above is per device; each device has its own link
    num_devices: int = 1
    host_link_bytes_per_s: float | None = None  # all k links together at most this (they
    # share a root complex / host memory bandwidth); None: independent, k × per link
    allreduce_bytes_per_s: float | None = None  # ring all-reduce bus bandwidth per device
    # (NVLink, or PCIe peer-to-peer); None: through the host at d2h_bytes_per_s
    allreduce_latency_s: float = 0.0  # fixed cost of one all-reduce

    def __post_init__(self):
        positive = ("gpu_fp16_flops_per_s", "gpu_fp32_flops_per_s", "gpu_memory_bytes",
                    "gpu_memory_bytes_per_s", "cpu_flops_per_s", "host_memory_bytes",
                    "host_memory_bytes_per_s", "h2d_bytes_per_s", "d2h_bytes_per_s",
                    "cpu_cores", "copy_core_demand")
        optional = ("gemm_flops_per_s", "cpu_attention_bytes_per_s",
                    "dequant_int8_elems_per_s", "dequant_int4_elems_per_s")
        bad = [f"{k}={getattr(self, k)!r}" for k in positive if not _pos(getattr(self, k))]
        bad += [f"{k}={getattr(self, k)!r}" for k in optional
                if getattr(self, k) is not None and not _pos(getattr(self, k))]
        if isinstance(self.cpu_cores, bool) or not isinstance(self.cpu_cores, int):
            bad.append(f"cpu_cores={self.cpu_cores!r} (a whole number)")
        if not isinstance(self.device_is_host, bool):
            bad.append(f"device_is_host={self.device_is_host!r} (true or false)")
        if self.h2d_curve is not None:
            pts = self.h2d_curve
            ok = (isinstance(pts, (list, tuple)) and len(pts) > 0
                  and all(isinstance(p, (list, tuple)) and len(p) == 2 and _pos(p[0])
                          and _pos(p[1]) for p in pts)
                  and all(a[0] < b[0] for a, b in zip(pts, pts[1:])))
            if not ok:
                bad.append(f"h2d_curve={pts!r} (want increasing (bytes, bytes/s) pairs)")
            else:  # hashable, as a frozen spec should be
                object.__setattr__(self, "h2d_curve", tuple(tuple(p) for p in pts))
        for k in ("link_latency_s", "gemm_intercept_s", "device_op_overhead_s",
                  "cpu_attention_call_s"):
            v = getattr(self, k)
            if v is not None and not (_pos(v) or v == 0):
                bad.append(f"{k}={v!r}")
        if isinstance(self.num_devices, bool) or not isinstance(self.num_devices, int) \
                or self.num_devices < 1:
            bad.append(f"num_devices={self.num_devices!r} (a whole number >= 1)")
        for k in ("host_link_bytes_per_s", "allreduce_bytes_per_s"):
            if getattr(self, k) is not None and not _pos(getattr(self, k)):
                bad.append(f"{k}={getattr(self, k)!r}")
        if not (_pos(self.allreduce_latency_s) or self.allreduce_latency_s == 0):
            bad.append(f"allreduce_latency_s={self.allreduce_latency_s!r}")
        if bad:
            raise ValueError(f"HardwareSpec {self.name!r}: must be finite and > 0 "
                             "(latencies >= 0): "
                             + ", ".join(bad))
        if (self.gemm_intercept_s is None) != (self.gemm_flops_per_s is None):
            raise ValueError(f"HardwareSpec {self.name!r}: gemm_intercept_s and "
                             "gemm_flops_per_s must be given together")

    def gpu_flops_per_s(self, dtype: str) -> float:
        """Device matmul peak for a weight dtype: fp32 or the half-precision tensor rate."""
        if dtype == "float32":
            return self.gpu_fp32_flops_per_s
        if dtype in ("bfloat16", "float16", "int8"):
            return self.gpu_fp16_flops_per_s
        raise ValueError(f"unknown dtype {dtype!r}")

    def links_bytes_per_s(self, per_link):
        """Host↔device bytes/s of all k links together: min(k·per_link, the shared cap)."""
        agg = self.num_devices * per_link
        cap = self.host_link_bytes_per_s
        return agg if cap is None else np.minimum(agg, cap)

    def aggregated(self) -> "HardwareSpec":
        """One device with k× the compute, memory, device and link bandwidth (the links
        capped by `host_link_bytes_per_s`): the ideal tensor parallel MoE-Lightning's
        model (`schedule.hrm`) prices; self when k = 1."""
        k = self.num_devices
        if k == 1:
            return self
        return self.replace(
            name=f"{self.name}(aggregated)", num_devices=1,
            gpu_fp16_flops_per_s=k * self.gpu_fp16_flops_per_s,
            gpu_fp32_flops_per_s=k * self.gpu_fp32_flops_per_s,
            gpu_memory_bytes=k * self.gpu_memory_bytes,
            gpu_memory_bytes_per_s=k * self.gpu_memory_bytes_per_s,
            h2d_bytes_per_s=float(self.links_bytes_per_s(self.h2d_bytes_per_s)),
            d2h_bytes_per_s=float(self.links_bytes_per_s(self.d2h_bytes_per_s)),
            host_link_bytes_per_s=None)

    def replace(self, **changes) -> "HardwareSpec":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "HardwareSpec":
        if not isinstance(d, dict):
            raise ValueError(f"HardwareSpec JSON must be an object, got "
                             f"{type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"HardwareSpec JSON has unknown fields {unknown}")
        if d.get("h2d_curve") is not None:
            d = {**d, "h2d_curve": tuple(tuple(p) for p in d["h2d_curve"])}
        return cls(**d)


def _pos(v) -> bool:
    """A finite real number > 0 (not a bool, not a string)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
        and v > 0


# --------------------------------------------------------------------- presets
# MoE-Lightning's L4 constants, docs/design.md §4 (its policy-search preset), reproduced exactly.
L4_MOE_LIGHTNING = HardwareSpec(
    name="l4_moe_lightning",
    gpu_fp16_flops_per_s=104 * TFLOP,  # docs/design.md §4: "GPU 104 TFLOP/s"
    gpu_fp32_flops_per_s=30.3 * TFLOP,  # NVIDIA L4 datasheet (not used by MoE-Lightning)
    gpu_memory_bytes=24 * GiB,  # docs/design.md §4: "gmem 24 GiB"
    gpu_memory_bytes_per_s=285 * GiB,  # docs/design.md §4: "GPU memory 285 GiB/s"
    cpu_flops_per_s=1.6 * TFLOP,  # docs/design.md §4: "CPU 1.6 TFLOP/s"
    host_memory_bytes=184.29 * GiB,  # docs/design.md §4: "cmem 184.29 GiB"
    host_memory_bytes_per_s=76 * GiB,  # docs/design.md §4: "CPU memory 76 GiB/s"
    h2d_bytes_per_s=16 * GiB,  # docs/design.md §4: "PCIe 16 GiB/s"
    d2h_bytes_per_s=16 * GiB,  # docs/design.md §4: same link, each way
    cpu_cores=24,  # assumed (not part of MoE-Lightning's formulas)
    source="MoE-Lightning L4 preset (docs/design.md §4)",
)

# MoE-Lightning's T4 constants, docs/design.md §4; fields it does not restate are the L4 ones.
T4_MOE_LIGHTNING = L4_MOE_LIGHTNING.replace(
    name="t4_moe_lightning",
    gpu_fp16_flops_per_s=65 * TFLOP,  # docs/design.md §4: "65 TFLOP/s"
    gpu_fp32_flops_per_s=8.1 * TFLOP,  # NVIDIA T4 datasheet (not used by MoE-Lightning)
    gpu_memory_bytes=15 * GiB,  # docs/design.md §4: "gmem 15 GiB"
    gpu_memory_bytes_per_s=300 * GiB,  # docs/design.md §4: "GPU 300 GiB/s"
    cpu_flops_per_s=0.8 * TFLOP,  # docs/design.md §4: "CPU 0.8 TFLOP/s"
    source="MoE-Lightning T4 preset (docs/design.md §4); host as its L4 preset",
)

# Host of the L4/T4 presets: the MoE-Lightning VM as docs/design.md §1/§4 describe it.
_GCP_HOST = dict(
    cpu_flops_per_s=1.6 * TFLOP,  # MoE-Lightning's measured host figure (docs/design.md §4)
    host_memory_bytes=192 * GB,  # docs/design.md §1: "192 GB of host RAM"
    host_memory_bytes_per_s=76 * GiB,  # MoE-Lightning's measured host figure (docs/design.md §4)
    cpu_cores=24,  # assumed
    link_latency_s=10e-6,  # typical cudaMemcpyAsync launch + DMA setup, ~5-10 us
)

L4 = HardwareSpec(
    name="l4",
    gpu_fp16_flops_per_s=121 * TFLOP,  # NVIDIA L4 datasheet: 242 TFLOP/s bf16 w/ sparsity
    gpu_fp32_flops_per_s=30.3 * TFLOP,  # NVIDIA L4 datasheet
    gpu_memory_bytes=23034 * MiB,  # nvidia-smi total on an L4 (24 GB GDDR6 nominal)
    gpu_memory_bytes_per_s=300 * GB,  # NVIDIA L4 datasheet
    h2d_bytes_per_s=25 * GB,  # PCIe 4.0 x16, pinned: ~25 GB/s typical of 31.5 GB/s nominal
    d2h_bytes_per_s=25 * GB,  # idem, other direction
    source="NVIDIA L4 datasheet; PCIe 4.0 typical measured; host as MoE-Lightning's VM",
    **_GCP_HOST,
)

T4 = HardwareSpec(
    name="t4",
    gpu_fp16_flops_per_s=65 * TFLOP,  # NVIDIA T4 datasheet (mixed fp16 tensor cores)
    gpu_fp32_flops_per_s=8.1 * TFLOP,  # NVIDIA T4 datasheet
    gpu_memory_bytes=15360 * MiB,  # nvidia-smi total on a T4 (16 GB GDDR6 nominal)
    gpu_memory_bytes_per_s=320 * GB,  # NVIDIA T4 datasheet
    h2d_bytes_per_s=12 * GB,  # PCIe 3.0 x16, pinned: ~12 GB/s typical of 15.75 nominal
    d2h_bytes_per_s=12 * GB,  # idem, other direction
    source="NVIDIA T4 datasheet; PCIe 3.0 typical measured; host as MoE-Lightning's VM",
    **_GCP_HOST,
)

# MoE-Lens testbed (MoE-Lens, docs/design.md §6): A40 + one socket of a dual Xeon 8380.
A40 = HardwareSpec(
    name="a40",
    gpu_fp16_flops_per_s=149.7 * TFLOP,  # NVIDIA A40 datasheet (299.4 w/ sparsity)
    gpu_fp32_flops_per_s=37.4 * TFLOP,  # NVIDIA A40 datasheet
    gpu_memory_bytes=46068 * MiB,  # nvidia-smi total on an A40 (48 GB GDDR6 nominal)
    gpu_memory_bytes_per_s=696 * GB,  # NVIDIA A40 datasheet
    cpu_flops_per_s=2.94 * TFLOP,  # Xeon 8380: 40 cores x 2.3 GHz x 32 fp32 FLOP/cycle
    # (AVX2 rate; its two AVX-512 FMA units peak at 64, 5.89 TFLOP/s, at lower clocks)
    host_memory_bytes=256 * GiB,  # assumed; MoE-Lens varies KV capacity 70-210 GB
    host_memory_bytes_per_s=160 * GB,  # ~78% of 8ch DDR4-3200 (204.8 GB/s), STREAM-like
    h2d_bytes_per_s=25 * GB,  # PCIe 4.0 x16, pinned: ~25 GB/s typical
    d2h_bytes_per_s=25 * GB,  # idem
    cpu_cores=40,  # Intel Xeon Platinum 8380 (one socket, numactl as in MoE-Lens)
    link_latency_s=10e-6,  # typical cudaMemcpyAsync launch + DMA setup
    source="NVIDIA A40 / Intel Xeon 8380 datasheets; MoE-Lens testbed (one socket)",
)

H100 = HardwareSpec(
    name="h100",
    gpu_fp16_flops_per_s=989 * TFLOP,  # NVIDIA H100 SXM5 datasheet, dense bf16
    gpu_fp32_flops_per_s=67 * TFLOP,  # NVIDIA H100 SXM5 datasheet
    gpu_memory_bytes=81559 * MiB,  # nvidia-smi total on an H100 80GB HBM3
    gpu_memory_bytes_per_s=3.35e12,  # NVIDIA H100 SXM5 datasheet
    cpu_flops_per_s=3.58 * TFLOP,  # Xeon 8480+: 56 cores x 2.0 GHz x 32 fp32 FLOP/cycle
    # (AVX2 rate; its two AVX-512 FMA units peak at 64, 7.17 TFLOP/s, at lower clocks)
    host_memory_bytes=1024 * GiB,  # DGX H100: 2 TB over two sockets, one socket's share
    host_memory_bytes_per_s=250 * GB,  # ~80% of 8ch DDR5-4800 (307 GB/s) per socket
    h2d_bytes_per_s=50 * GB,  # PCIe 5.0 x16, pinned: ~50 GB/s typical of 63 nominal
    d2h_bytes_per_s=50 * GB,  # idem
    cpu_cores=56,  # Intel Xeon Platinum 8480+ (one socket)
    link_latency_s=10e-6,  # typical cudaMemcpyAsync launch + DMA setup
    source="NVIDIA H100 SXM5 / Intel Xeon 8480+ datasheets; PCIe 5.0 typical measured",
)

_PRESETS: dict[str, HardwareSpec] = {
    h.name: h for h in (L4_MOE_LIGHTNING, T4_MOE_LIGHTNING, L4, T4, A40, H100)}


def hardware_names() -> list[str]:
    return sorted([*_PRESETS, "local"])


_LOCAL_LOADER = None  # set by moejax.calibration: measures or reads the `local` spec


def set_local_loader(loader) -> None:
    """Register the function behind `local_hardware` (moejax.calibration does, on import):
    presets stay data, and measuring the machine is a tool above the engine."""
    global _LOCAL_LOADER
    _LOCAL_LOADER = loader


def local_hardware(model=None) -> HardwareSpec:
    """The calibrated `local` spec (for `model`'s expert shape when given)."""
    if _LOCAL_LOADER is None:
        raise ValueError("the local hardware is measured by moejax.calibration; "
                         "import moejax first")
    return _LOCAL_LOADER(model=model)


def get_hardware(name: str) -> HardwareSpec:
    """Preset by name; `local` loads (or runs) the calibration. Unknown names raise
    ValueError listing the valid ones."""
    if name == "local":
        return local_hardware()
    if name not in _PRESETS:
        raise ValueError(f"unknown hardware {name!r}; valid: {', '.join(hardware_names())}")
    return _PRESETS[name]
