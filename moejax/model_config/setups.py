"""Experiment setups (`--config mixtral_l4`): a model on a machine running a workload.
Multi-GPU setups (MoE-Lightning's Mixtral 8x22B and DBRX on 2 and 4 T4s) are k-device
`HardwareSpec`s (`num_devices`, docs/design.md §10): per-device memory, compute and link,
k PCIe x16 links on one host (independent unless `shared_link_gib_s` caps them together),
an all-reduce after o_proj and after w2 through the host's PCIe root complex."""

from __future__ import annotations

from dataclasses import dataclass

from moejax.model_config.hardware import HardwareSpec, get_hardware
from moejax.model_config.model import ModelConfig, get_model
from moejax.model_config.workload import Workload, get_workload


@dataclass(frozen=True)
class Setup:
    name: str
    model_name: str
    hardware_name: str
    workload_name: str
    num_gpus: int = 1
    device_memory_gib: float | None = None  # emulated device budget (None: the GPU's)
    host_memory_gb: float | None = None  # host RAM override (None: the preset's)
    shared_link_gib_s: float | None = None  # k links together at most this (None: k×)

    @property
    def model(self) -> ModelConfig:
        return get_model(self.model_name)

    @property
    def workload(self) -> Workload:
        return get_workload(self.workload_name)

    @property
    def hardware(self) -> HardwareSpec:
        hw = tensor_parallel(get_hardware(self.hardware_name), self.num_gpus,
                             self.shared_link_gib_s)
        if self.host_memory_gb is not None:
            hw = hw.replace(host_memory_bytes=self.host_memory_gb * 1e9,
                            source=hw.source + f"; host RAM {self.host_memory_gb:g} GB")
        return hw


# T4s have no NVLink: an all-reduce goes over PCIe through the root complex (peer to peer
# or via host memory), ~ one link's rate each way; ~20 µs per call (NCCL ring over PCIe,
# small messages: an assumption, no measurement of ours)
T4_ALLREDUCE_LATENCY_S = 20e-6


def tensor_parallel(hw: HardwareSpec, k: int, shared_link_gib_s: float | None = None
                    ) -> HardwareSpec:
    """k devices like `hw`, one link each (together at most `shared_link_gib_s` GiB/s),
    all-reduce over PCIe at one link's rate; `hw` itself for k = 1."""
    if k == 1:
        return hw
    shared = f", links share {shared_link_gib_s:g} GiB/s" if shared_link_gib_s else ""
    return hw.replace(
        name=f"{hw.name}x{k}", num_devices=k,
        host_link_bytes_per_s=None if shared_link_gib_s is None else
        shared_link_gib_s * 2**30, allreduce_bytes_per_s=hw.d2h_bytes_per_s,
        allreduce_latency_s=T4_ALLREDUCE_LATENCY_S,
        source=f"{k} x ({hw.source}), tensor parallel, one link each{shared}")


def scale_gpus(hw: HardwareSpec, k: int) -> HardwareSpec:
    """k identical GPUs, ideal tensor parallelism, one shared host (one device with k×
    everything: what MoE-Lightning's model prices, `HardwareSpec.aggregated`)."""
    if k == 1:
        return hw
    return hw.replace(
        name=f"{hw.name}x{k}", gpu_fp16_flops_per_s=k * hw.gpu_fp16_flops_per_s,
        gpu_fp32_flops_per_s=k * hw.gpu_fp32_flops_per_s,
        gpu_memory_bytes=k * hw.gpu_memory_bytes,
        gpu_memory_bytes_per_s=k * hw.gpu_memory_bytes_per_s,
        h2d_bytes_per_s=k * hw.h2d_bytes_per_s, d2h_bytes_per_s=k * hw.d2h_bytes_per_s,
        source=f"{k} x ({hw.source}), ideal tensor parallel")


_SETUPS = {s.name: s for s in (
    # MoE-Lightning's own constants (docs/design.md §4), so its figure is reproduced as is.
    Setup("mixtral_l4", "mixtral_8x7b", "l4_moe_lightning", "mtbench_g32"),
    Setup("mixtral_t4", "mixtral_8x7b", "t4_moe_lightning", "mtbench_g32"),
    # Mixtral 8x22B's 282 GB and DBRX's 264 GB of bf16 weights do not fit the 184 GiB
    # host of the L4 preset; a GCP VM with 416 GB (n1-highmem-64, which takes up to 4
    # T4s) is assumed — our notes do not give MoE-Lightning's host for these runs.
    Setup("mixtral_8x22b_t4x2", "mixtral_8x22b", "t4_moe_lightning", "mtbench_g32",
          num_gpus=2, host_memory_gb=416),
    Setup("mixtral_8x22b_t4x4", "mixtral_8x22b", "t4_moe_lightning", "mtbench_g32",
          num_gpus=4, host_memory_gb=416),
    Setup("dbrx_t4x2", "dbrx", "t4_moe_lightning", "mtbench_g32", num_gpus=2,
          host_memory_gb=416),
    Setup("dbrx_t4x4", "dbrx", "t4_moe_lightning", "mtbench_g32", num_gpus=4,
          host_memory_gb=416),
    Setup("qwen3_l4", "qwen3_30b_a3b", "l4_moe_lightning", "mtbench_g32"),
    # Vendor datasheet figures (hardware.py) instead.
    Setup("mixtral_l4_vendor", "mixtral_8x7b", "l4", "mtbench_g32"),
    Setup("mixtral_t4_vendor", "mixtral_8x7b", "t4", "mtbench_g32"),
    # This machine, calibrated, a 2 GiB emulated device (the 4-layer model streams).
    Setup("tiny_local", "mixtral_4l_1024", "local", "local_demo", device_memory_gib=2.0),
)}


def setup_names() -> list[str]:
    return sorted(_SETUPS)


def get_setup(name: str) -> Setup:
    """Setup by name; an unknown name raises ValueError listing the valid ones."""
    if name not in _SETUPS:
        raise ValueError(f"unknown config {name!r}; valid: {', '.join(setup_names())}")
    return _SETUPS[name]


def scaled_for_local(cfg: ModelConfig, hidden_size: int = 1024, num_layers: int = 4,
                     max_vocab: int = 32000) -> ModelConfig:
    """`cfg` shrunk for a small CPU machine: family switches, experts, top-k, GQA group and
    ffn/hidden ratio kept; hidden size, layers and vocabulary shrink; float32 (XLA's CPU
    GEMMs are fastest in fp32). `cfg` itself, as float32, when it is already no larger."""
    if cfg.hidden_size <= hidden_size and cfg.num_layers <= num_layers:
        return cfg.replace(dtype="float32")
    num_layers = min(num_layers, cfg.num_layers)
    head_dim = min(cfg.head_dim, 128, max(16, hidden_size // (2 * cfg.group_size)))
    heads = max(hidden_size // head_dim, cfg.group_size)
    heads -= heads % cfg.group_size
    scale = hidden_size / cfg.hidden_size
    dense = tuple(i for i in cfg.dense_layers if i < num_layers)
    return cfg.replace(
        name=f"{cfg.name}_local", hidden_size=hidden_size, num_layers=num_layers,
        expert_ffn_size=max(16, round(cfg.expert_ffn_size * scale / 16) * 16),
        num_heads=heads, num_kv_heads=heads // cfg.group_size, head_dim=head_dim,
        vocab_size=min(cfg.vocab_size, max_vocab), dtype="float32", dense_layers=dense,
        dense_ffn_size=max(16, round(cfg.dense_ffn_size * scale / 16) * 16) if dense else 0,
        max_positions=min(cfg.max_positions, 4096))
