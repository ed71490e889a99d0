"""The `gpu:` section of the config.

This module imports nothing from the collector and nothing of NVML, so that exporter/config.py
can load it without starting to load the GPU collector.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GpuConfig:
    """The `gpu:` section of the config (docs/gpu.md#options-gpu-section-of-the-config)."""

    enabled: bool = True
    # How often the sampler reads every GPU.
    interval_seconds: float = 1.0
    # The slow group (power limit, ECC, remapped rows, processes, energy, PCIe) runs for one GPU
    # per tick, each GPU at most this often.
    slow_interval_seconds: float = 5.0
    energy: bool = True
    # nvmlDeviceGetPcieThroughput blocks ~20 ms per direction: off unless asked for.
    pcie_throughput: bool = False
    # Per-process GPU memory, split into the engine's process tree and every other process.
    processes: bool = True
    # Wait for XID critical-error events on a thread of their own.
    xid_events: bool = True
    # How long one nvmlEventSetWait blocks; stop() waits at most about this long for the thread.
    event_wait_ms: int = 500
    # Enumerate MIG instances on GPUs where MIG is enabled.
    mig: bool = True
    # Cardinality cap: GPUs read per host, by NVML index; any beyond are left out, logged and
    # counted in vllm_exporter_label_overflow_total{label="gpu"} (each time NVML starts).
    max_devices: int = 64
    # Which GPUs the engine uses; None: the daemon's own CUDA_VISIBLE_DEVICES (unset: all).
    cuda_visible_devices: str | None = None
    # NVML init is retried after failures and lost GPUs: first after this long, doubling ...
    retry_initial_seconds: float = 2.0
    # ... up to this long.
    retry_max_seconds: float = 300.0

    def problems(self) -> list[tuple[str, str]]:
        out = []
        for name in ("interval_seconds", "slow_interval_seconds", "retry_initial_seconds"):
            if getattr(self, name) <= 0:
                out.append((name, f"must be > 0, got {getattr(self, name)}"))
        if not out and self.slow_interval_seconds < self.interval_seconds:
            out.append(("slow_interval_seconds",
                        f"must be >= interval_seconds ({self.interval_seconds}), "
                        f"got {self.slow_interval_seconds}"))
        if self.max_devices < 1:
            out.append(("max_devices", f"must be >= 1, got {self.max_devices}"))
        if not 10 <= self.event_wait_ms <= 60_000:
            out.append(("event_wait_ms", f"must be 10-60000, got {self.event_wait_ms}"))
        if self.retry_initial_seconds > 0 and self.retry_max_seconds < self.retry_initial_seconds:
            out.append(("retry_max_seconds",
                        f"must be >= retry_initial_seconds ({self.retry_initial_seconds}), "
                        f"got {self.retry_max_seconds}"))
        return out
