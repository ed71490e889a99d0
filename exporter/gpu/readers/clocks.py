"""SM and memory clocks, what holds them down (throttle reasons) and the performance state."""

from __future__ import annotations

from ..samples import Samples, add
from ..session import Device, NvmlSession

# Bits of nvmlDeviceGetCurrentClocksEventReasons (formerly ...ThrottleReasons), NVML's ABI.
THROTTLE_REASONS = (
    ("gpu_idle", 0x1),
    ("applications_clocks_setting", 0x2),
    ("sw_power_cap", 0x4),
    ("hw_slowdown", 0x8),
    ("sync_boost", 0x10),
    ("sw_thermal_slowdown", 0x20),
    ("hw_thermal_slowdown", 0x40),
    ("hw_power_brake_slowdown", 0x80),
    ("display_clock_setting", 0x100),
    ("board_limit", 0x200),
    ("reliability", 0x400),
)
PSTATE_UNKNOWN = 32  # NVML_PSTATE_UNKNOWN


def read_clocks(s: NvmlSession, dev: Device, out: Samples) -> None:
    nvml = s.nvml
    sm = s.call(dev, "nvmlDeviceGetClockInfo", nvml.nvmlDeviceGetClockInfo, dev.handle,
                nvml.NVML_CLOCK_SM)
    mem = s.call(dev, "nvmlDeviceGetClockInfo", nvml.nvmlDeviceGetClockInfo, dev.handle,
                 nvml.NVML_CLOCK_MEM)
    add(out, "vllm_gpu_sm_clock_hertz", dev.labels, sm * 1e6)
    add(out, "vllm_gpu_memory_clock_hertz", dev.labels, mem * 1e6)


def read_throttle_reasons(s: NvmlSession, dev: Device, out: Samples) -> None:
    nvml = s.nvml
    read = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) \
        or nvml.nvmlDeviceGetCurrentClocksThrottleReasons
    mask = s.call(dev, "nvmlDeviceGetCurrentClocksEventReasons", read, dev.handle)
    for reason, bit in THROTTLE_REASONS:
        add(out, "vllm_gpu_clock_throttle_active", dev.labels + (reason,), 1 if mask & bit else 0)


def read_performance_state(s: NvmlSession, dev: Device, out: Samples) -> None:
    pstate = s.call(dev, "nvmlDeviceGetPerformanceState", s.nvml.nvmlDeviceGetPerformanceState,
                    dev.handle)
    if pstate != PSTATE_UNKNOWN:
        add(out, "vllm_gpu_performance_state", dev.labels, pstate)
