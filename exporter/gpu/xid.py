"""XID critical-error events: a thread that waits on an NVML event set and hands each event to
the collector, which counts it in vllm_gpu_xid_errors_total."""

from __future__ import annotations

import threading
from typing import Any, Callable

from .session import DeviceLost, NvmlSession, SessionLost, Unavailable

XID_EVENT = 0x8  # nvmlEventTypeXidCriticalError
MAX_XID_LABEL = 999  # larger XID codes collapse to xid="other" (bounded labels)


def xid_label(xid: int) -> str:
    """The `xid` label value of an XID code: the code, or "other" beyond MAX_XID_LABEL."""
    return str(xid) if 0 <= xid <= MAX_XID_LABEL else "other"


class XidWatcher:
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


def start_xid_watcher(s: NvmlSession, wait_ms: int, on_xid: Callable[[Any, int], None],
                      on_error: Callable[[str, BaseException], None]) -> XidWatcher | None:
    """Register every GPU that supports XID events; None if none does."""
    nvml = s.nvml
    try:
        event_set = s.call(None, "nvmlEventSetCreate", nvml.nvmlEventSetCreate)
    except (Unavailable, DeviceLost, SessionLost):
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
        except (Unavailable, DeviceLost, SessionLost):
            continue
    if not registered:
        try:
            nvml.nvmlEventSetFree(event_set)
        except Exception as exc:
            on_error("nvmlEventSetFree", exc)
        return None
    watcher = XidWatcher(nvml, event_set, wait_ms, on_xid, on_error)
    watcher.start()
    return watcher

