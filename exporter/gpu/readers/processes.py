"""GPU memory and process counts of the compute processes, split by owner (engine or other)."""

from __future__ import annotations

from ..processes import EngineProcesses
from ..samples import Samples, add
from ..session import Device, NvmlSession


def read_processes(s: NvmlSession, dev: Device, out: Samples,
                   engine: EngineProcesses) -> None:
    procs = s.call(dev, "nvmlDeviceGetComputeRunningProcesses",
                   s.nvml.nvmlDeviceGetComputeRunningProcesses, dev.handle)
    is_engine = engine.owners(proc.pid for proc in procs)
    dev.pids = set(is_engine)
    used = {"engine": 0, "other": 0}
    count = {"engine": 0, "other": 0}
    for proc in procs:
        owner = "engine" if is_engine[proc.pid] else "other"
        used[owner] += proc.usedGpuMemory or 0  # None: not available (no permission)
        count[owner] += 1
    for owner in ("engine", "other"):
        add(out, "vllm_gpu_process_memory_used_bytes", dev.labels + (owner,), used[owner])
        add(out, "vllm_gpu_processes", dev.labels + (owner,), count[owner])
