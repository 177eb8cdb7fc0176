"""Host offload (docs/design.md §2): experts in host memory streamed to the device in pages,
and the KV cache of every layer on the host with grouped-query attention on the CPU."""

from moejax.host_offload.cpu_attention import CPUAttention, decode_rows, prefill_row
from moejax.host_offload.kv_cache import HostKVCache, PagedKVCache, quantize_int8
from moejax.host_offload.memory import DEFAULT_PAGE_BYTES, has_pinned_host
from moejax.host_offload.weight_store import HostWeightStore, Page, StorePlan, make_plan

__all__ = ["CPUAttention", "DEFAULT_PAGE_BYTES", "HostKVCache", "HostWeightStore", "Page",
           "PagedKVCache", "StorePlan", "decode_rows", "has_pinned_host", "make_plan",
           "prefill_row", "quantize_int8"]
