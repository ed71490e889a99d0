"""PromQL building blocks for the panels, so every query filters on the template variables
the same way and every rate uses `$__rate_interval`."""

from __future__ import annotations

RATE = "$__rate_interval"
SCOPE = ('job=~"$job"', 'instance=~"$instance"')  # every family
ENGINE = SCOPE + ('model=~"$model"',)  # engine families (they carry `model`)
GPU = SCOPE + ('gpu=~"$gpu"',)  # per-GPU families
PERCENTILES = (0.5, 0.95, 0.99)


def sel(metric: str, scope: tuple[str, ...], *extra: str) -> str:
    return f"{metric}{{{', '.join(scope + extra)}}}"


def rate(metric: str, scope: tuple[str, ...], *extra: str, window: str = RATE) -> str:
    return f"rate({sel(metric, scope, *extra)}[{window}])"


def increase(metric: str, scope: tuple[str, ...], *extra: str, window: str = RATE) -> str:
    return f"increase({sel(metric, scope, *extra)}[{window}])"


def sum_by(labels: tuple[str, ...], expr: str) -> str:
    return f"sum by ({', '.join(labels)}) ({expr})"


def quantile(q: float, histogram: str, scope: tuple[str, ...], by: tuple[str, ...] = ("model",)
             ) -> str:
    buckets = rate(f"{histogram}_bucket", scope)
    return f"histogram_quantile({q:g}, {sum_by(('le',) + by, buckets)})"


def mean(histogram: str, scope: tuple[str, ...], by: tuple[str, ...] = ("model",)) -> str:
    return (f"{sum_by(by, rate(histogram + '_sum', scope))} / "
            f"{sum_by(by, rate(histogram + '_count', scope))}")


def buckets(histogram: str, scope: tuple[str, ...]) -> str:
    """Per-bucket rates for a heatmap."""
    return sum_by(("le",), rate(f"{histogram}_bucket", scope))


def ratio_or_zero(numerator: str, denominator: str) -> str:
    """numerator / denominator, 0 (not 'no data') where the numerator has no series yet.

    Counters with a label that has not happened yet (finish_reason="error") have no series;
    `or denominator * 0` fills those in with 0 for every series of the denominator.
    """
    return f"({numerator} or {denominator} * 0) / {denominator}"
