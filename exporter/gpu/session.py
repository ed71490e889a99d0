"""One NVML session (nvmlInit .. nvmlShutdown): the GPUs it found, and every NVML call, with
each failure sorted into one of four kinds (the exceptions below) that decide what the
collector does next. See docs/gpu.md#failure-behaviour."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("exporter.gpu")


class Unavailable(Exception):
    """This reading is missing from this tick; the GPU's other readings go on."""


class Unsupported(Unavailable):
    """The GPU does not support this call; it is not called again in this session."""


class DeviceLost(Exception):
    """The GPU stopped answering (GpuIsLost, ResetRequired)."""


class SessionLost(Exception):
    """NVML itself stopped working (uninitialised, driver unloaded, version mismatch)."""


@dataclass
class MigDevice:
    handle: Any
    uuid: str
    labels: tuple[str, ...]  # MIG_LABELS


@dataclass
class Device:
    index: int
    handle: Any
    uuid: str
    name: str
    migs: list[MigDevice] = field(default_factory=list)
    unsupported: set[str] = field(default_factory=set)
    lost: bool = False
    slow_due: float = 0.0  # clock time the slow readings are next due
    slow_samples: dict[str, list] = field(default_factory=dict)
    pids: set[int] = field(default_factory=set)  # compute processes at the last slow read
    labels: tuple[str, str, str] = ("", "", "")  # (gpu, uuid, name), set from the fields above

    def __post_init__(self) -> None:
        self.labels = (str(self.index), self.uuid, self.name)


class NvmlSession:
    """Calls NVML for one init..shutdown, sorting every failure into the four kinds above."""

    def __init__(self, nvml: Any, on_error: Callable[[str, BaseException], None]):
        self.nvml = nvml
        self.devices: list[Device] = []
        self.missing_indices: list[int] = []  # indices NVML counts but cannot open (lost)
        self.left_out = 0  # GPUs beyond the max_devices cap
        self._on_error = on_error
        self._unsupported_errors = _error_classes(nvml, "NotSupported", "FunctionNotFound")
        self._lost_errors = _error_classes(nvml, "GpuIsLost", "ResetRequired")
        self._session_errors = _error_classes(nvml, "Uninitialized", "DriverNotLoaded",
                                              "LibRmVersionMismatch", "LibraryNotFound")

    def call(self, dev: Device | None, call: str, fn: Callable, *args: Any) -> Any:
        if dev is not None and call in dev.unsupported:
            raise Unsupported(call)
        try:
            return fn(*args)
        except self._unsupported_errors as exc:
            if dev is None:
                self._on_error(call, exc)
                raise Unavailable(call) from None
            dev.unsupported.add(call)
            log.info("GPU %d (%s) does not support %s; its series are left out",
                     dev.index, dev.name, call)
            raise Unsupported(call) from None
        except self._lost_errors as exc:
            self._on_error(call, exc)
            raise DeviceLost(call) from None
        except self._session_errors as exc:
            self._on_error(call, exc)
            raise SessionLost(call) from None
        except Exception as exc:  # other NVML errors, and anything else a binding may raise
            self._on_error(call, exc)
            raise Unavailable(call) from None

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
            except (Unavailable, DeviceLost):
                self.missing_indices.append(index)
                continue
            dev = Device(index, handle, text(uuid), text(name))
            if with_mig:
                dev.migs = self._enumerate_migs(dev)
            self.devices.append(dev)

    def _enumerate_migs(self, dev: Device) -> list[MigDevice]:
        nvml = self.nvml
        try:
            current, _pending = self.call(dev, "nvmlDeviceGetMigMode",
                                          nvml.nvmlDeviceGetMigMode, dev.handle)
            if current != nvml.NVML_DEVICE_MIG_ENABLE:
                return []
            slots = self.call(dev, "nvmlDeviceGetMaxMigDeviceCount",
                              nvml.nvmlDeviceGetMaxMigDeviceCount, dev.handle)
        except (Unavailable, DeviceLost):
            return []
        migs = []
        for slot in range(slots):
            try:  # empty slots answer NotFound: that is no error
                handle = nvml.nvmlDeviceGetMigDeviceHandleByIndex(dev.handle, slot)
                uuid = text(nvml.nvmlDeviceGetUUID(handle))
                name = text(nvml.nvmlDeviceGetName(handle))
            except nvml.NVMLError_NotFound:
                continue
            except Exception as exc:
                self._on_error("nvmlDeviceGetMigDeviceHandleByIndex", exc)
                continue
            migs.append(MigDevice(handle, uuid, dev.labels + (str(slot), uuid, name)))
        return migs

    def shutdown(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except Exception as exc:
            self._on_error("nvmlShutdown", exc)


def _error_classes(nvml: Any, *names: str) -> tuple[type, ...]:
    return tuple(getattr(nvml, "NVMLError_" + name) for name in names
                 if hasattr(nvml, "NVMLError_" + name))


def text(value: Any) -> str:
    """NVML strings arrive as bytes from older bindings, as str from newer ones."""
    return value.decode() if isinstance(value, bytes) else str(value)


def is_nvml_error(exc: BaseException) -> bool:
    return any(cls.__name__ == "NVMLError" for cls in type(exc).__mro__)
