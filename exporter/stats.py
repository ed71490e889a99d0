"""vLLM's per-step statistics -> metric updates. This is the hot path.

`StatsRecorder.record()` runs on vLLM's asyncio event loop once per engine step (from the stat
logger in plugin.py). It does a fixed amount of work per stat: every metric child it touches is
bound once per engine index up front, so a step costs attribute lookups and slot writes into this
process's shard (shard.py), never a label lookup, a lock, an allocation of label tuples, or I/O.
Lists in the stats (first tokens, inter-token gaps, finished requests) cost one histogram
observation per element, as they must.

This module reads vLLM's stats objects by attribute only and imports nothing from vLLM.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Callable, Iterable

from .slo import LatencyObjective, ObjectiveCounter

KNOWN_FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")
OTHER = "other"
DEFAULT_MAX_ENGINES = 64
DEFAULT_MAX_LORA_ADAPTERS = 64
# Distinct finish_reason objects remembered per engine (vLLM's enum has a handful of members;
# anything beyond this is still counted, as "other", just looked up each time).
MAX_REASON_KEYS = 32
# Bounded label values of the families vLLM splits by a fixed set of names (vLLM's own names;
# anything else vLLM may send later counts under "other").
WAITING_REASONS = ("capacity", "deferred")
KV_FETCH_STAGES = ("waiting_to_start", "in_progress", "completed_waiting")
ADMISSION_REASONS = ("max_num_queued_reqs", "max_num_queued_tokens")
PROMPT_SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")
# vLLM's CacheHitSource values (0.32+): where cached prompt tokens' KV came from. A tier a later
# vLLM adds counts under OTHER.
CACHE_TIERS = ("device", "host", "p2p", "disk", "external_unspecified")
# record_sleep_state(sleep=1, level) -> the state; awake is sleep=0.
SLEEP_STATES = ("awake", "kv_cache_released", "weights_offloaded", "discard_all")
SLEEP_LEVELS = {0: "kv_cache_released", 1: "weights_offloaded", 2: "discard_all"}
# The output-health canary (advice/canary.py) sends `X-Request-Id: <header prefix><n>`; vLLM's
# completions endpoint makes that the request id `cmpl-<header>-<prompt index>`, which
# FinishedRequestStats.request_id carries (0.26 .. 0.34). Such requests are left out of the
# per-request families (_record_finished); the step-level ones cannot tell them apart.
CANARY_REQUEST_HEADER_PREFIX = "vllm-exporter-canary-"
CANARY_REQUEST_ID_PREFIX = "cmpl-" + CANARY_REQUEST_HEADER_PREFIX
# Draft positions that get their own `position` label (num_speculative_tokens is rarely above
# 10); later positions count under position="other".
MAX_SPEC_POSITIONS = 32


class _EngineChildren:
    """The metric children of one (model, engine index), bound once."""

    __slots__ = (
        "running", "waiting", "kv_usage", "prompt_tokens", "generation_tokens",
        "prefix_queries", "prefix_hits", "preemptions", "steps", "last_step",
        "ttft", "itl", "tpot", "e2e", "queue", "prefill", "decode", "prompt_len", "gen_len",
        "finished", "finished_other", "blocks", "block_size", "capacity_tokens",
        "bytes_per_token", "capacity_bytes", "slo_ttft", "slo_tpot", "slo_e2e",
        "label", "adapters", "adapters_listed",
        "waiting_capacity", "waiting_deferred", "prompt_computed", "prompt_local_hit",
        "prompt_external", "prefill_kv_computed", "sleep",
        # Bound on first use, or up front when the engine's config says the feature is on
        # (StatsRecorder.expect): None until then, so the family stays absent without it.
        "max_concurrency", "spec", "residency", "perf", "kv_fetch", "external",
    )

    def __init__(self, m: Any, model: str, engine: str,
                 objectives: Iterable[LatencyObjective] = ()):
        labels = (model, engine)
        self.label = engine
        # LoRA adapter label -> (running, waiting) children, bound on first use; and the labels
        # the last step listed (so that an adapter vLLM stops listing is set to 0).
        self.adapters: dict[str, tuple[Any, Any]] = {}
        self.adapters_listed: frozenset[str] = frozenset()
        self.running = m.requests_running.labels(*labels)
        self.waiting = m.requests_waiting.labels(*labels)
        self.kv_usage = m.kv_cache_usage_ratio.labels(*labels)
        self.prompt_tokens = m.prompt_tokens.labels(*labels)
        self.generation_tokens = m.generation_tokens.labels(*labels)
        self.prefix_queries = m.prefix_cache_queries.labels(*labels)
        self.prefix_hits = m.prefix_cache_hits.labels(*labels)
        self.preemptions = m.preemptions.labels(*labels)
        self.steps = m.engine_steps.labels(*labels)
        self.last_step = m.engine_last_step_timestamp_seconds.labels(*labels)
        self.ttft = m.time_to_first_token_seconds.labels(*labels)
        self.itl = m.inter_token_latency_seconds.labels(*labels)
        self.tpot = m.time_per_output_token_seconds.labels(*labels)
        self.e2e = m.e2e_request_latency_seconds.labels(*labels)
        self.queue = m.request_queue_time_seconds.labels(*labels)
        self.prefill = m.request_prefill_time_seconds.labels(*labels)
        self.decode = m.request_decode_time_seconds.labels(*labels)
        self.prompt_len = m.request_prompt_tokens.labels(*labels)
        self.gen_len = m.request_generation_tokens.labels(*labels)
        # Keyed by whatever object vLLM hands us as finish_reason (an IntEnum); filled lazily
        # from the bounded set of known names, anything else counts as "other".
        self.finished: dict[Any, Any] = {}
        for reason in KNOWN_FINISH_REASONS:
            self.finished[reason] = m.requests_finished.labels(model, engine, reason)
        self.finished_other = m.requests_finished.labels(model, engine, OTHER)
        self.blocks = m.kv_cache_blocks.labels(*labels)
        self.block_size = m.kv_cache_block_size_tokens.labels(*labels)
        self.capacity_tokens = m.kv_cache_capacity_tokens.labels(*labels)
        self.bytes_per_token = m.kv_cache_bytes_per_token.labels(*labels)
        self.capacity_bytes = m.kv_cache_capacity_bytes.labels(*labels)
        self.waiting_capacity, self.waiting_deferred = (
            m.requests_waiting_by_reason.labels(model, engine, reason)
            for reason in WAITING_REASONS)
        self.prompt_computed, self.prompt_local_hit, self.prompt_external = (
            m.prompt_tokens_by_source.labels(model, engine, source) for source in PROMPT_SOURCES)
        self.prefill_kv_computed = m.request_prefill_kv_computed_tokens.labels(*labels)
        # state -> child; vLLM's engine starts awake.
        self.sleep = {state: m.engine_sleep_state.labels(model, engine, state)
                      for state in SLEEP_STATES}
        self.sleep["awake"].set(1)
        self.max_concurrency: Any = None
        self.spec: _SpecChildren | None = None
        self.residency: tuple[Any, Any, Any] | None = None  # lifetime, idle, reuse gap
        self.perf: tuple[Any, Any, Any] | None = None  # flops, read bytes, write bytes
        self.kv_fetch: tuple[Any, ...] | None = None  # per KV_FETCH_STAGES, then "other"
        # queries, hits, the device tier's hits, {CacheHitSource: hits child}
        self.external: tuple[Any, Any, Any, dict] | None = None
        objectives = tuple(objectives)

        def counters(signal: str) -> tuple[ObjectiveCounter, ...]:
            return tuple(ObjectiveCounter(m.slo_requests, model, engine, o)
                         for o in objectives if o.signal == signal)

        self.slo_ttft = counters("time_to_first_token")
        self.slo_tpot = counters("time_per_output_token")
        self.slo_e2e = counters("e2e_request_latency")


class _SpecChildren:
    """Speculative-decoding counters of one engine; `positions[i]` counts draft position i."""

    __slots__ = ("drafts", "draft_tokens", "accepted", "positions", "other_position")

    def __init__(self, m: Any, model: str, engine: str, positions: int):
        labels = (model, engine)
        self.drafts = m.spec_decode_drafts.labels(*labels)
        self.draft_tokens = m.spec_decode_draft_tokens.labels(*labels)
        self.accepted = m.spec_decode_accepted_tokens.labels(*labels)
        family = m.spec_decode_accepted_tokens_per_position
        self.positions = [family.labels(model, engine, str(i))
                          for i in range(min(positions, MAX_SPEC_POSITIONS))]
        self.other_position = (family.labels(model, engine, OTHER)
                               if positions > MAX_SPEC_POSITIONS else None)


class AdapterLabels:
    """The `adapter` label's cardinality cap: at most `cap` LoRA adapter names at a time.

    A name is *listed* while some engine's last step listed it (it had requests). When the
    table is full, a new name takes the slot of the name unlisted for longest (`evict` is
    called so its series go); when every name in the table is listed, the new one folds into
    "other" and the overflow counter counts it, once per step it appears in.
    """

    def __init__(self, cap: int, overflow: Any, evict: Callable[[str], None]):
        self.cap = cap
        self._overflow = overflow
        self._evict = evict
        self._listed_on: dict[str, int] = {}  # name -> engines whose last step listed it
        self._unlisted: OrderedDict[str, None] = OrderedDict()  # oldest first

    def label(self, name: str) -> str:
        if name in self._listed_on:
            self._unlisted.pop(name, None)  # listed again this step: not to be evicted now
            return name
        if len(self._listed_on) >= self.cap:
            if not self._unlisted:
                self._overflow.inc()
                return OTHER
            oldest, _ = self._unlisted.popitem(last=False)
            del self._listed_on[oldest]
            self._evict(oldest)
        self._listed_on[name] = 0
        return name

    def listed(self, label: str) -> None:
        if label != OTHER:
            self._listed_on[label] += 1
            self._unlisted.pop(label, None)

    def unlisted(self, label: str) -> None:
        if label != OTHER and label in self._listed_on:
            self._listed_on[label] -= 1
            if not self._listed_on[label]:
                self._unlisted[label] = None

    def __len__(self) -> int:
        return len(self._listed_on)


class StatsRecorder:
    """Applies SchedulerStats / IterationStats to the engine metric families (`metrics`: a
    shard.ShardMetrics, the families of this process's shard)."""

    def __init__(self, metrics: Any, model: str, engine_indexes: Iterable[int] = (0,),
                 reason_name: Callable[[Any], str] = str,
                 objectives: Iterable[LatencyObjective] = (),
                 wall_clock: Callable[[], float] = time.time,
                 max_engines: int = DEFAULT_MAX_ENGINES,
                 max_lora_adapters: int = DEFAULT_MAX_LORA_ADAPTERS):
        self.metrics = metrics
        self.model = model
        self._objectives = tuple(objectives)
        self._reason_name = reason_name
        self._wall_clock = wall_clock
        # Cardinality cap: the first `max_engines` engine indexes get their own `engine` label;
        # any further index shares one set of children labelled engine="other" (bound on first
        # use) and each such update counts in vllm_exporter_label_overflow_total{label="engine"}.
        # Overflowing indexes are not remembered, so this dict never exceeds max_engines entries.
        self._max_engines = max_engines
        self._engines: dict[int, _EngineChildren] = {}
        self._other_engine: _EngineChildren | None = None
        self._engine_overflow = metrics.label_overflow.labels("engine")
        self.adapters = AdapterLabels(max_lora_adapters, metrics.label_overflow.labels("adapter"),
                                      self._remove_adapter)
        # Per model, not per engine: the front end aborts and rejects before any engine rank.
        self._aborted_duration = metrics.aborted_request_duration_seconds.labels(model)
        self._admission: dict[str, Any] = {}  # reason -> counter, once vLLM can reject
        self._features: dict[str, Any] = {}  # what the engine's config switched on (expect)
        for index in engine_indexes:
            self._bind(index)

    def _bind(self, engine_idx: int) -> _EngineChildren:
        """Children for an engine index not seen yet (the cold path of record())."""
        if len(self._engines) >= self._max_engines:
            self._engine_overflow.inc()
            if self._other_engine is None:
                self._other_engine = _EngineChildren(self.metrics, self.model, OTHER,
                                                     self._objectives)
                self._bind_expected(self._other_engine)
            return self._other_engine
        children = _EngineChildren(self.metrics, self.model, str(engine_idx), self._objectives)
        self._engines[engine_idx] = children
        self._bind_expected(children)
        return children

    def _all_engines(self) -> list[_EngineChildren]:
        engines = list(self._engines.values())
        if self._other_engine is not None:
            engines.append(self._other_engine)
        return engines

    def record(self, scheduler_stats: Any, iteration_stats: Any, engine_idx: int = 0) -> None:
        e = self._engines.get(engine_idx) or self._bind(engine_idx)
        if scheduler_stats is not None:
            # vLLM attaches an engine step's scheduler statistics to the outputs of exactly one
            # front end (the others get iteration statistics only): counting steps here counts
            # each step once, whatever the number of API-server processes.
            e.steps.inc()
            e.last_step.set(self._wall_clock())
            running = scheduler_stats.num_running_reqs
            waiting = scheduler_stats.num_waiting_reqs + getattr(
                scheduler_stats, "num_skipped_waiting_reqs", 0)
            kv_usage = scheduler_stats.kv_cache_usage
            e.running.set(running)
            e.waiting.set(waiting)
            e.kv_usage.set(kv_usage)
            # name -> request count, for adapters with requests; empty without LoRA.
            lora_running = getattr(scheduler_stats, "running_lora_adapters", None)
            lora_waiting = getattr(scheduler_stats, "waiting_lora_adapters", None)
            if lora_running or lora_waiting or e.adapters_listed:
                self._record_adapters(e, lora_running or {}, lora_waiting or {})
            e.waiting_capacity.set(scheduler_stats.num_waiting_reqs)
            e.waiting_deferred.set(waiting - scheduler_stats.num_waiting_reqs)
            prefix = scheduler_stats.prefix_cache_stats
            if prefix is not None:
                e.prefix_queries.inc(prefix.queries)
                e.prefix_hits.inc(prefix.hits)
            # Optional statistics (a feature, a KV connector, a newer vLLM): None or empty
            # unless present, and then one branch each.
            external = getattr(scheduler_stats, "connector_prefix_cache_stats", None)
            if external is not None:
                queries, hits, _, tiers = e.external or self._bind_external(e)
                queries.inc(external.queries)
                hits.inc(external.hits)
                for tier, tokens in (getattr(external, "hits_by_source", None) or {}).items():
                    (tiers.get(tier) or self._bind_tier(e, tier)).inc(tokens)
            if e.external is not None and prefix is not None:  # the device tier, as vLLM
                e.external[2].inc(prefix.hits)
            spec = getattr(scheduler_stats, "spec_decoding_stats", None)
            if spec is not None:
                self._record_spec(e, spec)
            # vLLM 0.32+ sends the stages on every engine (all 0 without a KV connector): the
            # family is bound only for a KV consumer (expect), and read only there.
            if e.kv_fetch is not None:
                self._record_kv_fetch(
                    e, getattr(scheduler_stats, "num_kv_fetch_reqs_by_stage", None) or {})
            evictions = getattr(scheduler_stats, "kv_cache_eviction_events", None)
            if evictions:
                self._record_evictions(e, evictions)
            perf = getattr(scheduler_stats, "perf_stats", None)
            if perf is not None:
                flops, read, written = e.perf or self._bind_perf(e)
                flops.inc(perf.num_flops_per_gpu)
                read.inc(perf.num_read_bytes_per_gpu)
                written.inc(perf.num_write_bytes_per_gpu)

        if iteration_stats is None:
            return
        e.prompt_tokens.inc(iteration_stats.num_prompt_tokens)
        sources = getattr(iteration_stats, "prompt_token_stats", None)
        if sources is not None:
            e.prompt_computed.inc(sources.computed)
            e.prompt_local_hit.inc(sources.local_cache_hit)
            e.prompt_external.inc(sources.external_kv_transfer)
        e.generation_tokens.inc(iteration_stats.num_generation_tokens)
        e.preemptions.inc(iteration_stats.num_preempted_reqs)
        for value in iteration_stats.time_to_first_tokens_iter:
            e.ttft.observe(value)
            for objective in e.slo_ttft:
                objective.observe(value)
        for value in iteration_stats.inter_token_latencies_iter:
            e.itl.observe(value)
        for request in iteration_stats.finished_requests:
            self._record_finished(e, request)

    def _record_adapters(self, e: _EngineChildren, running: dict, waiting: dict) -> None:
        """Per-adapter gauges: O(adapters vLLM lists this step), bounded by max_loras."""
        counts: dict[str, list[int]] = {}
        for slot, by_name in ((0, running), (1, waiting)):
            for name, n in by_name.items():
                counts.setdefault(self.adapters.label(name), [0, 0])[slot] += n
        for label in e.adapters_listed - counts.keys():
            children = e.adapters.get(label)
            if children is not None:
                children[0].set(0)
                children[1].set(0)
            self.adapters.unlisted(label)
        for label, (n_running, n_waiting) in counts.items():
            children = e.adapters.get(label)
            if children is None:
                children = e.adapters[label] = (
                    self.metrics.lora_requests_running.labels(self.model, e.label, label),
                    self.metrics.lora_requests_waiting.labels(self.model, e.label, label))
            children[0].set(n_running)
            children[1].set(n_waiting)
            if label not in e.adapters_listed:
                self.adapters.listed(label)
        e.adapters_listed = frozenset(counts)

    def _remove_adapter(self, label: str) -> None:
        """An adapter's slot went to a newer one: its series go (the cold path)."""
        for e in self._all_engines():
            if e.adapters.pop(label, None) is not None:
                for family in (self.metrics.lora_requests_running,
                               self.metrics.lora_requests_waiting):
                    family.remove(self.model, e.label, label)

    def _record_finished(self, e: _EngineChildren, request: Any) -> None:
        # The canary's own requests are not user traffic: one attribute read and a prefix
        # check (no allocation). A vLLM without request_id here counts them like any other.
        request_id = getattr(request, "request_id", None)
        if request_id and request_id.startswith(CANARY_REQUEST_ID_PREFIX):
            return
        reason = request.finish_reason
        counter = e.finished.get(reason)
        if counter is None:
            name = self._reason_name(reason)
            counter = e.finished.get(name, e.finished_other)
            if len(e.finished) < MAX_REASON_KEYS:  # one entry per enum member vLLM defines
                e.finished[reason] = counter
        counter.inc()
        e.e2e.observe(request.e2e_latency)
        for objective in e.slo_e2e:
            objective.observe(request.e2e_latency)
        e.queue.observe(request.queued_time)
        e.prefill.observe(request.prefill_time)
        e.decode.observe(request.decode_time)
        e.prompt_len.observe(request.num_prompt_tokens)
        e.gen_len.observe(request.num_generation_tokens)
        # As vLLM counts it: a negative num_cached_tokens means unknown (none cached).
        e.prefill_kv_computed.observe(
            request.num_prompt_tokens - max(getattr(request, "num_cached_tokens", 0), 0))
        # vLLM reports 0 for requests with a single output token (no decode interval); such a
        # request has no time per output token, so it is not observed.
        if request.num_generation_tokens > 1:
            e.tpot.observe(request.mean_time_per_output_token)
            for objective in e.slo_tpot:
                objective.observe(request.mean_time_per_output_token)

    def set_capacity(self, geometry: dict[str, Any]) -> None:
        """KV-cache capacity gauges, per engine (every engine of one config has the same).

        `capacity_tokens` and `max_concurrency` are vLLM's own group-aware figures where it
        reports them (None otherwise): for a model that mixes KV-cache layer types (sliding
        window, Mamba) blocks x block size is not what a request can use.
        """
        pool_tokens = geometry["blocks"] * geometry["block_size"]
        tokens = geometry.get("capacity_tokens") or pool_tokens
        concurrency = geometry.get("max_concurrency")
        for e in self._all_engines():
            e.blocks.set(geometry["blocks"])
            e.block_size.set(geometry["block_size"])
            e.capacity_tokens.set(tokens)
            e.bytes_per_token.set(geometry["bytes_per_token"])
            e.capacity_bytes.set(pool_tokens * geometry["bytes_per_token"])
            if concurrency is not None:
                if e.max_concurrency is None:
                    e.max_concurrency = self.metrics.kv_cache_max_concurrency.labels(
                        self.model, e.label)
                e.max_concurrency.set(concurrency)

    # --- what vLLM reports besides record() (plugin.py calls these on vLLM's loop) ----------
    def record_client_aborts(self, seconds_in_engine: Iterable[float]) -> None:
        """Requests aborted at the front end: time each spent since its arrival."""
        for value in seconds_in_engine:
            self._aborted_duration.observe(value)

    def record_admission_rejection(self, reason: Any) -> None:
        counter = self._admission.get(reason)
        if counter is None:
            counter = self._bind_admission(str(reason) if reason in ADMISSION_REASONS
                                           else OTHER)
            if len(self._admission) < MAX_REASON_KEYS:
                self._admission[reason] = counter
        counter.inc()

    def set_sleep_state(self, sleep: int, level: int) -> None:
        """vLLM's record_sleep_state: sleep=0 is awake; else the sleep level (0, 1 or 2)."""
        state = "awake" if not sleep else SLEEP_LEVELS.get(level, OTHER)
        for e in self._all_engines():
            if state not in e.sleep:  # a level this release does not know (cold path)
                e.sleep[state] = self.metrics.engine_sleep_state.labels(self.model, e.label,
                                                                        state)
            for name, child in e.sleep.items():
                child.set(1 if name == state else 0)

    # --- features the engine's config switches on -----------------------------------------
    def expect(self, features: dict[str, Any]) -> None:
        """Bind, at 0, the families of the features the engine's config switched on, so that
        they exist (and rate() sees their first increase) before the first event.

        `features` (vllm_compat.engine_features): num_speculative_tokens, kv_cache_metrics,
        mfu_metrics, kv_consumer, kv_connector, admission_rejections.
        """
        self._features = dict(features)
        if features.get("admission_rejections"):
            for reason in ADMISSION_REASONS:
                self._admission[reason] = self._bind_admission(reason)
        for e in self._all_engines():
            self._bind_expected(e)

    def _bind_expected(self, e: _EngineChildren) -> None:
        f = self._features
        if f.get("num_speculative_tokens") and e.spec is None:
            e.spec = _SpecChildren(self.metrics, self.model, e.label,
                                   int(f["num_speculative_tokens"]))
        if f.get("kv_cache_metrics") and e.residency is None:
            self._bind_residency(e)
        if f.get("mfu_metrics") and e.perf is None:
            self._bind_perf(e)
        if f.get("kv_consumer") and e.kv_fetch is None:
            self._bind_kv_fetch(e)
        if f.get("kv_connector") and e.external is None:
            self._bind_external(e)

    def _bind_admission(self, reason: str) -> Any:
        return self.metrics.admission_rejections.labels(self.model, reason)

    def _bind_external(self, e: _EngineChildren) -> tuple[Any, Any, Any, dict]:
        by_tier = self.metrics.prefix_cache_hits_by_tier
        for tier in CACHE_TIERS:  # every tier at 0 from the start, as vLLM's own family
            by_tier.labels(self.model, e.label, tier)
        e.external = (self.metrics.external_prefix_cache_queries.labels(self.model, e.label),
                      self.metrics.external_prefix_cache_hits.labels(self.model, e.label),
                      by_tier.labels(self.model, e.label, "device"), {})
        return e.external

    def _bind_tier(self, e: _EngineChildren, tier: Any) -> Any:
        """The child of a CacheHitSource member, cached by the member (the cold path: once
        per tier and engine)."""
        name = getattr(tier, "value", tier)
        child = self.metrics.prefix_cache_hits_by_tier.labels(
            self.model, e.label, name if name in CACHE_TIERS else OTHER)
        if len(e.external[3]) < len(CACHE_TIERS) + 4:  # bounded, as vLLM's enum is
            e.external[3][tier] = child
        return child

    def _bind_residency(self, e: _EngineChildren) -> tuple[Any, Any, Any]:
        m = self.metrics
        e.residency = tuple(family.labels(self.model, e.label) for family in (
            m.kv_block_lifetime_seconds, m.kv_block_idle_before_evict_seconds,
            m.kv_block_reuse_gap_seconds))
        return e.residency

    def _bind_perf(self, e: _EngineChildren) -> tuple[Any, Any, Any]:
        m = self.metrics
        e.perf = tuple(family.labels(self.model, e.label) for family in (
            m.estimated_flops_per_gpu, m.estimated_read_bytes_per_gpu,
            m.estimated_write_bytes_per_gpu))
        return e.perf

    def _bind_kv_fetch(self, e: _EngineChildren) -> tuple[Any, ...]:
        family = self.metrics.requests_waiting_kv_fetch
        e.kv_fetch = tuple(family.labels(self.model, e.label, stage)
                           for stage in KV_FETCH_STAGES + (OTHER,))
        return e.kv_fetch

    # --- optional statistics (one call per step that carries them) ------------------------
    def _record_spec(self, e: _EngineChildren, spec: Any) -> None:
        per_position = spec.num_accepted_tokens_per_pos
        sd = e.spec
        if sd is None or (len(per_position) > len(sd.positions) and sd.other_position is None):
            # More positions than expected (cold path): the new ones get their children.
            sd = e.spec = _SpecChildren(self.metrics, self.model, e.label, len(per_position))
        sd.drafts.inc(spec.num_drafts)
        sd.draft_tokens.inc(spec.num_draft_tokens)
        sd.accepted.inc(spec.num_accepted_tokens)
        positions = sd.positions
        for i, accepted in enumerate(per_position):
            if i < MAX_SPEC_POSITIONS:
                positions[i].inc(accepted)
            else:
                sd.other_position.inc(accepted)

    def _record_kv_fetch(self, e: _EngineChildren, by_stage: dict) -> None:
        children = e.kv_fetch
        known = 0
        for stage, child in zip(KV_FETCH_STAGES, children):
            n = by_stage.get(stage, 0)
            child.set(n)
            known += n
        children[-1].set(sum(by_stage.values()) - known)

    def _record_evictions(self, e: _EngineChildren, events: list) -> None:
        lifetime, idle, reuse_gap = e.residency or self._bind_residency(e)
        for event in events:
            lifetime.observe(event.lifetime_seconds)
            idle.observe(event.idle_seconds)
            for gap in event.reuse_gaps_seconds:
                reuse_gap.observe(gap)
