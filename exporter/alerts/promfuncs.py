"""Prometheus's numeric functions, re-implemented to give the same numbers (Prometheus 2.x).

- `extrapolated_rate`: rate()/increase() over a range, with counter-reset correction and the
  extrapolation towards the window edges that Prometheus applies (promql/functions.go).
- histogram_quantile() is exporter/quantile.py (the tuning commands use it too).
- Go-style formatting used by the template functions humanize, humanizeDuration,
  humanizePercentage.
"""

from __future__ import annotations

import math
from typing import Sequence


def counter_correction(values: Sequence[float]) -> float:
    """What counter resets hid: the value before each drop (a restart from 0)."""
    correction, previous = 0.0, 0.0
    for value in values:
        if value < previous:
            correction += previous
        previous = value
    return correction


def extrapolated_rate(ts_ms: Sequence[int], values: Sequence[float], range_start_ms: int,
                      range_end_ms: int, is_rate: bool) -> float | None:
    """rate (is_rate) or increase of one counter series; None when fewer than two samples.

    `ts_ms`/`values` are the samples inside [range_start_ms, range_end_ms] (both ends
    included, as in Prometheus 2.x), oldest first.
    """
    if len(ts_ms) < 2:
        return None
    return extrapolate(ts_ms[0], ts_ms[-1], len(ts_ms), values[0], values[-1],
                       counter_correction(values), range_start_ms, range_end_ms, is_rate)


def extrapolate(first_ms: int, last_ms: int, count: int, first_value: float, last_value: float,
                correction: float, range_start_ms: int, range_end_ms: int,
                is_rate: bool) -> float:
    """Prometheus's extrapolatedRate from a window's summary (count >= 2)."""
    result = last_value - first_value + correction
    duration_to_start = (first_ms - range_start_ms) / 1000.0
    duration_to_end = (range_end_ms - last_ms) / 1000.0
    sampled_interval = (last_ms - first_ms) / 1000.0
    average_between = sampled_interval / (count - 1)
    if result > 0 and first_value >= 0:
        # A counter cannot go below zero: do not extrapolate past the point where it was 0.
        duration_to_zero = sampled_interval * (first_value / result)
        if duration_to_zero < duration_to_start:
            duration_to_start = duration_to_zero
    threshold = average_between * 1.1
    interval = sampled_interval
    interval += duration_to_start if duration_to_start < threshold else average_between / 2
    interval += duration_to_end if duration_to_end < threshold else average_between / 2
    # Same operation order as Prometheus, so results agree to the last bit.
    factor = interval / sampled_interval
    if is_rate:
        factor /= (range_end_ms - range_start_ms) / 1000.0
    return result * factor


# --- Go formatting for templates -----------------------------------------------------------

def go_g4(value: float) -> str:
    """Go's fmt.Sprintf("%.4g", v)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return "%.4g" % value


def humanize(value: float) -> str:
    if value == 0 or math.isnan(value) or math.isinf(value):
        return go_g4(value)
    prefix = ""
    if abs(value) >= 1:
        for p in ("k", "M", "G", "T", "P", "E", "Z", "Y"):
            if abs(value) < 1000:
                break
            prefix = p
            value /= 1000
        return go_g4(value) + prefix
    for p in ("m", "u", "n", "p", "f", "a", "z", "y"):
        if abs(value) >= 1:
            break
        prefix = p
        value *= 1000
    return go_g4(value) + prefix


def humanize_1024(value: float) -> str:
    """Prometheus' humanize1024: binary prefixes (ki, Mi, Gi, ...)."""
    if math.isnan(value) or math.isinf(value) or abs(value) <= 1:
        return go_g4(value)
    for prefix in ("", "ki", "Mi", "Gi", "Ti", "Pi", "Ei", "Zi"):
        if abs(value) < 1024:
            return go_g4(value) + prefix
        value /= 1024
    return go_g4(value) + "Yi"


def humanize_duration(value: float) -> str:
    if math.isnan(value) or math.isinf(value):
        return go_g4(value)
    if value == 0:
        return go_g4(value) + "s"
    if abs(value) >= 1:
        sign = "-" if value < 0 else ""
        value = abs(value)
        whole = int(value)
        seconds, minutes = whole % 60, (whole // 60) % 60
        hours, days = (whole // 3600) % 24, whole // 86400
        if days:
            return f"{sign}{days}d {hours}h {minutes}m {seconds}s"
        if hours:
            return f"{sign}{hours}h {minutes}m {seconds}s"
        if minutes:
            return f"{sign}{minutes}m {seconds}s"
        return f"{sign}{go_g4(value)}s"
    prefix = ""
    for p in ("m", "u", "n", "p", "f", "a", "z", "y"):
        if abs(value) >= 1:
            break
        prefix = p
        value *= 1000
    return f"{go_g4(value)}{prefix}s"


def humanize_percentage(value: float) -> str:
    return go_g4(value * 100) + "%"
