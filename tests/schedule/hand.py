"""The hand-computable model and hardware the schedule tests price (bf16: 2 bytes;
h=4, f=8, Hq=2, Hkv=1, head_dim=2, E=2, k=1, V=10; round-number rates)."""

from moejax.model_config.hardware import HardwareSpec
from moejax.model_config.model import ModelConfig

M = ModelConfig(name="hand", family="mixtral", vocab_size=10, hidden_size=4,
                expert_ffn_size=8, num_layers=3, num_heads=2, num_kv_heads=1, head_dim=2,
                num_experts=2, top_k=1, dtype="bfloat16")
HW = HardwareSpec(name="hand", gpu_fp16_flops_per_s=1000, gpu_fp32_flops_per_s=500,
                  gpu_memory_bytes=10_000, gpu_memory_bytes_per_s=100, cpu_flops_per_s=10,
                  host_memory_bytes=100_000, host_memory_bytes_per_s=50,
                  h2d_bytes_per_s=20, d2h_bytes_per_s=25, cpu_cores=1)
