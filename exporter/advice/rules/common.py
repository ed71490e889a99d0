"""What several rules share: how many sequences fit, the engine's batch limit."""

from __future__ import annotations

import math

from ..readings import Window

MAX_SEQS = 1024  # the largest max_num_seqs any rule suggests (as `plan` caps it)
KV_MARGIN = 0.95  # of the KV cache a full batch may plan to fill


def seqs_that_fit(capacity_tokens: float, context_tokens: float) -> int:
    """Sequences of `context_tokens` whose KV fits in `capacity_tokens`, rounded down to a
    multiple of 8 from 16 on (as `plan` rounds), at least 1, at most MAX_SEQS."""
    fit = int(capacity_tokens * KV_MARGIN // max(context_tokens, 1.0))
    if fit >= 16:
        fit -= fit % 8
    return max(1, min(fit, MAX_SEQS))


def round_up_8(n: float) -> int:
    return int(math.ceil(n / 8.0) * 8)


def ranks(w: Window) -> int:
    """Data-parallel ranks: running and waiting are summed over them, limits are per rank."""
    dp = w.setting("data_parallel_size")
    return int(dp) if dp and dp >= 1 else 1


def batch_limit(w: Window) -> float | None:
    """max_num_seqs over every rank of the model (None: the engine does not report it)."""
    seqs = w.setting("max_num_seqs")
    return seqs * ranks(w) if seqs else None


def peak_demand(w: Window) -> float:
    """The most requests the engine held at once (running + waiting) in the window."""
    return max(r.running + r.waiting for r in w.readings)


def preempting(w: Window, ratio: float) -> bool:
    finished = w.finished()
    preempted = w.delta("vllm_preemptions_total")
    return preempted > 0 and preempted >= ratio * max(finished, 1.0)
