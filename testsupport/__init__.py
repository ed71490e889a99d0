"""What the tests and the benchmarks share: processes, servers, waiting, reading expositions.

Not part of the product (pyproject's package list ships `exporter*` only). pytest finds it
through `pythonpath = ["."]` in pyproject.toml; benchmarks run from the repository root as
`python -m bench.NAME`, which puts the root on the path.

    waiting          wait_for: the one way to wait for a condition
    net              free_port, http_get
    processes        a process group with its log: start, wait for a URL, stop; pids below it
    exposition       Samples: a /metrics text parsed into samples
    prometheus       real Prometheus and Alertmanager processes on loopback
    webhook          a receiver that records what is POSTed to it (Alertmanager's notifications)
    daemon           the daemon as a process: its config, start-up and stop
    load             request generators that run beside a test
    alerting         the e2e alert rule, rule files and an Alertmanager for a daemon
    alert_detection  time from a degradation to each alerting path's notification
    promtool         promtool's unit-test files run through the in-daemon evaluator
    dashboards       the live dashboard checks' targets, variables and waits
    dashboard_png    dashboards drawn to PNG from a real Prometheus
    pki              throw-away certificates and web config files
    lora             a LoRA adapter for the default model
    kv_connector     a daemon whose engine runs a KV connector over a local store
    async_kv_connector  a KV connector that loads ExampleConnector's files asynchronously
    markers          pytest skip markers for missing Prometheus binaries
    fake_pynvml      pynvml replayed from a recorded GPU (tests/data/nvml_h200.json)
    moe_model        a tiny mixture-of-experts model, for data-parallel shapes vLLM allows
                     only for MoE models; moe_dp/ fills two collectives vLLM's CPU build lacks
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
