"""Per-process metric shards: what a vLLM front-end process writes, for the metrics process to read.

vLLM scales its front end over several processes (`--api-server-count`, data-parallel ranks),
each with its own stat logger, and the process that renders /metrics must not share a GIL with
any of them. So every process that produces engine metrics writes them into its own *shard*, and
one metrics process (metrics_process.py) reads every shard of the server, aggregates and renders.

A shard is two files in the server's shard directory (on /dev/shm where it exists):
  <role>-<pid>.shard   a sparse, memory-mapped array of float64 slots; slots 0..7 are the header
                       (format version, pid, process start time); each series owns fixed slots
  <role>-<pid>.index   one JSON line per series, appended when the series is first bound:
                       [first slot, family name, [label values], histogram bounds or null]
Only the owning process writes either file. A counter or gauge is one slot; a histogram is one
slot per bucket (non-cumulative, the last one +Inf) and one for the sum, so a reader that adds
the buckets up always gets a count that agrees with them.

The hot path writes a slot through a memoryview (`mv[i] += v`): no lock, no system call, no
allocation. A series has one writing thread (the stat logger's event loop, or one side thread);
families that several threads write (errors) take a lock in their children.
"""

from __future__ import annotations

import json
import mmap
import os
import tempfile
import threading
from bisect import bisect_left
from pathlib import Path
from typing import Any, Iterable

from .metrics import FAMILIES, FamilySpec, attr_name

FORMAT_VERSION = 1.0
HEADER_SLOTS = 8  # version, pid, start time, reserved
CAPACITY_SLOTS = 1 << 20  # 8 MiB of address space; sparse, so only touched pages use memory
SHARD_SUFFIX = ".shard"
INDEX_SUFFIX = ".index"


def default_shard_root() -> str:
    """/dev/shm where it exists (memory, never written back to disk), else the temp dir."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) \
        else tempfile.gettempdir()


def process_start_time(pid: int) -> float:
    """The process's start time in clock ticks since boot (0 where /proc cannot tell).
    With the pid it names one process: a pid reused later has another start time."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0.0
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(b")") + 2:].split()
    return float(fields[19])  # field 22 of proc(5), counted from field 3


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class ShardWriter:
    """The shard this process writes. Slots are handed out once per series and never freed: a
    removed series (an evicted LoRA adapter) is written as removed in the index."""

    def __init__(self, directory: str | os.PathLike, role: str = "frontend"):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.pid = os.getpid()
        stem = self.directory / f"{role}-{self.pid}"
        self.path = stem.with_suffix(SHARD_SUFFIX)
        self.index_path = stem.with_suffix(INDEX_SUFFIX)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, CAPACITY_SLOTS * 8)
            self._map = mmap.mmap(fd, CAPACITY_SLOTS * 8)
        finally:
            os.close(fd)
        self.values = memoryview(self._map).cast("d")
        self.values[1] = float(self.pid)
        self.values[2] = process_start_time(self.pid)
        self.values[0] = FORMAT_VERSION  # last: a reader trusts the header once this is set
        self._index = open(self.index_path, "a", encoding="utf-8")
        self._next = HEADER_SLOTS
        self._lock = threading.Lock()  # binding (the cold path) may happen on several threads
        self.overflowed = 0

    def allocate(self, family: str, labels: tuple[str, ...], size: int = 1,
                 bounds: tuple[float, ...] | None = None) -> tuple[memoryview, int]:
        """(values, first slot) for one series, announced in the index. With the shard full,
        private memory that no reader sees (the series reads absent; `overflowed` counts it)."""
        with self._lock:
            if self._next + size > CAPACITY_SLOTS:
                self.overflowed += 1
                return memoryview(bytearray(size * 8)).cast("d"), 0
            slot, self._next = self._next, self._next + size
            self._index.write(json.dumps([slot, family, list(labels),
                                          list(bounds) if bounds is not None else None]) + "\n")
            self._index.flush()
            return self.values, slot

    def announce_removed(self, slot: int) -> None:
        """The series at `slot` is gone: readers drop it (its counts stay in no total)."""
        with self._lock:
            self._index.write(json.dumps([slot, None, None, None]) + "\n")
            self._index.flush()

    def close(self) -> None:
        """Files stay: a finished process's counters still count in the server's totals."""
        try:
            self._index.close()
        except OSError:
            pass


# --- families and children, with the interface of prometheus-client's -----------------------

class CounterChild:
    __slots__ = ("_v", "_i")

    def __init__(self, values: memoryview, slot: int):
        self._v, self._i = values, slot

    def inc(self, amount: float = 1.0) -> None:
        self._v[self._i] += amount

    def get(self) -> float:
        return self._v[self._i]


class LockedCounterChild(CounterChild):
    __slots__ = ("_lock",)

    def __init__(self, values: memoryview, slot: int):
        super().__init__(values, slot)
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0) -> None:
        with self._lock:
            self._v[self._i] += amount


class GaugeChild(CounterChild):
    __slots__ = ()

    def set(self, value: float) -> None:
        self._v[self._i] = value

    def dec(self, amount: float = 1.0) -> None:
        self._v[self._i] -= amount


class HistogramChild:
    __slots__ = ("_v", "_base", "_bounds", "_sum")

    def __init__(self, values: memoryview, slot: int, bounds: tuple[float, ...]):
        self._v, self._base, self._bounds = values, slot, bounds
        self._sum = slot + len(bounds) + 1

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le = "<=").
        v = self._v
        v[self._base + bisect_left(self._bounds, value)] += 1
        v[self._sum] += value


class ShardFamily:
    """One family in this process's shard; `labels(...)` binds a child (the cold path)."""

    def __init__(self, writer: ShardWriter, spec: FamilySpec,
                 bounds: tuple[float, ...] | None = None, locked: bool = False):
        self.writer = writer
        self.spec = spec
        self.name = spec.name
        self.bounds = bounds
        self._locked = locked
        self._children: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: Any):
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is not None:
            return child
        if len(key) != len(self.spec.labels):
            raise ValueError(f"{self.name}: expected labels {self.spec.labels}, got {key}")
        if self.spec.kind == "histogram":
            assert self.bounds is not None
            values_view, slot = self.writer.allocate(self.name, key, len(self.bounds) + 2,
                                                     self.bounds)
            child = HistogramChild(values_view, slot, self.bounds)
        else:
            values_view, slot = self.writer.allocate(self.name, key)
            if self.spec.kind == "counter":
                child = (LockedCounterChild if self._locked else CounterChild)(values_view, slot)
            else:
                child = GaugeChild(values_view, slot)
        self._children[key] = child
        return child

    def remove(self, *values: Any) -> None:
        child = self._children.pop(tuple(str(v) for v in values), None)
        if child is not None:
            self.writer.announce_removed(child._base if isinstance(child, HistogramChild)
                                         else child._i)

    # Label-less families are used directly, as prometheus-client allows.
    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)


LOCKED_FAMILIES = ("vllm_exporter_errors_total", "vllm_exporter_label_overflow_total")


class ShardMetrics:
    """Every shard family (FamilySpec.where == "shard") bound to one writer. Attribute names
    are the family names without `vllm_` / `vllm_exporter_` and without a counter's `_total`,
    as on EngineMetrics, so the stat logger reads the same either way."""

    def __init__(self, writer: ShardWriter, buckets: dict[str, tuple[float, ...]],
                 families: Iterable[FamilySpec] = FAMILIES):
        self.writer = writer
        for spec in families:
            if spec.where != "shard":
                continue
            bounds = None
            if spec.kind == "histogram":
                bounds = tuple(float(b) for b in buckets[spec.buckets_key])
            setattr(self, attr_name(spec), ShardFamily(writer, spec, bounds,
                                                       locked=spec.name in LOCKED_FAMILIES))
