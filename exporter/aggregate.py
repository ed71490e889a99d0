"""The metrics process's view of every shard: read, merge over processes, render as families.

Each vLLM front-end process (and the daemon, and the metrics process itself) writes its own
shard (shard.py). `ShardSet` maps them read-only and follows their indexes; `ShardCollector`
turns them into metric families on each scrape, merging a family over processes by its
FamilySpec.merge rule:

  sum       counters and histograms: added over every shard, those of exited processes
            included, so a total never goes backwards when a process ends or restarts.
  sum_live  gauges that each process holds a part of (unfinished requests): added over the
            processes still running.
  latest    engine-state gauges (running, waiting, KV usage, LoRA): vLLM sends each engine
            step's scheduler statistics to exactly one front end, so for each (model, engine)
            the values come from the shard whose last scheduler step for that engine is newest.
  max       per-engine constants (capacity, config) and the last-step timestamp.
  state     the engine's lifecycle state: the most severe state a running process reports
            (dead > stopping > starting > serving), or, with none running, any shard's.

Idle engines: vLLM emits no statistics while an engine rank has no request, so its gauges keep
the last step's values. `mark_idle()` (called by the runtime's side loop) makes the collector
render that rank's running/waiting/KV/LoRA gauges as 0 until its next step.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

from prometheus_client.core import Metric

from .exposition import RendersItself, bound_texts, header, label_text, num
from .families import FamilySpec, metric_family
from .metrics import ENGINE_STATES, FAMILIES, STATE_SEVERITY
from .shard import INDEX_SUFFIX, SHARD_SUFFIX, pid_alive, process_start_time

log = logging.getLogger("exporter.aggregate")

LAST_STEP = "vllm_engine_last_step_timestamp_seconds"
IDLE_GAUGES = ("vllm_requests_running", "vllm_requests_waiting", "vllm_kv_cache_usage_ratio",
               "vllm_lora_requests_running", "vllm_lora_requests_waiting")
LIVENESS_CHECK_SECONDS = 0.5


class Series:
    __slots__ = ("slot", "labels", "bounds")

    def __init__(self, slot: int, labels: tuple[str, ...], bounds: tuple[float, ...] | None):
        self.slot, self.labels, self.bounds = slot, labels, bounds


class Shard:
    """One process's shard, mapped read-only; its index is followed as it grows."""

    def __init__(self, path: Path):
        self.path = path
        self.role, _, pid = path.stem.rpartition("-")
        self.pid = int(pid)
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.values = memoryview(self._map).cast("d")
        self.start_time = self.values[2]
        self.index_path = path.with_suffix(INDEX_SUFFIX)
        self._index_offset = 0
        self._partial = b""
        self.families: dict[str, dict[int, Series]] = {}
        self._slot_family: dict[int, str] = {}
        self.live = True

    def follow_index(self) -> None:
        try:
            with open(self.index_path, "rb") as f:
                f.seek(self._index_offset)
                chunk = f.read()
        except OSError:
            return
        if not chunk:
            return
        self._index_offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()  # an incomplete last line waits for the rest
        for line in lines:
            if not line:
                continue
            slot, family, labels, bounds = json.loads(line)
            if family is None:  # a removed series
                name = self._slot_family.pop(slot, None)
                if name is not None:
                    self.families[name].pop(slot, None)
                continue
            self._slot_family[slot] = family
            self.families.setdefault(family, {})[slot] = Series(
                slot, tuple(labels), tuple(bounds) if bounds is not None else None)

    def check_live(self) -> bool:
        self.live = process_start_time(self.pid) == self.start_time and pid_alive(self.pid)
        return self.live

    def series(self, family: str) -> Iterable[Series]:
        found = self.families.get(family)
        return found.values() if found else ()


class ShardSet:
    """Every shard in one directory, found as they appear."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.shards: dict[Path, Shard] = {}
        self._checked_at = 0.0
        self._lock = threading.Lock()  # scrapes, the side loop and the alerts all refresh

    def refresh(self) -> list[Shard]:
        with self._lock:
            return self._refresh()

    def _refresh(self) -> list[Shard]:
        try:
            names = os.listdir(self.directory)
        except OSError:
            names = []
        for name in names:
            if not name.endswith(SHARD_SUFFIX):
                continue
            path = self.directory / name
            if path not in self.shards:
                try:
                    shard = Shard(path)
                except (OSError, ValueError):
                    continue  # still being created: its header is not written yet
                if shard.values[0] == 0:
                    continue
                self.shards[path] = shard
        now = time.monotonic()
        check = now - self._checked_at >= LIVENESS_CHECK_SECONDS
        if check:
            self._checked_at = now
        for shard in self.shards.values():
            shard.follow_index()
            if check and shard.live:
                shard.check_live()  # once exited, a process stays exited
        return list(self.shards.values())

    def processes(self) -> dict[tuple[str, str], int]:
        counts: dict[tuple[str, str], int] = {}
        for shard in self.shards.values():
            key = (shard.role, "live" if shard.live else "exited")
            counts[key] = counts.get(key, 0) + 1
        return counts


class ShardCollector(RendersItself):
    """A prometheus-client collector over a ShardSet: the shard families, merged."""

    def __init__(self, shards: ShardSet, families: Iterable[FamilySpec] = FAMILIES):
        super().__init__()
        self.shards = shards
        self.specs = [f for f in families if f.where == "shard"]
        # (model, engine) -> the last-step timestamp at which it was found idle
        self._idle: dict[tuple[str, str], float] = {}

    # --- merged values, also used by the runtime's side loop -----------------------------------
    def engine_stamps(self, shards: list[Shard]) -> dict[tuple[str, str], tuple[float, Shard]]:
        """(model, engine) -> (newest last-step time, the shard that saw it)."""
        newest: dict[tuple[str, str], tuple[float, Shard]] = {}
        for shard in shards:
            values = shard.values
            for s in shard.series(LAST_STEP):
                stamp = values[s.slot]
                key = s.labels[:2]
                if stamp > newest.get(key, (-1.0, None))[0]:
                    newest[key] = (stamp, shard)
        return newest

    def gauge_values(self, family: str, shards: list[Shard] | None = None,
                     stamps: dict[tuple[str, str], tuple[float, Shard]] | None = None
                     ) -> dict[tuple[str, ...], float]:
        """One merged gauge or counter family as {labels: value} (no idle override);
        `stamps` (engine_stamps of the same shards) saves recomputing them."""
        spec = next(s for s in self.specs if s.name == family)
        shards = self.shards.refresh() if shards is None else shards
        if spec.merge == "latest":
            if stamps is None:
                stamps = self.engine_stamps(shards)
            return self._latest(spec, shards, stamps, idle=False)
        return self._scalar(spec, shards)

    def engine_state(self, shards: list[Shard] | None = None) -> dict[str, str]:
        """model -> its merged lifecycle state."""
        shards = self.shards.refresh() if shards is None else shards
        live = [s for s in shards if s.live]
        states = self._states(live) or self._states(shards)
        return states

    def _states(self, shards: list[Shard]) -> dict[str, str]:
        out: dict[str, str] = {}
        for shard in shards:
            values = shard.values
            for s in shard.series("vllm_engine_state"):
                if values[s.slot] != 1:
                    continue
                model, state = s.labels
                if STATE_SEVERITY.get(state, 0) >= STATE_SEVERITY.get(out.get(model, ""), -1):
                    out[model] = state
        return out

    def mark_idle(self, key: tuple[str, str], last_step: float) -> None:
        self._idle[key] = last_step

    def idle_engines(self) -> dict[tuple[str, str], float]:
        return dict(self._idle)

    # --- collection ----------------------------------------------------------------------------
    def describe(self) -> list[Metric]:
        """Every shard family by name (series come at collect), so that a registry restricted
        to some names (the alert evaluator's) still asks this collector."""
        out: list[Metric] = []
        for spec in self.specs:
            out.append(self._family(spec, {}))
        return out

    def merged(self) -> list[tuple[FamilySpec, dict]]:
        """Every shard family merged over processes: (spec, {labels: value}), a histogram's
        value being (bounds, per-bucket counts, sum)."""
        shards = self.shards.refresh()
        stamps = self.engine_stamps(shards)
        # An idle mark holds until a newer step arrives for that engine.
        for key, marked_at in list(self._idle.items()):
            if stamps.get(key, (0.0, None))[0] > marked_at:
                self._idle.pop(key, None)
        states = self.engine_state(shards)
        out = []
        for spec in self.specs:
            merge = spec.merge
            if spec.kind == "histogram":
                values = self._histograms(spec, shards)
            elif merge == "state":
                values = self._state_values(spec, states)
            elif merge == "latest":
                values = self._latest(spec, shards, stamps, idle=True)
            else:
                values = self._scalar(spec, shards)
            out.append((spec, values))
        return out

    def collect(self) -> Iterator[Metric]:
        if self.rendering_apart:
            return  # the metrics port renders these itself (render()), faster
        for spec, values in self.merged():
            yield self._family(spec, values)  # no series yet: HELP and TYPE only

    def _family(self, spec: FamilySpec, values: dict) -> Metric:
        family = metric_family(spec)
        if spec.kind == "histogram":
            for labels, (bounds, counts, total) in values.items():
                cumulative, running = [], 0.0
                for bound, count in zip(bound_texts(bounds), counts):
                    running += count
                    cumulative.append((bound, running))
                family.add_metric(list(labels), cumulative, total)
            return family
        for labels, value in values.items():
            family.add_metric(list(labels), value)
        return family

    # --- the metrics port's fast path ------------------------------------------------------
    def render(self, openmetrics: bool) -> str:
        """The shard families as exposition text (Prometheus text 0.0.4 or OpenMetrics,
        without `# EOF`): what prometheus-client's encoders print for `collect()`, written
        straight from the merged values (the encoders cost about 5 us a line)."""
        lines: list[str] = []
        add = lines.append
        for spec, values in self.merged():
            name = spec.name
            kind = "gauge" if spec.kind == "info" else spec.kind
            add(header(spec.client_name if kind == "counter" else name, kind, spec.help,
                       openmetrics))
            names = spec.labels
            if spec.kind == "histogram":
                for labels, (bounds, counts, total) in values.items():
                    pairs = label_text(names, labels)
                    prefix = f"{name}_bucket{{{pairs}{',' if pairs else ''}le=\""
                    running = 0.0
                    for bound, count in zip(bound_texts(bounds), counts):
                        running += count  # a count: always finite, so repr() is num()
                        add(f'{prefix}{bound}"}} {running!r}\n')
                    braces = f"{{{pairs}}}" if pairs else ""
                    add(f"{name}_count{braces} {num(running)}\n{name}_sum{braces} {num(total)}\n")
                continue
            sample = name if spec.kind != "counter" else spec.client_name + "_total"
            for labels, value in values.items():
                pairs = label_text(names, labels)
                add(f"{sample}{{{pairs}}} {num(value)}\n" if pairs else f"{sample} {num(value)}\n")
        return "".join(lines)

    def _scalar(self, spec: FamilySpec, shards: list[Shard]) -> dict[tuple[str, ...], float]:
        merge = spec.merge
        out: dict[tuple[str, ...], float] = {}
        for shard in shards:
            if merge == "sum_live" and not shard.live:
                continue
            values = shard.values
            for s in shard.series(spec.name):
                value = values[s.slot]
                if merge == "max":
                    if value > out.get(s.labels, float("-inf")):
                        out[s.labels] = value
                else:
                    out[s.labels] = out.get(s.labels, 0.0) + value
        return out

    def _latest(self, spec: FamilySpec, shards: list[Shard],
                stamps: dict[tuple[str, str], tuple[float, Shard]], idle: bool
                ) -> dict[tuple[str, ...], float]:
        out: dict[tuple[str, ...], float] = {}
        for shard in shards:
            values = shard.values
            for s in shard.series(spec.name):
                engine = s.labels[:2]
                winner = stamps.get(engine)
                if idle and engine in self._idle:
                    out[s.labels] = 0.0
                elif winner is None or winner[1] is shard:
                    out[s.labels] = values[s.slot]
                else:
                    # listed by another process only: 0 unless the winner lists it
                    out.setdefault(s.labels, 0.0)
        return out

    @staticmethod
    def _state_values(spec: FamilySpec, states: dict[str, str]) -> dict[tuple[str, ...], float]:
        out: dict[tuple[str, ...], float] = {}
        for model, state in sorted(states.items()):
            if spec.name == "vllm_engine_up":
                out[(model,)] = 1.0 if state == "serving" else 0.0
            else:
                for name in ENGINE_STATES:
                    out[(model, name)] = 1.0 if name == state else 0.0
        return out

    @staticmethod
    def _histograms(spec: FamilySpec, shards: list[Shard]) -> dict[tuple[str, ...], tuple]:
        merged: dict[tuple[str, ...], tuple[tuple[float, ...], list[float], float]] = {}
        for shard in shards:
            values = shard.values
            for s in shard.series(spec.name):
                bounds = s.bounds or ()
                n = len(bounds) + 1
                counts = values[s.slot:s.slot + n].tolist()
                total = values[s.slot + n]
                entry = merged.get(s.labels)
                if entry is None:
                    merged[s.labels] = (bounds, counts, total)
                elif entry[0] == bounds:
                    merged[s.labels] = (bounds, [a + b for a, b in zip(entry[1], counts)],
                                        entry[2] + total)
                else:  # processes configured with other buckets: cannot be merged
                    log.warning("%s: shards disagree on bucket bounds; %s left out", spec.name,
                                shard.path.name)
        return merged
