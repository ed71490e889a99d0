"""Memory of each MIG instance (the instances are found when the session starts)."""

from __future__ import annotations

from ..samples import Samples, add
from ..session import Device, NvmlSession


def read_mig_memory(s: NvmlSession, dev: Device, out: Samples) -> None:
    for mig in dev.migs:
        mem = s.call(dev, "nvmlDeviceGetMemoryInfo(MIG)", s.nvml.nvmlDeviceGetMemoryInfo,
                     mig.handle)
        add(out, "vllm_gpu_mig_memory_total_bytes", mig.labels, mem.total)
        add(out, "vllm_gpu_mig_memory_used_bytes", mig.labels, mem.used)
        add(out, "vllm_gpu_mig_memory_free_bytes", mig.labels, mem.free)
