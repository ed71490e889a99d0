"""How busy the GPU and its memory were over NVML's last sample period."""

from __future__ import annotations

from ..samples import Samples, add
from ..session import Device, NvmlSession


def read_utilization(s: NvmlSession, dev: Device, out: Samples) -> None:
    util = s.call(dev, "nvmlDeviceGetUtilizationRates", s.nvml.nvmlDeviceGetUtilizationRates,
                  dev.handle)
    add(out, "vllm_gpu_utilization_ratio", dev.labels, util.gpu / 100)
    add(out, "vllm_gpu_memory_utilization_ratio", dev.labels, util.memory / 100)
