"""Power draw, power limit, energy and temperature."""

from __future__ import annotations

from ..samples import Samples, add
from ..session import Device, NvmlSession


def read_power(s: NvmlSession, dev: Device, out: Samples) -> None:
    milliwatts = s.call(dev, "nvmlDeviceGetPowerUsage", s.nvml.nvmlDeviceGetPowerUsage,
                        dev.handle)
    add(out, "vllm_gpu_power_watts", dev.labels, milliwatts / 1000)


def read_power_limit(s: NvmlSession, dev: Device, out: Samples) -> None:
    milliwatts = s.call(dev, "nvmlDeviceGetEnforcedPowerLimit",
                        s.nvml.nvmlDeviceGetEnforcedPowerLimit, dev.handle)
    add(out, "vllm_gpu_power_limit_watts", dev.labels, milliwatts / 1000)


def read_energy(s: NvmlSession, dev: Device, out: Samples) -> None:
    millijoules = s.call(dev, "nvmlDeviceGetTotalEnergyConsumption",
                         s.nvml.nvmlDeviceGetTotalEnergyConsumption, dev.handle)
    add(out, "vllm_gpu_energy_joules_total", dev.labels, millijoules / 1000)


def read_temperature(s: NvmlSession, dev: Device, out: Samples) -> None:
    celsius = s.call(dev, "nvmlDeviceGetTemperature", s.nvml.nvmlDeviceGetTemperature,
                     dev.handle, s.nvml.NVML_TEMPERATURE_GPU)
    add(out, "vllm_gpu_temperature_celsius", dev.labels, celsius)
