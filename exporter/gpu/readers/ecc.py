"""Memory errors: ECC counters and remapped rows."""

from __future__ import annotations

from ..samples import Samples, add
from ..session import Device, NvmlSession


def read_ecc(s: NvmlSession, dev: Device, out: Samples) -> None:
    nvml = s.nvml
    for error_type, label in ((nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, "corrected"),
                              (nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, "uncorrected")):
        count = s.call(dev, "nvmlDeviceGetTotalEccErrors", nvml.nvmlDeviceGetTotalEccErrors,
                       dev.handle, error_type, nvml.NVML_VOLATILE_ECC)
        add(out, "vllm_gpu_ecc_errors_total", dev.labels + (label,), count)


def read_remapped_rows(s: NvmlSession, dev: Device, out: Samples) -> None:
    correctable, uncorrectable, pending, failed = s.call(
        dev, "nvmlDeviceGetRemappedRows", s.nvml.nvmlDeviceGetRemappedRows, dev.handle)
    add(out, "vllm_gpu_remapped_rows", dev.labels + ("correctable",), correctable)
    add(out, "vllm_gpu_remapped_rows", dev.labels + ("uncorrectable",), uncorrectable)
    add(out, "vllm_gpu_row_remap_pending", dev.labels, 1 if pending else 0)
    add(out, "vllm_gpu_row_remap_failed", dev.labels, 1 if failed else 0)
