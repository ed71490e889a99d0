"""Live tuning advice: the running engine's metrics -> concrete setting changes, never applied.

`prepare_advice(config)` returns the `AdviceService` to start in the metrics process (None
when `advice.enabled` is false). Modules: config.py (the `advice:` section), model.py (an
Advice and its bounded label vocabularies), readings.py (samples -> per-model readings ->
windows), rules/ (one module per rule), forecast.py (capacity forecast, energy per token),
advisor.py (the rules over the windows), families.py, service.py (the thread, the families,
/advice), canary.py (the opt-in output-health canary), cli.py (`vllm-exporter advise`).
"""

from __future__ import annotations

from typing import Any

from .families import ADVICE_FAMILIES

__all__ = ["ADVICE_FAMILIES", "prepare_advice"]


def prepare_advice(config: Any) -> Any:
    if not config.advice.enabled:
        return None
    from .service import AdviceService

    host = config.api.host if config.api.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    return AdviceService(config.advice, api_url=f"http://{host}:{config.api.port}")
