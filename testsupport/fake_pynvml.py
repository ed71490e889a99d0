"""A stand-in for the `pynvml` module (nvidia-ml-py), replaying values recorded on a real GPU.

`FakeNvml(load_recording())` has the pynvml function names the GPU collector calls, and the real
module's constants and exception classes (NVMLError_NotSupported, NVMLError_GpuIsLost, ...), so
the collector cannot tell it from the real thing. Tests steer it: `lose_gpu`, `restore_gpu`,
`fail`, `set_processes`, `emit_xid`, `library_present`. Every API call is logged in `calls`.

Run as a script on a GPU machine to make a recording:
    python3 -m testsupport.fake_pynvml --record tests/data/nvml_h200.json
Each recorded call is keyed by its function name and its numeric arguments after the handle
("nvmlDeviceGetClockInfo:1" is the SM clock); a call that failed holds the exception's class name.
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml

DEFAULT_RECORDING = Path(__file__).resolve().parent.parent / "tests" / "data" / "nvml_h200.json"


def load_recording(path: str | Path = DEFAULT_RECORDING) -> dict:
    return json.loads(Path(path).read_text())


class FakeHandle:
    def __init__(self, gpu: int, mig: int | None = None):
        self.gpu, self.mig = gpu, mig

    def __repr__(self) -> str:
        return f"FakeHandle(gpu={self.gpu}, mig={self.mig})"


class FakeEventSet:
    def __init__(self):
        self.gpus: set[int] = set()
        self.events: queue.Queue = queue.Queue()
        self.freed = False


class FakeNvml:
    """Module-like object: NVML functions as methods, pynvml's constants as attributes."""

    def __init__(self, recording: dict, library_present: bool = True):
        self.devices = [dict(device["calls"]) for device in recording["devices"]]
        self.library_present = library_present
        self.initialized = False
        self.calls: list[str] = []
        self.lost: set[int] = set()
        self.errors: dict[tuple[int, str], type] = {}
        self.processes: dict[int, list[tuple[int, int]]] = {}
        self.event_sets: list[FakeEventSet] = []
        # Set to an unset Event to make nvmlInit wait for it (at most 10 s), as a slow driver's
        # does: a test can see what runs while NVML is still starting.
        self.init_gate: threading.Event | None = None

    # --- steering ------------------------------------------------------------------------------

    def lose_gpu(self, gpu: int) -> None:
        self.lost.add(gpu)

    def restore_gpu(self, gpu: int) -> None:
        self.lost.discard(gpu)

    def fail(self, gpu: int, key: str, error: type | None) -> None:
        """Make `key` raise `error` on this GPU from now on (None: answer again)."""
        if error is None:
            self.errors.pop((gpu, key), None)
        else:
            self.errors[(gpu, key)] = error

    def set_value(self, gpu: int, key: str, value: Any) -> None:
        self.devices[gpu][key] = {"value": value}

    def set_processes(self, gpu: int, processes: list[tuple[int, int]]) -> None:
        """(pid, used bytes) of the compute processes on `gpu`."""
        self.processes[gpu] = processes

    def emit_xid(self, gpu: int, xid: int) -> None:
        event = SimpleNamespace(device=FakeHandle(gpu),
                                eventType=pynvml.nvmlEventTypeXidCriticalError,
                                eventData=xid, gpuInstanceId=0, computeInstanceId=0)
        for event_set in self.event_sets:
            if gpu in event_set.gpus and not event_set.freed:
                event_set.events.put(event)

    def count(self, name: str) -> int:
        return sum(1 for call in self.calls if call == name)

    # --- the recorded answers ----------------------------------------------------------------

    def _answer(self, name: str, handle: FakeHandle, key: str | None = None) -> Any:
        self.calls.append(name)
        if not self.initialized:
            raise pynvml.NVMLError_Uninitialized()
        if handle.gpu in self.lost:
            raise pynvml.NVMLError_GpuIsLost()
        key = key or name
        if (handle.gpu, key) in self.errors:
            raise self.errors[(handle.gpu, key)]()
        entry = self.devices[handle.gpu].get(key)
        if entry is None:
            raise pynvml.NVMLError_NotSupported()
        if "error" in entry:
            raise getattr(pynvml, entry["error"])()
        return entry["value"]

    # --- library ------------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self.calls.append("nvmlInit")
        if self.init_gate is not None:
            self.init_gate.wait(10.0)
        if not self.library_present:
            raise pynvml.NVMLError_LibraryNotFound()
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self.calls.append("nvmlShutdown")
        if not self.initialized:
            raise pynvml.NVMLError_Uninitialized()
        self.initialized = False

    def nvmlDeviceGetCount(self) -> int:
        self.calls.append("nvmlDeviceGetCount")
        if not self.initialized:
            raise pynvml.NVMLError_Uninitialized()
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        self.calls.append("nvmlDeviceGetHandleByIndex")
        if not self.initialized:
            raise pynvml.NVMLError_Uninitialized()
        if not 0 <= index < len(self.devices):
            raise pynvml.NVMLError_InvalidArgument()
        if index in self.lost:
            raise pynvml.NVMLError_GpuIsLost()
        return FakeHandle(index)

    # --- identity -----------------------------------------------------------------------------

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str:
        if handle.mig is not None:
            return self._mig(handle)["uuid"]
        return self._answer("nvmlDeviceGetUUID", handle)

    def nvmlDeviceGetName(self, handle: FakeHandle) -> str:
        if handle.mig is not None:
            return self._mig(handle)["name"]
        return self._answer("nvmlDeviceGetName", handle)

    # --- readings -----------------------------------------------------------------------------

    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle, version: int | None = None):
        if handle.mig is not None:
            self.calls.append("nvmlDeviceGetMemoryInfo")
            return SimpleNamespace(**self._mig(handle)["memory"])
        key = "nvmlDeviceGetMemoryInfo_v2" if version else "nvmlDeviceGetMemoryInfo"
        return SimpleNamespace(**self._answer("nvmlDeviceGetMemoryInfo", handle, key))

    def nvmlDeviceGetUtilizationRates(self, handle: FakeHandle):
        return SimpleNamespace(**self._answer("nvmlDeviceGetUtilizationRates", handle))

    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        return self._answer("nvmlDeviceGetPowerUsage", handle)

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeHandle) -> int:
        return self._answer("nvmlDeviceGetEnforcedPowerLimit", handle)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeHandle) -> int:
        return self._answer("nvmlDeviceGetTotalEnergyConsumption", handle)

    def nvmlDeviceGetTemperature(self, handle: FakeHandle, sensor: int) -> int:
        return self._answer("nvmlDeviceGetTemperature", handle,
                            f"nvmlDeviceGetTemperature:{sensor}")

    def nvmlDeviceGetClockInfo(self, handle: FakeHandle, clock: int) -> int:
        return self._answer("nvmlDeviceGetClockInfo", handle, f"nvmlDeviceGetClockInfo:{clock}")

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: FakeHandle) -> int:
        return self._answer("nvmlDeviceGetCurrentClocksEventReasons", handle)

    def nvmlDeviceGetPerformanceState(self, handle: FakeHandle) -> int:
        return self._answer("nvmlDeviceGetPerformanceState", handle)

    def nvmlDeviceGetTotalEccErrors(self, handle: FakeHandle, error_type: int,
                                    counter_type: int) -> int:
        return self._answer("nvmlDeviceGetTotalEccErrors", handle,
                            f"nvmlDeviceGetTotalEccErrors:{error_type}:{counter_type}")

    def nvmlDeviceGetRemappedRows(self, handle: FakeHandle) -> tuple:
        return tuple(self._answer("nvmlDeviceGetRemappedRows", handle))

    def nvmlDeviceGetPcieThroughput(self, handle: FakeHandle, counter: int) -> int:
        return self._answer("nvmlDeviceGetPcieThroughput", handle,
                            f"nvmlDeviceGetPcieThroughput:{counter}")

    def nvmlDeviceGetFanSpeed(self, handle: FakeHandle) -> int:
        return self._answer("nvmlDeviceGetFanSpeed", handle)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeHandle) -> list:
        recorded = self._answer("nvmlDeviceGetComputeRunningProcesses", handle)
        if handle.gpu in self.processes:
            recorded = [{"pid": pid, "usedGpuMemory": used}
                        for pid, used in self.processes[handle.gpu]]
        no_instance = {"gpuInstanceId": 0xFFFFFFFF, "computeInstanceId": 0xFFFFFFFF}
        return [SimpleNamespace(**{**no_instance, **proc}) for proc in recorded]

    # --- MIG ----------------------------------------------------------------------------------

    def nvmlDeviceGetMigMode(self, handle: FakeHandle) -> list:
        return list(self._answer("nvmlDeviceGetMigMode", handle))

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: FakeHandle) -> int:
        return self._answer("nvmlDeviceGetMaxMigDeviceCount", handle)

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: FakeHandle, index: int) -> FakeHandle:
        slots = self._answer("nvmlDeviceGetMigDeviceHandleByIndex", handle, "mig_devices")
        if index >= len(slots) or slots[index] is None:
            raise pynvml.NVMLError_NotFound()
        return FakeHandle(handle.gpu, index)

    def _mig(self, handle: FakeHandle) -> dict:
        self.calls.append("mig")
        return self.devices[handle.gpu]["mig_devices"]["value"][handle.mig]

    # --- events -------------------------------------------------------------------------------

    def nvmlDeviceGetSupportedEventTypes(self, handle: FakeHandle) -> int:
        return self._answer("nvmlDeviceGetSupportedEventTypes", handle)

    def nvmlEventSetCreate(self) -> FakeEventSet:
        self.calls.append("nvmlEventSetCreate")
        event_set = FakeEventSet()
        self.event_sets.append(event_set)
        return event_set

    def nvmlDeviceRegisterEvents(self, handle: FakeHandle, event_types: int,
                                 event_set: FakeEventSet) -> None:
        self._answer("nvmlDeviceRegisterEvents", handle)
        event_set.gpus.add(handle.gpu)

    def nvmlEventSetWait(self, event_set: FakeEventSet, timeout_ms: int):
        # Not logged in `calls`: it runs on its own thread all the time.
        try:
            return event_set.events.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            raise pynvml.NVMLError_Timeout() from None

    def nvmlEventSetFree(self, event_set: FakeEventSet) -> None:
        self.calls.append("nvmlEventSetFree")
        event_set.freed = True


# pynvml's constants and exception classes, so `nvml.NVML_CLOCK_SM` and
# `except nvml.NVMLError_NotSupported` mean on the fake what they mean on the real module.
for _name in dir(pynvml):
    if _name.startswith(("NVML_", "NVMLError", "nvmlEventType", "nvmlClocksEventReason",
                         "nvmlClocksThrottleReason", "nvmlMemory_v")):
        setattr(FakeNvml, _name, getattr(pynvml, _name))


# --- recording on a real GPU ---------------------------------------------------------------------

def _recorded_calls(nvml: Any) -> list[tuple[str, Any]]:
    """(key, call(handle)) for everything the collector reads, the slow calls and a few that a
    data-centre GPU is expected to refuse (fan, NVLink, retired pages)."""
    return [
        ("nvmlDeviceGetName", lambda h: nvml.nvmlDeviceGetName(h)),
        ("nvmlDeviceGetUUID", lambda h: nvml.nvmlDeviceGetUUID(h)),
        ("nvmlDeviceGetMemoryInfo", lambda h: nvml.nvmlDeviceGetMemoryInfo(h)),
        ("nvmlDeviceGetMemoryInfo_v2",
         lambda h: nvml.nvmlDeviceGetMemoryInfo(h, nvml.nvmlMemory_v2)),
        ("nvmlDeviceGetUtilizationRates", lambda h: nvml.nvmlDeviceGetUtilizationRates(h)),
        ("nvmlDeviceGetPowerUsage", lambda h: nvml.nvmlDeviceGetPowerUsage(h)),
        ("nvmlDeviceGetEnforcedPowerLimit", lambda h: nvml.nvmlDeviceGetEnforcedPowerLimit(h)),
        ("nvmlDeviceGetTemperature:0",
         lambda h: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)),
        ("nvmlDeviceGetClockInfo:1", lambda h: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM)),
        ("nvmlDeviceGetClockInfo:2",
         lambda h: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_MEM)),
        ("nvmlDeviceGetCurrentClocksEventReasons",
         lambda h: nvml.nvmlDeviceGetCurrentClocksEventReasons(h)),
        ("nvmlDeviceGetPerformanceState", lambda h: nvml.nvmlDeviceGetPerformanceState(h)),
        ("nvmlDeviceGetTotalEccErrors:0:0", lambda h: nvml.nvmlDeviceGetTotalEccErrors(
            h, nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, nvml.NVML_VOLATILE_ECC)),
        ("nvmlDeviceGetTotalEccErrors:1:0", lambda h: nvml.nvmlDeviceGetTotalEccErrors(
            h, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC)),
        ("nvmlDeviceGetRemappedRows", lambda h: nvml.nvmlDeviceGetRemappedRows(h)),
        ("nvmlDeviceGetComputeRunningProcesses",
         lambda h: nvml.nvmlDeviceGetComputeRunningProcesses(h)),
        ("nvmlDeviceGetMigMode", lambda h: nvml.nvmlDeviceGetMigMode(h)),
        ("nvmlDeviceGetMaxMigDeviceCount", lambda h: nvml.nvmlDeviceGetMaxMigDeviceCount(h)),
        ("nvmlDeviceGetSupportedEventTypes", lambda h: nvml.nvmlDeviceGetSupportedEventTypes(h)),
        # slow ones
        ("nvmlDeviceGetTotalEnergyConsumption",
         lambda h: nvml.nvmlDeviceGetTotalEnergyConsumption(h)),
        ("nvmlDeviceGetFieldValues:energy", lambda h: [
            (v.nvmlReturn, v.value.ullVal)
            for v in nvml.nvmlDeviceGetFieldValues(h, [nvml.NVML_FI_DEV_ENERGY])]),
        ("nvmlDeviceGetPcieThroughput:0",
         lambda h: nvml.nvmlDeviceGetPcieThroughput(h, nvml.NVML_PCIE_UTIL_TX_BYTES)),
        ("nvmlDeviceGetPcieThroughput:1",
         lambda h: nvml.nvmlDeviceGetPcieThroughput(h, nvml.NVML_PCIE_UTIL_RX_BYTES)),
        # expected to be refused on a data-centre GPU
        ("nvmlDeviceGetFanSpeed", lambda h: nvml.nvmlDeviceGetFanSpeed(h)),
        ("nvmlDeviceGetNvLinkState:0", lambda h: nvml.nvmlDeviceGetNvLinkState(h, 0)),
        ("nvmlDeviceGetRetiredPages:0", lambda h: nvml.nvmlDeviceGetRetiredPages(
            h, nvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS)),
    ]


SLOW_KEYS = ("nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetPcieThroughput:0",
             "nvmlDeviceGetPcieThroughput:1")


def _to_json(value: Any) -> Any:
    """ctypes structures and pynvml's friendly objects -> plain JSON values."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, (list, tuple)):
        return [_to_json(item) for item in value]
    if hasattr(value, "_fields_"):
        return {name: _to_json(getattr(value, name)) for name, *_ in value._fields_}
    if hasattr(value, "__dict__"):
        return {k: _to_json(v) for k, v in vars(value).items() if not k.startswith("_")}
    return repr(value)


def _time_call(call: Any, handle: Any, repeats: int) -> float:
    """Median microseconds of one call."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        try:
            call(handle)
        except Exception:
            pass
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e6, 2)


def record(nvml: Any = pynvml) -> dict:
    nvml.nvmlInit()
    try:
        devices = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            calls, timings = {}, {}
            for key, call in _recorded_calls(nvml):
                try:
                    calls[key] = {"value": _to_json(call(handle))}
                except Exception as exc:
                    calls[key] = {"error": type(exc).__name__, "message": str(exc)}
                timings[key] = _time_call(call, handle, 10 if key in SLOW_KEYS else 200)
            calls.update(_record_xid_events(nvml, handle))
            devices.append({"calls": calls, "median_us_per_call": timings})
        return {
            "recorded_with": {
                "driver_version": _to_json(nvml.nvmlSystemGetDriverVersion()),
                "nvml_version": _to_json(nvml.nvmlSystemGetNVMLVersion()),
                "cuda_driver_version": nvml.nvmlSystemGetCudaDriverVersion(),
                "python": sys.version.split()[0],
                "date": time.strftime("%Y-%m-%d"),
            },
            "devices": devices,
        }
    finally:
        nvml.nvmlShutdown()


def _record_xid_events(nvml: Any, handle: Any) -> dict:
    """Register for XID events and wait 10 ms: expect a Timeout (no XID happened)."""
    calls = {}
    try:
        event_set = nvml.nvmlEventSetCreate()
    except Exception as exc:
        return {"nvmlEventSetCreate": {"error": type(exc).__name__, "message": str(exc)}}
    try:
        for key, call in (
                ("nvmlDeviceRegisterEvents", lambda: nvml.nvmlDeviceRegisterEvents(
                    handle, nvml.nvmlEventTypeXidCriticalError, event_set)),
                ("nvmlEventSetWait", lambda: nvml.nvmlEventSetWait(event_set, 10))):
            try:
                calls[key] = {"value": _to_json(call())}
            except Exception as exc:
                calls[key] = {"error": type(exc).__name__, "message": str(exc)}
    finally:
        nvml.nvmlEventSetFree(event_set)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", metavar="PATH", required=True,
                        help="write what the real GPU answers to PATH (JSON)")
    args = parser.parse_args()
    recording = record()
    Path(args.record).write_text(json.dumps(recording, indent=1, sort_keys=True) + "\n")
    for device in recording["devices"]:
        print(device["calls"]["nvmlDeviceGetName"], device["calls"]["nvmlDeviceGetUUID"])
        for key, us in sorted(device["median_us_per_call"].items(), key=lambda kv: -kv[1]):
            outcome = device["calls"][key].get("error", "ok")
            print(f"  {key:45s} {us:10.1f} us  {outcome}")


if __name__ == "__main__":
    main()
