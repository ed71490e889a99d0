"""Memory of the whole card: total, used, free and what the driver reserves."""

from __future__ import annotations

from ..samples import Samples, add
from ..session import Device, NvmlSession, Unsupported


def read_memory(s: NvmlSession, dev: Device, out: Samples) -> None:
    nvml, labels = s.nvml, dev.labels
    try:
        mem = s.call(dev, "nvmlDeviceGetMemoryInfo_v2", nvml.nvmlDeviceGetMemoryInfo,
                     dev.handle, nvml.nvmlMemory_v2)
        add(out, "vllm_gpu_memory_reserved_bytes", labels, mem.reserved)
    except Unsupported:  # older drivers: v1 has no reserved figure and counts it as used
        mem = s.call(dev, "nvmlDeviceGetMemoryInfo", nvml.nvmlDeviceGetMemoryInfo, dev.handle)
    add(out, "vllm_gpu_memory_total_bytes", labels, mem.total)
    add(out, "vllm_gpu_memory_used_bytes", labels, mem.used)
    add(out, "vllm_gpu_memory_free_bytes", labels, mem.free)
