"""PCIe throughput by direction (opt-in: each call blocks ~20 ms)."""

from __future__ import annotations

from ..samples import Samples, add
from ..session import Device, NvmlSession


def read_pcie_throughput(s: NvmlSession, dev: Device, out: Samples) -> None:
    nvml = s.nvml
    for counter, direction in ((nvml.NVML_PCIE_UTIL_TX_BYTES, "tx"),
                               (nvml.NVML_PCIE_UTIL_RX_BYTES, "rx")):
        kilobytes = s.call(dev, "nvmlDeviceGetPcieThroughput", nvml.nvmlDeviceGetPcieThroughput,
                           dev.handle, counter)
        add(out, "vllm_gpu_pcie_throughput_bytes_per_second", dev.labels + (direction,),
            kilobytes * 1024)
