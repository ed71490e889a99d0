"""NVML GPU telemetry, sampled on its own thread and attributed to the engine's own processes.

A sampler thread calls NVML every `interval_seconds` and publishes an immutable snapshot; a
scrape (`collect()`) only renders that snapshot and never calls NVML. A second thread waits on
an NVML event set for XID errors. Slow-moving or slow-to-read calls (power limit, ECC, remapped
rows, the process list, total energy ~3 ms, PCIe throughput ~21 ms and opt-in, on an H200) form
a slow group that runs for one GPU per tick, each GPU every `slow_interval_seconds`.

Failure stays local:
- no NVML library, no driver, no GPU: `vllm_exporter_collector_up{collector="gpu"}` is 0, one
  WARNING on the `exporter.gpu` logger, NVML init is retried with exponential backoff;
- a call the card does not support (NotSupported, FunctionNotFound): remembered per (GPU, call),
  never called again in that NVML session, shown once in
  `vllm_exporter_gpu_call_unsupported{gpu,call}` and NOT counted as an error;
- any other failed call: counted in `vllm_exporter_gpu_errors_total{call}`, only its own series
  are missing from that tick;
- a GPU that is lost (GpuIsLost, ResetRequired): `gpu_up` 0 for it, the other GPUs go on, and
  NVML is re-initialised with backoff until the GPU answers again.
Nothing here raises into the caller. See docs/gpu.md.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .exposition import RendersItself, render_families
from .metrics import FamilySpec

log = logging.getLogger("exporter.gpu")

GPU_LABELS = ("gpu", "uuid", "name")
MIG_LABELS = GPU_LABELS + ("mig", "mig_uuid", "mig_name")

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
XID_EVENT = 0x8  # nvmlEventTypeXidCriticalError
PSTATE_UNKNOWN = 32  # NVML_PSTATE_UNKNOWN
MAX_XID_LABEL = 999  # larger XID codes collapse to xid="other" (bounded labels)


def _spec(name: str, kind: str, help: str, labels: tuple[str, ...], source: str) -> FamilySpec:
    return FamilySpec(name, kind, help, labels=labels, source=source, where="server")


GPU_FAMILIES: tuple[FamilySpec, ...] = (
    # --- identity and engine mapping --------------------------------------------------------
    _spec("gpu_up", "gauge",
          "1 while NVML answers for this GPU, 0 once it is lost (fell off the bus, needs reset).",
          GPU_LABELS, "nvmlDeviceGetHandleByIndex and every per-GPU call"),
    _spec("gpu_engine_visible", "gauge",
          "1 if the engine can use this GPU (CUDA_VISIBLE_DEVICES, by index or UUID), else 0; "
          "cuda_index is the CUDA ordinal the engine sees it as ('' when not visible).",
          GPU_LABELS + ("cuda_index",), "CUDA_VISIBLE_DEVICES matched to nvmlDeviceGetUUID"),
    # --- memory -----------------------------------------------------------------------------
    _spec("gpu_memory_total_bytes", "gauge", "Installed GPU memory.",
          GPU_LABELS, "nvmlDeviceGetMemoryInfo(v2).total"),
    _spec("gpu_memory_used_bytes", "gauge",
          "GPU memory allocated by processes (driver-reserved memory excluded).",
          GPU_LABELS, "nvmlDeviceGetMemoryInfo(v2).used"),
    _spec("gpu_memory_free_bytes", "gauge", "GPU memory free for allocation.",
          GPU_LABELS, "nvmlDeviceGetMemoryInfo(v2).free"),
    _spec("gpu_memory_reserved_bytes", "gauge",
          "GPU memory the driver and firmware reserve.",
          GPU_LABELS, "nvmlDeviceGetMemoryInfo(v2).reserved"),
    _spec("gpu_memory_budget_bytes", "gauge",
          "GPU memory vLLM plans to take: gpu_memory_utilization x (total - reserved), as vLLM "
          "computes it from cudaMemGetInfo, on the GPUs the engine uses (present once the "
          "engine is up). The CUDA context and CUDA graphs come on top.",
          GPU_LABELS, "set_memory_budget_ratio() x nvmlDeviceGetMemoryInfo(v2) (total - "
                      "reserved)"),
    _spec("gpu_process_memory_used_bytes", "gauge",
          "GPU memory used by compute processes, by owner: engine = the daemon's process tree "
          "(daemon, engine core, workers), other = every other process.",
          GPU_LABELS + ("owner",),
          "nvmlDeviceGetComputeRunningProcesses + /proc parent pids (slow group)"),
    _spec("gpu_processes", "gauge",
          "Compute processes on the GPU, by owner (engine or other).",
          GPU_LABELS + ("owner",), "nvmlDeviceGetComputeRunningProcesses + /proc parent pids "
          "(slow group)"),
    # --- load, power, heat, clocks ----------------------------------------------------------
    _spec("gpu_utilization_ratio", "gauge",
          "Fraction of the last sample period in which a kernel ran on the GPU (0-1).",
          GPU_LABELS, "nvmlDeviceGetUtilizationRates.gpu / 100"),
    _spec("gpu_memory_utilization_ratio", "gauge",
          "Fraction of the last sample period in which device memory was read or written (0-1).",
          GPU_LABELS, "nvmlDeviceGetUtilizationRates.memory / 100"),
    _spec("gpu_power_watts", "gauge", "Power draw of the board.",
          GPU_LABELS, "nvmlDeviceGetPowerUsage (mW) / 1000"),
    _spec("gpu_power_limit_watts", "gauge", "Power limit the driver enforces.",
          GPU_LABELS, "nvmlDeviceGetEnforcedPowerLimit (mW) / 1000 (slow group)"),
    _spec("gpu_energy_joules_total", "counter",
          "Energy the GPU consumed since the driver was loaded.",
          GPU_LABELS, "nvmlDeviceGetTotalEnergyConsumption (mJ) / 1000 (slow group)"),
    _spec("gpu_temperature_celsius", "gauge", "GPU die temperature.",
          GPU_LABELS, "nvmlDeviceGetTemperature(NVML_TEMPERATURE_GPU)"),
    _spec("gpu_sm_clock_hertz", "gauge", "Current SM clock.",
          GPU_LABELS, "nvmlDeviceGetClockInfo(NVML_CLOCK_SM) (MHz) x 1e6"),
    _spec("gpu_memory_clock_hertz", "gauge", "Current memory clock.",
          GPU_LABELS, "nvmlDeviceGetClockInfo(NVML_CLOCK_MEM) (MHz) x 1e6"),
    _spec("gpu_clock_throttle_active", "gauge",
          "1 while this reason holds the clocks down (gpu_idle, sw_power_cap, hw_slowdown, "
          "sw_thermal_slowdown, hw_thermal_slowdown, hw_power_brake_slowdown, ...), else 0.",
          GPU_LABELS + ("reason",), "nvmlDeviceGetCurrentClocksEventReasons bit mask"),
    _spec("gpu_performance_state", "gauge",
          "Performance state: 0 (P0, maximum performance) to 15 (P15, minimum).",
          GPU_LABELS, "nvmlDeviceGetPerformanceState"),
    _spec("gpu_pcie_throughput_bytes_per_second", "gauge",
          "PCIe throughput over the last 20 ms, by direction (tx or rx). Off by default "
          "(pcie_throughput: the call blocks ~20 ms).",
          GPU_LABELS + ("direction",), "nvmlDeviceGetPcieThroughput (KB/s) x 1024 (slow group)"),
    # --- errors and health ------------------------------------------------------------------
    _spec("gpu_ecc_errors_total", "counter",
          "ECC memory errors since the driver was loaded, by type (corrected or uncorrected).",
          GPU_LABELS + ("type",),
          "nvmlDeviceGetTotalEccErrors(type, NVML_VOLATILE_ECC) (slow group)"),
    _spec("gpu_remapped_rows", "gauge",
          "Memory rows remapped, by cause (correctable or uncorrectable errors).",
          GPU_LABELS + ("cause",), "nvmlDeviceGetRemappedRows (slow group)"),
    _spec("gpu_row_remap_pending", "gauge",
          "1 if a row remap is pending (takes effect at the next GPU reset), else 0.",
          GPU_LABELS, "nvmlDeviceGetRemappedRows.isPending (slow group)"),
    _spec("gpu_row_remap_failed", "gauge",
          "1 if a row remap failed (the GPU should be serviced), else 0.",
          GPU_LABELS, "nvmlDeviceGetRemappedRows.failureOccurred (slow group)"),
    _spec("gpu_xid_errors_total", "counter",
          "XID critical error events, by XID code (codes above 999 count as 'other').",
          GPU_LABELS + ("xid",), "nvmlEventSetWait on nvmlEventTypeXidCriticalError"),
    # --- MIG instances (where MIG is enabled) -----------------------------------------------
    _spec("gpu_mig_memory_total_bytes", "gauge", "Memory of a MIG instance.",
          MIG_LABELS, "nvmlDeviceGetMemoryInfo(MIG device handle).total"),
    _spec("gpu_mig_memory_used_bytes", "gauge", "Memory used in a MIG instance.",
          MIG_LABELS, "nvmlDeviceGetMemoryInfo(MIG device handle).used"),
    _spec("gpu_mig_memory_free_bytes", "gauge", "Memory free in a MIG instance.",
          MIG_LABELS, "nvmlDeviceGetMemoryInfo(MIG device handle).free"),
    # --- the collector's own health ---------------------------------------------------------
    _spec("vllm_exporter_collector_up", "gauge",
          "1 while the collector works: for gpu, NVML is initialised and every GPU answers; "
          "0 without NVML, without a GPU, or while a GPU is lost.",
          ("collector",), "the GPU collector"),
    _spec("vllm_exporter_gpu_collect_duration_seconds", "gauge",
          "Wall time of the last GPU collection tick (all GPUs).",
          (), "the GPU collector"),
    _spec("vllm_exporter_gpu_last_success_timestamp_seconds", "gauge",
          "Unix time of the last tick in which every GPU answered.",
          (), "the GPU collector"),
    _spec("vllm_exporter_gpu_errors_total", "counter",
          "Failed NVML calls, by NVML function (NotSupported excluded: see "
          "vllm_exporter_gpu_call_unsupported).",
          ("call",), "the GPU collector"),
    _spec("vllm_exporter_gpu_call_unsupported", "gauge",
          "1 for each NVML call this GPU answered NotSupported; it is not called again.",
          ("gpu", "call"), "the GPU collector"),
)

# Families rendered even with no sample, so that "no GPU" is visible as such.
_ALWAYS_RENDERED = ("vllm_exporter_collector_up", "vllm_exporter_gpu_errors_total")


@dataclass
class GpuConfig:
    """The `gpu:` section of the config."""

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


# --- engine attribution: which pids belong to the engine ----------------------------------------

def read_parent_pids(proc_root: str = "/proc") -> dict[int, int]:
    """pid -> parent pid for every process under `proc_root` (processes that exit are skipped)."""
    parents = {}
    try:
        entries = os.listdir(proc_root)
    except OSError:
        return parents
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(os.path.join(proc_root, entry, "stat"), "rb") as f:
                stat = f.read()
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            parents[int(entry)] = int(stat[stat.rindex(b")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return parents


def descendants(root_pid: int, parents: dict[int, int]) -> set[int]:
    """`root_pid` and every process below it."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = {root_pid}, [root_pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in tree:
                tree.add(child)
                todo.append(child)
    return tree


class EngineProcesses:
    """Answers 'which of these pids are the engine's?': the root pid and its descendants.

    /proc is scanned at most once per call, and only when NVML reports a pid not seen before;
    a pid keeps its owner as long as some GPU still lists it (see `retain`).
    """

    def __init__(self, root_pid: int, proc_root: str = "/proc"):
        self.root_pid = root_pid
        self.proc_root = proc_root
        self.scans = 0
        self._owner: dict[int, bool] = {}

    def owners(self, pids: Iterable[int]) -> dict[int, bool]:
        """pid -> True where it is the engine's."""
        pids = list(pids)
        if any(pid not in self._owner for pid in pids):
            tree = descendants(self.root_pid, read_parent_pids(self.proc_root))
            self.scans += 1
            for pid in pids:
                self._owner.setdefault(pid, pid in tree)
        return {pid: self._owner[pid] for pid in pids}

    def retain(self, pids: set[int]) -> None:
        """Forget every pid no GPU lists any more (a later process may reuse the number)."""
        for pid in set(self._owner) - pids:
            del self._owner[pid]


# --- CUDA_VISIBLE_DEVICES -> NVML indices --------------------------------------------------------

def map_cuda_visible_devices(value: str | None, gpu_uuids: dict[int, str],
                             mig_parents: dict[str, int] | None = None) -> dict[int, int]:
    """NVML index -> CUDA ordinal of every GPU a process with this CUDA_VISIBLE_DEVICES sees.

    Entries are NVML-order indices or (prefixes of) GPU-/MIG- UUIDs, as CUDA accepts them; like
    CUDA, parsing stops at the first entry that matches nothing. A MIG UUID maps to its parent
    GPU. Integer entries assume CUDA enumerates in PCI bus order, as NVML does (true with
    CUDA_DEVICE_ORDER=PCI_BUS_ID or identical GPUs); UUIDs are exact either way.
    """
    if value is None:
        return {index: ordinal for ordinal, index in enumerate(sorted(gpu_uuids))}
    by_uuid = {uuid.lower(): index for index, uuid in gpu_uuids.items()}
    by_uuid.update({uuid.lower(): index for uuid, index in (mig_parents or {}).items()})
    mapping: dict[int, int] = {}
    for entry in (e.strip() for e in value.split(",")):
        index = _match_visible_entry(entry, gpu_uuids, by_uuid)
        if index is None or index in mapping:
            break
        mapping[index] = len(mapping)
    return mapping


def _match_visible_entry(entry: str, gpu_uuids: dict[int, str],
                         by_uuid: dict[str, int]) -> int | None:
    if entry.isdigit():
        index = int(entry)
        return index if index in gpu_uuids else None
    prefix = entry.lower()
    if not prefix.startswith(("gpu-", "mig-")):
        return None
    matches = {index for uuid, index in by_uuid.items() if uuid.startswith(prefix)}
    return matches.pop() if len(matches) == 1 else None


# --- the NVML session: one nvmlInit .. nvmlShutdown ----------------------------------------------

class _Unavailable(Exception):
    """This reading is missing from this tick; the GPU's other readings go on."""


class _Unsupported(_Unavailable):
    """The GPU does not support this call; it is not called again in this session."""


class _DeviceLost(Exception):
    """The GPU stopped answering (GpuIsLost, ResetRequired)."""


class _SessionLost(Exception):
    """NVML itself stopped working (uninitialised, driver unloaded, version mismatch)."""


@dataclass
class _MigDevice:
    handle: Any
    uuid: str
    labels: tuple[str, ...]  # MIG_LABELS


@dataclass
class _Device:
    index: int
    handle: Any
    uuid: str
    name: str
    migs: list[_MigDevice] = field(default_factory=list)
    unsupported: set[str] = field(default_factory=set)
    lost: bool = False
    slow_due: float = 0.0  # clock time the slow readings are next due
    slow_samples: dict[str, list] = field(default_factory=dict)
    pids: set[int] = field(default_factory=set)  # compute processes at the last slow read
    labels: tuple[str, str, str] = ("", "", "")  # (gpu, uuid, name), set from the fields above

    def __post_init__(self) -> None:
        self.labels = (str(self.index), self.uuid, self.name)


Samples = dict[str, list[tuple[tuple[str, ...], float]]]


def _add(out: Samples, family: str, labels: tuple[str, ...], value: float) -> None:
    out.setdefault(family, []).append((labels, float(value)))


class _NvmlSession:
    """Calls NVML for one init..shutdown, sorting every failure into the four kinds above."""

    def __init__(self, nvml: Any, on_error: Callable[[str, BaseException], None]):
        self.nvml = nvml
        self.devices: list[_Device] = []
        self.missing_indices: list[int] = []  # indices NVML counts but cannot open (lost)
        self.left_out = 0  # GPUs beyond the max_devices cap
        self._on_error = on_error
        self._unsupported_errors = _error_classes(nvml, "NotSupported", "FunctionNotFound")
        self._lost_errors = _error_classes(nvml, "GpuIsLost", "ResetRequired")
        self._session_errors = _error_classes(nvml, "Uninitialized", "DriverNotLoaded",
                                              "LibRmVersionMismatch", "LibraryNotFound")

    def call(self, dev: _Device | None, call: str, fn: Callable, *args: Any) -> Any:
        if dev is not None and call in dev.unsupported:
            raise _Unsupported(call)
        try:
            return fn(*args)
        except self._unsupported_errors as exc:
            if dev is None:
                self._on_error(call, exc)
                raise _Unavailable(call) from None
            dev.unsupported.add(call)
            log.info("GPU %d (%s) does not support %s; its series are left out",
                     dev.index, dev.name, call)
            raise _Unsupported(call) from None
        except self._lost_errors as exc:
            self._on_error(call, exc)
            raise _DeviceLost(call) from None
        except self._session_errors as exc:
            self._on_error(call, exc)
            raise _SessionLost(call) from None
        except Exception as exc:  # other NVML errors, and anything else a binding may raise
            self._on_error(call, exc)
            raise _Unavailable(call) from None

    def enumerate_devices(self, with_mig: bool, max_devices: int) -> None:
        nvml = self.nvml
        count = self.call(None, "nvmlDeviceGetCount", nvml.nvmlDeviceGetCount)
        self.left_out = max(0, count - max_devices)
        for index in range(count - self.left_out):
            try:
                handle = self.call(None, "nvmlDeviceGetHandleByIndex",
                                   nvml.nvmlDeviceGetHandleByIndex, index)
                uuid = self.call(None, "nvmlDeviceGetUUID", nvml.nvmlDeviceGetUUID, handle)
                name = self.call(None, "nvmlDeviceGetName", nvml.nvmlDeviceGetName, handle)
            except (_Unavailable, _DeviceLost):
                self.missing_indices.append(index)
                continue
            dev = _Device(index, handle, _text(uuid), _text(name))
            if with_mig:
                dev.migs = self._enumerate_migs(dev)
            self.devices.append(dev)

    def _enumerate_migs(self, dev: _Device) -> list[_MigDevice]:
        nvml = self.nvml
        try:
            current, _pending = self.call(dev, "nvmlDeviceGetMigMode",
                                          nvml.nvmlDeviceGetMigMode, dev.handle)
            if current != nvml.NVML_DEVICE_MIG_ENABLE:
                return []
            slots = self.call(dev, "nvmlDeviceGetMaxMigDeviceCount",
                              nvml.nvmlDeviceGetMaxMigDeviceCount, dev.handle)
        except (_Unavailable, _DeviceLost):
            return []
        migs = []
        for slot in range(slots):
            try:  # empty slots answer NotFound: that is no error
                handle = nvml.nvmlDeviceGetMigDeviceHandleByIndex(dev.handle, slot)
                uuid = _text(nvml.nvmlDeviceGetUUID(handle))
                name = _text(nvml.nvmlDeviceGetName(handle))
            except nvml.NVMLError_NotFound:
                continue
            except Exception as exc:
                self._on_error("nvmlDeviceGetMigDeviceHandleByIndex", exc)
                continue
            migs.append(_MigDevice(handle, uuid, dev.labels + (str(slot), uuid, name)))
        return migs

    def shutdown(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except Exception as exc:
            self._on_error("nvmlShutdown", exc)


def _error_classes(nvml: Any, *names: str) -> tuple[type, ...]:
    return tuple(getattr(nvml, "NVMLError_" + name) for name in names
                 if hasattr(nvml, "NVMLError_" + name))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --- readings: one small function per NVML call (group) ------------------------------------------
# Each adds its samples to `out` or raises _Unavailable / _DeviceLost / _SessionLost.

def _read_memory(s: _NvmlSession, dev: _Device, out: Samples) -> None:
    nvml, labels = s.nvml, dev.labels
    try:
        mem = s.call(dev, "nvmlDeviceGetMemoryInfo_v2", nvml.nvmlDeviceGetMemoryInfo,
                     dev.handle, nvml.nvmlMemory_v2)
        _add(out, "gpu_memory_reserved_bytes", labels, mem.reserved)
    except _Unsupported:  # older drivers: v1 has no reserved figure and counts it as used
        mem = s.call(dev, "nvmlDeviceGetMemoryInfo", nvml.nvmlDeviceGetMemoryInfo, dev.handle)
    _add(out, "gpu_memory_total_bytes", labels, mem.total)
    _add(out, "gpu_memory_used_bytes", labels, mem.used)
    _add(out, "gpu_memory_free_bytes", labels, mem.free)


def _read_utilization(s: _NvmlSession, dev: _Device, out: Samples) -> None:
    util = s.call(dev, "nvmlDeviceGetUtilizationRates", s.nvml.nvmlDeviceGetUtilizationRates,
                  dev.handle)
    _add(out, "gpu_utilization_ratio", dev.labels, util.gpu / 100)
    _add(out, "gpu_memory_utilization_ratio", dev.labels, util.memory / 100)


def _read_power(s: _NvmlSession, dev: _Device, out: Samples) -> None:
    milliwatts = s.call(dev, "nvmlDeviceGetPowerUsage", s.nvml.nvmlDeviceGetPowerUsage,
                        dev.handle)
    _add(out, "gpu_power_watts", dev.labels, milliwatts / 1000)


def _read_power_limit(s: _NvmlSession, dev: _Device, out: Samples) -> None:
    milliwatts = s.call(dev, "nvmlDeviceGetEnforcedPowerLimit",
                        s.nvml.nvmlDeviceGetEnforcedPowerLimit, dev.handle)
    _add(out, "gpu_power_limit_watts", dev.labels, milliwatts / 1000)


def _read_temperature(s: _NvmlSession, dev: _Device, out: Samples) -> None:
    celsius = s.call(dev, "nvmlDeviceGetTemperature", s.nvml.nvmlDeviceGetTemperature,
                     dev.handle, s.nvml.NVML_TEMPERATURE_GPU)
    _add(out, "gpu_temperature_celsius", dev.labels, celsius)


def _read_clocks(s: _NvmlSession, dev: _Device, out: Samples) -> None:
    nvml = s.nvml
    sm = s.call(dev, "nvmlDeviceGetClockInfo", nvml.nvmlDeviceGetClockInfo, dev.handle,
                nvml.NVML_CLOCK_SM)
    mem = s.call(dev, "nvmlDeviceGetClockInfo", nvml.nvmlDeviceGetClockInfo, dev.handle,
                 nvml.NVML_CLOCK_MEM)
    _add(out, "gpu_sm_clock_hertz", dev.labels, sm * 1e6)
    _add(out, "gpu_memory_clock_hertz", dev.labels, mem * 1e6)


def _read_throttle_reasons(s: _NvmlSession, dev: _Device, out: Samples) -> None:
    nvml = s.nvml
    read = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) \
        or nvml.nvmlDeviceGetCurrentClocksThrottleReasons
    mask = s.call(dev, "nvmlDeviceGetCurrentClocksEventReasons", read, dev.handle)
    for reason, bit in THROTTLE_REASONS:
        _add(out, "gpu_clock_throttle_active", dev.labels + (reason,), 1 if mask & bit else 0)


def _read_performance_state(s: _NvmlSession, dev: _Device, out: Samples) -> None:
    pstate = s.call(dev, "nvmlDeviceGetPerformanceState", s.nvml.nvmlDeviceGetPerformanceState,
                    dev.handle)
    if pstate != PSTATE_UNKNOWN:
        _add(out, "gpu_performance_state", dev.labels, pstate)


def _read_ecc(s: _NvmlSession, dev: _Device, out: Samples) -> None:
    nvml = s.nvml
    for error_type, label in ((nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, "corrected"),
                              (nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, "uncorrected")):
        count = s.call(dev, "nvmlDeviceGetTotalEccErrors", nvml.nvmlDeviceGetTotalEccErrors,
                       dev.handle, error_type, nvml.NVML_VOLATILE_ECC)
        _add(out, "gpu_ecc_errors_total", dev.labels + (label,), count)


def _read_remapped_rows(s: _NvmlSession, dev: _Device, out: Samples) -> None:
    correctable, uncorrectable, pending, failed = s.call(
        dev, "nvmlDeviceGetRemappedRows", s.nvml.nvmlDeviceGetRemappedRows, dev.handle)
    _add(out, "gpu_remapped_rows", dev.labels + ("correctable",), correctable)
    _add(out, "gpu_remapped_rows", dev.labels + ("uncorrectable",), uncorrectable)
    _add(out, "gpu_row_remap_pending", dev.labels, 1 if pending else 0)
    _add(out, "gpu_row_remap_failed", dev.labels, 1 if failed else 0)


def _read_mig_memory(s: _NvmlSession, dev: _Device, out: Samples) -> None:
    for mig in dev.migs:
        mem = s.call(dev, "nvmlDeviceGetMemoryInfo(MIG)", s.nvml.nvmlDeviceGetMemoryInfo,
                     mig.handle)
        _add(out, "gpu_mig_memory_total_bytes", mig.labels, mem.total)
        _add(out, "gpu_mig_memory_used_bytes", mig.labels, mem.used)
        _add(out, "gpu_mig_memory_free_bytes", mig.labels, mem.free)


def _read_energy(s: _NvmlSession, dev: _Device, out: Samples) -> None:
    millijoules = s.call(dev, "nvmlDeviceGetTotalEnergyConsumption",
                         s.nvml.nvmlDeviceGetTotalEnergyConsumption, dev.handle)
    _add(out, "gpu_energy_joules_total", dev.labels, millijoules / 1000)


def _read_pcie_throughput(s: _NvmlSession, dev: _Device, out: Samples) -> None:
    nvml = s.nvml
    for counter, direction in ((nvml.NVML_PCIE_UTIL_TX_BYTES, "tx"),
                               (nvml.NVML_PCIE_UTIL_RX_BYTES, "rx")):
        kilobytes = s.call(dev, "nvmlDeviceGetPcieThroughput", nvml.nvmlDeviceGetPcieThroughput,
                           dev.handle, counter)
        _add(out, "gpu_pcie_throughput_bytes_per_second", dev.labels + (direction,),
             kilobytes * 1024)


def _read_processes(s: _NvmlSession, dev: _Device, out: Samples,
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
        _add(out, "gpu_process_memory_used_bytes", dev.labels + (owner,), used[owner])
        _add(out, "gpu_processes", dev.labels + (owner,), count[owner])


Reader = Callable[[_NvmlSession, _Device, Samples], None]


def _read_if_available(reader: Reader, s: _NvmlSession, dev: _Device, out: Samples) -> None:
    """Run one reader; an unavailable reading only leaves its own series out of this tick."""
    try:
        reader(s, dev, out)
    except _Unavailable:
        pass


# Every tick: cheap (about 1.5-10 us each on an H200) and fast-moving.
TICK_READERS: tuple[Reader, ...] = (
    _read_memory, _read_utilization, _read_power, _read_temperature, _read_clocks,
    _read_throttle_reasons, _read_performance_state, _read_mig_memory,
)
# Every slow_interval_seconds, one GPU per tick: slow-moving (limits, error counters, process
# lists: the process list alone costs ~30-100 us) or slow to read (energy ~3 ms, PCIe ~21 ms).
# Processes, energy and PCIe are added by the collector according to its config.
SLOW_READERS: tuple[Reader, ...] = (_read_power_limit, _read_ecc, _read_remapped_rows)


# --- XID events ----------------------------------------------------------------------------------

class _XidWatcher:
    """Waits on an NVML event set for XID critical errors, on its own thread."""

    def __init__(self, nvml: Any, event_set: Any, wait_ms: int,
                 on_xid: Callable[[Any, int], None],
                 on_error: Callable[[str, BaseException], None]):
        self._nvml = nvml
        self._event_set = event_set
        self._wait_ms = wait_ms
        self._on_xid = on_xid
        self._on_error = on_error
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-xid-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self._wait_ms / 1000 + 1.0)
        try:
            self._nvml.nvmlEventSetFree(self._event_set)
        except Exception as exc:
            self._on_error("nvmlEventSetFree", exc)

    def _run(self) -> None:
        timeout = getattr(self._nvml, "NVMLError_Timeout", ())
        while not self._stop.is_set():
            try:
                data = self._nvml.nvmlEventSetWait(self._event_set, self._wait_ms)
            except timeout:
                continue
            except Exception as exc:  # count it, pause so a broken set cannot spin, go on
                self._on_error("nvmlEventSetWait", exc)
                self._stop.wait(self._wait_ms / 1000)
                continue
            if data.eventType & XID_EVENT:
                self._on_xid(data.device, int(data.eventData))


def _start_xid_watcher(s: _NvmlSession, wait_ms: int, on_xid: Callable[[Any, int], None],
                       on_error: Callable[[str, BaseException], None]) -> _XidWatcher | None:
    """Register every GPU that supports XID events; None if none does."""
    nvml = s.nvml
    try:
        event_set = s.call(None, "nvmlEventSetCreate", nvml.nvmlEventSetCreate)
    except (_Unavailable, _DeviceLost, _SessionLost):
        return None
    registered = 0
    for dev in s.devices:
        try:
            supported = s.call(dev, "nvmlDeviceGetSupportedEventTypes",
                               nvml.nvmlDeviceGetSupportedEventTypes, dev.handle)
            if not supported & XID_EVENT:
                dev.unsupported.add("nvmlDeviceRegisterEvents")
                continue
            s.call(dev, "nvmlDeviceRegisterEvents", nvml.nvmlDeviceRegisterEvents, dev.handle,
                   XID_EVENT, event_set)
            registered += 1
        except (_Unavailable, _DeviceLost, _SessionLost):
            continue
    if not registered:
        try:
            nvml.nvmlEventSetFree(event_set)
        except Exception as exc:
            on_error("nvmlEventSetFree", exc)
        return None
    watcher = _XidWatcher(nvml, event_set, wait_ms, on_xid, on_error)
    watcher.start()
    return watcher


# --- the collector -------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Snapshot:
    """What the last tick saw; replaced whole, never mutated, so a scrape needs no lock."""

    samples: Samples
    up: bool
    duration_seconds: float
    last_success: float | None
    engine_totals: tuple[tuple[tuple[str, ...], float], ...] = ()


class GpuCollector(RendersItself):
    """prometheus_client custom collector fed by an NVML sampler thread. The metrics port
    renders it through `render()`, which formats a snapshot once, not on every scrape."""

    def __init__(self, config: GpuConfig, root_pid: int, nvml: Any = None, *,
                 proc_root: str = "/proc", clock: Callable[[], float] = time.monotonic,
                 on_label_overflow: Callable[[int], None] = lambda n: None):
        super().__init__()
        self.config = config
        self._on_label_overflow = on_label_overflow
        self.engine_processes = EngineProcesses(root_pid, proc_root)
        self._nvml_module = nvml
        self._clock = clock
        self._session: _NvmlSession | None = None
        self._xid_watcher: _XidWatcher | None = None
        self._visible: dict[int, int] = {}
        self._known: dict[str, tuple[str, str, str]] = {}  # uuid -> labels, over sessions
        self._lost: set[str] = set()  # uuids of GPUs lost and not yet back
        self._backoff = config.retry_initial_seconds
        self._retry_at = 0.0
        self._down_logged = False
        self._budget_ratio: float | None = None
        self._lock = threading.Lock()  # guards the two dicts below (sampler + xid + scrape)
        self._errors: dict[str, int] = {}
        self._xids: dict[tuple[str, str], int] = {}  # (uuid, xid) -> count
        self._counts_version = 0  # bumped when either dict changes
        # (snapshot, budget ratio, counts version) the text was rendered from, {format: text}
        self._rendered: tuple[Any, Any, int, dict[bool, str]] | None = None
        self._logged_exceptions: set[str] = set()
        self._snapshot = _Snapshot({}, up=False, duration_seconds=0.0, last_success=None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the interface the daemon uses -----------------------------------------------------

    def start(self) -> None:
        """Start the sampler thread (NVML is initialised there). Never raises."""
        if not self.config.enabled or self._thread is not None:
            return
        try:
            self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)
            self._thread.start()
        except Exception:
            log.exception("cannot start the GPU sampler thread; GPU metrics are off")

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the GPU sampler did not stop within %.1f s", timeout)
        else:
            self._close()

    def set_memory_budget_ratio(self, ratio: float) -> None:
        """What vLLM may take of each GPU it uses (its gpu_memory_utilization)."""
        try:
            value = float(ratio)
        except (TypeError, ValueError):
            value = float("nan")
        if not 0 < value <= 1:
            log.warning("ignoring memory budget ratio %r: must be in (0, 1]", ratio)
            return
        self._budget_ratio = value

    def describe(self) -> Iterable:
        for spec in GPU_FAMILIES:
            yield _new_family(spec)

    def collect(self) -> Iterable:
        """The last snapshot's families; no NVML call here."""
        if not self.rendering_apart:
            yield from self._families()

    def render(self, openmetrics: bool) -> str:
        """The families as exposition text, formatted again only when a tick, the budget or an
        error count changed them."""
        key = (self._snapshot, self._budget_ratio, self._counts_version)
        cached = self._rendered
        if cached is None or cached[0] is not key[0] or cached[1:3] != key[1:]:
            cached = self._rendered = (*key, {})
        texts = cached[3]
        if openmetrics not in texts:
            texts[openmetrics] = render_families(self._families(), openmetrics) or ""
        return texts[openmetrics]

    def _families(self) -> Iterable:
        snap = self._snapshot
        samples: Samples = {name: list(values) for name, values in snap.samples.items()}
        _add(samples, "vllm_exporter_collector_up", ("gpu",), 1 if snap.up else 0)
        _add(samples, "vllm_exporter_gpu_collect_duration_seconds", (), snap.duration_seconds)
        if snap.last_success is not None:
            _add(samples, "vllm_exporter_gpu_last_success_timestamp_seconds", (),
                 snap.last_success)
        ratio = self._budget_ratio
        if ratio is not None:
            for labels, total in snap.engine_totals:
                _add(samples, "gpu_memory_budget_bytes", labels, ratio * total)
        with self._lock:
            errors = dict(self._errors)
            xids = dict(self._xids)
        for call, count in sorted(errors.items()):
            _add(samples, "vllm_exporter_gpu_errors_total", (call,), count)
        for (uuid, xid), count in sorted(xids.items()):
            labels = self._known.get(uuid, ("", uuid, ""))
            _add(samples, "gpu_xid_errors_total", labels + (xid,), count)
        for spec in GPU_FAMILIES:
            values = samples.get(spec.name)
            if not values and spec.name not in _ALWAYS_RENDERED:
                continue
            family = _new_family(spec)
            for labels, value in values or ():
                family.add_metric(labels, value)
            yield family

    # --- one tick ----------------------------------------------------------------------------

    def sample_once(self) -> None:
        """One collection tick. The sampler thread calls it; tests and bench call it directly."""
        started = time.perf_counter()
        now = self._clock()
        if now >= self._retry_at and (self._session is None or self._needs_reopen()):
            self._close()
            self._open(now)
        samples: Samples = {}
        healthy = False
        engine_totals: list[tuple[tuple[str, ...], float]] = []
        if self._session is not None:
            try:
                healthy = self._sample_devices(self._session, samples, engine_totals, now)
            except _SessionLost as lost:
                self._close()
                self._schedule_retry(now, f"NVML stopped working ({lost} failed)")
                samples, engine_totals = {}, []
        self._render_device_states(samples)
        last_success = time.time() if healthy else self._snapshot.last_success
        if healthy:
            self._backoff = self.config.retry_initial_seconds
        self._snapshot = _Snapshot(samples, healthy, time.perf_counter() - started,
                                   last_success, tuple(engine_totals))

    def _sample_devices(self, s: _NvmlSession, samples: Samples,
                        engine_totals: list, now: float) -> bool:
        """Read every GPU that is not lost; True if all of them answered."""
        slow_device = self._slow_device_due(s, now)
        for dev in s.devices:
            if dev.lost:
                continue
            out: Samples = {}
            try:
                self._read_device(s, dev, out, slow=dev is slow_device)
            except _DeviceLost as lost:
                dev.lost = True
                self._lost.add(dev.uuid)
                log.warning("GPU %d (%s, %s) is lost (%s failed); its series are dropped and "
                            "NVML is re-initialised with backoff", dev.index, dev.name, dev.uuid,
                            lost)
                self._schedule_retry(now, None)
                continue
            if dev.uuid in self._lost:
                self._lost.discard(dev.uuid)
                log.warning("GPU %d (%s, %s) answers again", dev.index, dev.name, dev.uuid)
            for family, values in dev.slow_samples.items():
                out.setdefault(family, []).extend(values)
            for family, values in out.items():
                samples.setdefault(family, []).extend(values)
            total = out.get("gpu_memory_total_bytes")
            if dev.index in self._visible and total:
                # vLLM's total (cudaMemGetInfo) leaves out what the driver reserves.
                reserved = out.get("gpu_memory_reserved_bytes")
                engine_totals.append((dev.labels,
                                      total[0][1] - (reserved[0][1] if reserved else 0.0)))
        return bool(s.devices) and not self._needs_reopen()

    def _read_device(self, s: _NvmlSession, dev: _Device, out: Samples, slow: bool) -> None:
        for reader in TICK_READERS:
            _read_if_available(reader, s, dev, out)
        if slow:
            dev.slow_samples = self._read_slow(s, dev)
            dev.slow_due = self._clock() + self.config.slow_interval_seconds
            self.engine_processes.retain(set().union(*(d.pids for d in s.devices)))

    def _read_slow(self, s: _NvmlSession, dev: _Device) -> Samples:
        readers = list(SLOW_READERS)
        if self.config.processes:
            readers.append(partial(_read_processes, engine=self.engine_processes))
        if self.config.energy:
            readers.append(_read_energy)
        if self.config.pcie_throughput:
            readers.append(_read_pcie_throughput)
        out: Samples = {}
        for reader in readers:
            _read_if_available(reader, s, dev, out)
        return out

    def _slow_device_due(self, s: _NvmlSession, now: float) -> _Device | None:
        """At most one GPU per tick does the slow calls, so no tick pays for all GPUs."""
        return next((dev for dev in s.devices if not dev.lost and dev.slow_due <= now), None)

    def _render_device_states(self, samples: Samples) -> None:
        """gpu_up, gpu_engine_visible and the unsupported calls, from the session's devices."""
        s = self._session
        present = {dev.uuid: dev for dev in (s.devices if s else ())}
        for uuid, labels in self._known.items():
            dev = present.get(uuid)
            _add(samples, "gpu_up", labels, 1 if dev is not None and not dev.lost else 0)
            if dev is None or dev.lost:
                continue
            cuda_index = self._visible.get(dev.index)
            _add(samples, "gpu_engine_visible",
                 labels + ("" if cuda_index is None else str(cuda_index),),
                 0 if cuda_index is None else 1)
            for call in sorted(dev.unsupported):
                _add(samples, "vllm_exporter_gpu_call_unsupported", (labels[0], call), 1)

    # --- NVML session lifecycle ----------------------------------------------------------------

    def _needs_reopen(self) -> bool:
        s = self._session
        return s is not None and (bool(s.missing_indices) or any(d.lost for d in s.devices))

    def _open(self, now: float) -> None:
        nvml = self._load_nvml()
        if nvml is None:
            self._schedule_retry(now, "the nvidia-ml-py package (pynvml) is not installed")
            return
        try:
            nvml.nvmlInit()
        except Exception as exc:
            self._count_error("nvmlInit", exc)
            self._schedule_retry(now, f"nvmlInit failed: {exc}")
            return
        session = _NvmlSession(nvml, self._count_error)
        try:
            session.enumerate_devices(self.config.mig, self.config.max_devices)
        except (_Unavailable, _DeviceLost, _SessionLost):
            session.shutdown()
            self._schedule_retry(now, "nvmlDeviceGetCount failed")
            return
        if not session.devices:
            session.shutdown()
            self._schedule_retry(now, "NVML found no GPU")
            return
        if session.left_out:
            log.warning("reading the first %d GPUs only (gpu.max_devices); %d left out",
                        self.config.max_devices, session.left_out)
            self._on_label_overflow(session.left_out)
        self._session = session
        self._visible = self._map_visible(session)
        for dev in session.devices:
            self._known[dev.uuid] = dev.labels
        if self.config.xid_events:
            self._xid_watcher = _start_xid_watcher(session, self.config.event_wait_ms,
                                                   self._count_xid, self._count_error)
        if self._down_logged:
            log.info("NVML is available again: %d GPU(s)", len(session.devices))
        self._down_logged = False
        if session.missing_indices:
            self._schedule_retry(now, None)

    def _close(self) -> None:
        if self._xid_watcher is not None:
            self._xid_watcher.stop()
            self._xid_watcher = None
        if self._session is not None:
            self._session.shutdown()
            self._session = None

    def _schedule_retry(self, now: float, reason: str | None) -> None:
        """Back off before the next NVML (re)init; say why once per outage."""
        self._retry_at = now + self._backoff
        if reason is not None and not self._down_logged:
            log.warning("GPU metrics unavailable: %s. vllm_exporter_collector_up{collector=\"gpu\"}"
                        " is 0; retrying with backoff (up to %.0f s).", reason,
                        self.config.retry_max_seconds)
            self._down_logged = True
        self._backoff = min(self._backoff * 2, self.config.retry_max_seconds)

    def _load_nvml(self) -> Any:
        if self._nvml_module is None:
            try:
                self._nvml_module = importlib.import_module("pynvml")
            except ImportError:
                return None
        return self._nvml_module

    def _map_visible(self, s: _NvmlSession) -> dict[int, int]:
        value = self.config.cuda_visible_devices
        if value is None:
            value = os.environ.get("CUDA_VISIBLE_DEVICES")
        uuids = {dev.index: dev.uuid for dev in s.devices}
        mig_parents = {mig.uuid: dev.index for dev in s.devices for mig in dev.migs}
        return map_cuda_visible_devices(value, uuids, mig_parents)

    # --- callbacks from the session and the XID thread ------------------------------------------

    def _count_error(self, call: str, exc: BaseException) -> None:
        with self._lock:
            self._errors[call] = self._errors.get(call, 0) + 1
            self._counts_version += 1
        if not _is_nvml_error(exc) and call not in self._logged_exceptions:
            self._logged_exceptions.add(call)
            log.warning("unexpected error from %s (counted, logged once)", call, exc_info=exc)

    def _count_xid(self, handle: Any, xid: int) -> None:
        nvml = self._nvml_module
        try:
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
        except Exception as exc:
            self._count_error("nvmlDeviceGetUUID", exc)
            uuid = ""
        label = str(xid) if 0 <= xid <= MAX_XID_LABEL else "other"
        with self._lock:
            count = self._xids[(uuid, label)] = self._xids.get((uuid, label), 0) + 1
            self._counts_version += 1
        if count == 1:  # the first of each code per GPU; the counter tells the rest
            log.warning("XID %d on GPU %s (further XID %s events are only counted)", xid,
                        uuid or "(unknown)", label)

    # --- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            started = self._clock()
            try:
                self.sample_once()
            except Exception as exc:  # a bug: count it and keep sampling
                self._count_error("sample_once", exc)
            elapsed = self._clock() - started
            self._stop.wait(max(self.config.interval_seconds - elapsed, 0.0))
        self._close()


def _is_nvml_error(exc: BaseException) -> bool:
    return any(cls.__name__ == "NVMLError" for cls in type(exc).__mro__)


def _new_family(spec: FamilySpec):
    if spec.kind == "counter":
        return CounterMetricFamily(spec.client_name, spec.help, labels=spec.labels)
    return GaugeMetricFamily(spec.name, spec.help, labels=spec.labels)
