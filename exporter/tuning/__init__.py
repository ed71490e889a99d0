"""The tuning toolkit: `plan`, `bench`, `tune batch-size`, `tune gpu-memory` and `profile`.

Each command is one module (plan.py, bench.py, sweep.py, gpu_memory.py, profile.py) built on a
few shared pieces: a reproducible synthetic workload (workload.py), a streaming load generator
that measures latency client-side (loadgen.py), and the daemon's view of the same period read
from its /metrics histograms (daemon_view.py). cli.py wires them into `vllm-exporter`.
"""
