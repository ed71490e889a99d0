"""The GPU collector: an NVML sampler on its own thread, whose scrapes only render the last tick.

A sampler thread calls NVML every `interval_seconds` and publishes an immutable snapshot; a
scrape (`collect()`, `render()`) only renders that snapshot and never calls NVML. A second
thread (xid.py) waits on an NVML event set for XID errors. Slow-moving or slow-to-read calls
(power limit, ECC, remapped rows, the process list, total energy ~3 ms, PCIe throughput ~21 ms
and opt-in, on an H200) form a slow group that runs for one GPU per tick, each GPU every
`slow_interval_seconds`.

Like every collector, it reports its own health: `vllm_exporter_collector_up{collector="gpu"}`
(success) and `vllm_exporter_gpu_collect_duration_seconds` (how long the last tick took).

Failure stays local:
- no NVML library, no driver, no GPU: `vllm_exporter_collector_up{collector="gpu"}` is 0, one
  WARNING on the `exporter.gpu` logger, NVML init is retried with exponential backoff;
- a call the card does not support (NotSupported, FunctionNotFound): remembered per (GPU, call),
  never called again in that NVML session, shown once in
  `vllm_exporter_gpu_call_unsupported{gpu,call}` and NOT counted as an error;
- any other failed call: counted in `vllm_exporter_gpu_errors_total{call}`, only its own series
  are missing from that tick;
- a GPU that is lost (GpuIsLost, ResetRequired): `vllm_gpu_up` 0 for it, the other GPUs go on, and
  NVML is re-initialised with backoff until the GPU answers again.
Nothing here raises into the caller. See docs/gpu.md.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from ..exposition import RendersItself, render_families
from ..families import metric_family
from .config import GpuConfig
from .families import ALWAYS_RENDERED, GPU_FAMILIES
from .processes import EngineProcesses
from .readers import TICK_READERS, read_if_available, slow_readers
from .samples import Samples, add
from .session import Device, DeviceLost, NvmlSession, SessionLost, Unavailable, is_nvml_error, text
from .visible import map_cuda_visible_devices
from .xid import XidWatcher, start_xid_watcher, xid_label

log = logging.getLogger("exporter.gpu")


@dataclass(frozen=True)
class Snapshot:
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
                 on_label_overflow: Callable[[int], None] = lambda n: None,
                 timer: Callable[[], float] = time.perf_counter,
                 wall_clock: Callable[[], float] = time.time):
        """`clock` schedules ticks, retries and the slow group; `timer` measures a tick's
        duration; `wall_clock` stamps the last success. Tests pass fakes of the three."""
        super().__init__()
        self.config = config
        self._on_label_overflow = on_label_overflow
        self.engine_processes = EngineProcesses(root_pid, proc_root)
        self._nvml_module = nvml
        self._clock = clock
        self._timer = timer
        self._wall_clock = wall_clock
        self._session: NvmlSession | None = None
        self._xid_watcher: XidWatcher | None = None
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
        self._snapshot = Snapshot({}, up=False, duration_seconds=0.0, last_success=None)
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
            yield metric_family(spec)

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
        add(samples, "vllm_exporter_collector_up", ("gpu",), 1 if snap.up else 0)
        add(samples, "vllm_exporter_gpu_collect_duration_seconds", (), snap.duration_seconds)
        if snap.last_success is not None:
            add(samples, "vllm_exporter_gpu_last_success_timestamp_seconds", (),
                snap.last_success)
        ratio = self._budget_ratio
        if ratio is not None:
            for labels, total in snap.engine_totals:
                add(samples, "vllm_gpu_memory_budget_bytes", labels, ratio * total)
        with self._lock:
            errors = dict(self._errors)
            xids = dict(self._xids)
        for call, count in sorted(errors.items()):
            add(samples, "vllm_exporter_gpu_errors_total", (call,), count)
        for (uuid, xid), count in sorted(xids.items()):
            labels = self._known.get(uuid, ("", uuid, ""))
            add(samples, "vllm_gpu_xid_errors_total", labels + (xid,), count)
        for spec in GPU_FAMILIES:
            values = samples.get(spec.name)
            if not values and spec.name not in ALWAYS_RENDERED:
                continue
            family = metric_family(spec)
            for labels, value in values or ():
                family.add_metric(labels, value)
            yield family

    # --- one tick ----------------------------------------------------------------------------

    def sample_once(self) -> None:
        """One collection tick. The sampler thread calls it; tests and bench call it directly."""
        started = self._timer()
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
            except SessionLost as lost:
                self._close()
                self._schedule_retry(now, f"NVML stopped working ({lost} failed)")
                samples, engine_totals = {}, []
        self._render_device_states(samples)
        last_success = self._wall_clock() if healthy else self._snapshot.last_success
        if healthy:
            self._backoff = self.config.retry_initial_seconds
        self._snapshot = Snapshot(samples, healthy, self._timer() - started,
                                  last_success, tuple(engine_totals))

    def _sample_devices(self, s: NvmlSession, samples: Samples,
                        engine_totals: list, now: float) -> bool:
        """Read every GPU that is not lost; True if all of them answered."""
        slow_device = self._slow_device_due(s, now)
        for dev in s.devices:
            if dev.lost:
                continue
            out: Samples = {}
            try:
                self._read_device(s, dev, out, slow=dev is slow_device)
            except DeviceLost as lost:
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
            total = out.get("vllm_gpu_memory_total_bytes")
            if dev.index in self._visible and total:
                # vLLM's total (cudaMemGetInfo) leaves out what the driver reserves.
                reserved = out.get("vllm_gpu_memory_reserved_bytes")
                engine_totals.append((dev.labels,
                                      total[0][1] - (reserved[0][1] if reserved else 0.0)))
        return bool(s.devices) and not self._needs_reopen()

    def _read_device(self, s: NvmlSession, dev: Device, out: Samples, slow: bool) -> None:
        for reader in TICK_READERS:
            read_if_available(reader, s, dev, out)
        if slow:
            dev.slow_samples = self._read_slow(s, dev)
            dev.slow_due = self._clock() + self.config.slow_interval_seconds
            self.engine_processes.retain(set().union(*(d.pids for d in s.devices)))

    def _read_slow(self, s: NvmlSession, dev: Device) -> Samples:
        out: Samples = {}
        for reader in slow_readers(self.config, self.engine_processes):
            read_if_available(reader, s, dev, out)
        return out

    def _slow_device_due(self, s: NvmlSession, now: float) -> Device | None:
        """At most one GPU per tick does the slow calls, so no tick pays for all GPUs."""
        return next((dev for dev in s.devices if not dev.lost and dev.slow_due <= now), None)

    def _render_device_states(self, samples: Samples) -> None:
        """vllm_gpu_up, vllm_gpu_engine_visible and the unsupported calls, from the session's
        devices."""
        s = self._session
        present = {dev.uuid: dev for dev in (s.devices if s else ())}
        for uuid, labels in self._known.items():
            dev = present.get(uuid)
            add(samples, "vllm_gpu_up", labels, 1 if dev is not None and not dev.lost else 0)
            if dev is None or dev.lost:
                continue
            cuda_index = self._visible.get(dev.index)
            add(samples, "vllm_gpu_engine_visible",
                labels + ("" if cuda_index is None else str(cuda_index),),
                0 if cuda_index is None else 1)
            for call in sorted(dev.unsupported):
                add(samples, "vllm_exporter_gpu_call_unsupported", (labels[0], call), 1)

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
        session = NvmlSession(nvml, self._count_error)
        try:
            session.enumerate_devices(self.config.mig, self.config.max_devices)
        except (Unavailable, DeviceLost, SessionLost):
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
            self._xid_watcher = start_xid_watcher(session, self.config.event_wait_ms,
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

    def _map_visible(self, s: NvmlSession) -> dict[int, int]:
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
        if not is_nvml_error(exc) and call not in self._logged_exceptions:
            self._logged_exceptions.add(call)
            log.warning("unexpected error from %s (counted, logged once)", call, exc_info=exc)

    def _count_xid(self, handle: Any, xid: int) -> None:
        nvml = self._nvml_module
        try:
            uuid = text(nvml.nvmlDeviceGetUUID(handle))
        except Exception as exc:
            self._count_error("nvmlDeviceGetUUID", exc)
            uuid = ""
        label = xid_label(xid)
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
