"""What the alerting service needs from the process it runs in, as plain callables.

The metrics process builds one from its runtime (runtime.Runtime.alert_hooks); tests and
benchmarks can build their own. The service knows nothing else of the process: no runtime, no
server object, no front end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

# A route of the metrics port: returns (status, content type, body).
Route = Callable[[], "tuple[int, str, bytes]"]


def _ignore(*_: Any) -> None:
    return None


@dataclass(frozen=True)
class AlertHooks:
    # The metrics port the alerts' generator URL points at (None: config.metrics.port).
    metrics_port: int | None = None
    # Serve `route` at `path` on the metrics port, listed on its landing page with `description`.
    add_route: Callable[[str, Route, str], None] = _ignore
    # Let the metrics port render a collector's text itself (exposition.RendersItself).
    add_renderer: Callable[[Any], None] = _ignore
    # Call `callback()` once the engine is found dead (to evaluate at once).
    on_engine_death: Callable[[Callable[[], None]], None] = _ignore
    # Count one error of the alerting component (vllm_exporter_errors_total{component="alerts"}).
    count_error: Callable[[], None] = _ignore
