"""NVML GPU telemetry: one job per module (docs/gpu.md, docs/architecture.md).

    config.py      GpuConfig, the `gpu:` section of the config (imports nothing of the rest)
    families.py    GPU_FAMILIES: every GPU family's name, type, help, labels, NVML call
    session.py     one NVML session: the GPUs it found, every call, failures sorted in 4 kinds
    readers/       one function per NVML call (group), one group per module
    samples.py     what a tick reads, as the readers hand it to the collector
    processes.py   which compute processes are the engine's (/proc parent pids)
    visible.py     CUDA_VISIBLE_DEVICES -> NVML indices
    xid.py         the XID event thread
    collector.py   GpuCollector: the sampler thread, its snapshot, its rendering, its health

This file only re-exports the names the rest of the project imports. It does so lazily, on
first use, so that `exporter.gpu.config` loads without the collector (and without
prometheus_client or the metric specs): exporter/config.py imports it before anything else.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the module of this package that defines it
_EXPORTS = {
    "GpuConfig": "config",
    "GPU_FAMILIES": "families",
    "GpuCollector": "collector",
    "EngineProcesses": "processes",
    "descendants": "processes",
    "read_parent_pids": "processes",
    "map_cuda_visible_devices": "visible",
    "THROTTLE_REASONS": "readers.clocks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
