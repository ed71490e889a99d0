"""GPU: memory (engine vs other processes vs budget), utilization, power, temperature, clocks,
throttle reasons, ECC and XID errors. Fed by the NVML collector (exporter/gpu/)."""

from __future__ import annotations

from .grafana import Dashboard, Row, Target, stat, state_timeline, timeseries
from .queries import GPU, increase, rate, sel, sum_by
from .variables import gpu_variable, scope_variables

BY_GPU = ("instance", "gpu")


def _g(metric: str, *extra: str) -> str:
    return sum_by(BY_GPU, sel(metric, GPU, *extra))


def _memory() -> Row:
    return Row("Memory", [
        timeseries("GPU memory: engine vs others vs budget", "Memory held by the engine's "
                   "processes and by every other process, against the engine's budget "
                   "(gpu_memory_utilization x total) and the card's total.", "bytes", [
                       Target(_g("vllm_gpu_process_memory_used_bytes", 'owner="engine"'),
                              "engine GPU {{gpu}}"),
                       Target(_g("vllm_gpu_process_memory_used_bytes", 'owner="other"'),
                              "other processes GPU {{gpu}}"),
                       Target(_g("vllm_gpu_memory_budget_bytes"), "budget GPU {{gpu}}"),
                       Target(_g("vllm_gpu_memory_total_bytes"), "total GPU {{gpu}}")], width=12),
        timeseries("GPU memory used, free, reserved", "NVML's view of the whole card.", "bytes", [
            Target(_g("vllm_gpu_memory_used_bytes"), "used GPU {{gpu}}"),
            Target(_g("vllm_gpu_memory_free_bytes"), "free GPU {{gpu}}"),
            Target(_g("vllm_gpu_memory_reserved_bytes"), "reserved GPU {{gpu}}")], width=12),
        stat("Compute processes", "Compute processes on each GPU, by owner.", "short",
             [Target(sum_by(BY_GPU + ("owner",), sel("vllm_gpu_processes", GPU)),
                     "GPU {{gpu}} {{owner}}")], width=6),
        stat("GPUs up", "GPUs NVML answers for (0 once a GPU is lost).", "short",
             [Target(f"sum({sel('vllm_gpu_up', GPU)})", "up")], width=6,
             thresholds=[(None, "red"), (1, "green")]),
        stat("Engine-visible GPUs", "GPUs the engine can use (CUDA_VISIBLE_DEVICES).", "short",
             [Target(f"sum({sel('vllm_gpu_engine_visible', GPU)})", "visible")], width=6),
        stat("Energy (dashboard range)", "Energy the GPUs consumed over the dashboard's time "
             "range.", "joule",
             [Target(sum_by(("gpu",), increase("vllm_gpu_energy_joules_total", GPU,
                                               window="$__range")), "GPU {{gpu}}")], width=6),
    ])


def _load() -> Row:
    return Row("Load, power, heat, clocks", [
        timeseries("Utilization", "Share of the sample period with a kernel running (gpu) and "
                   "with device memory busy (memory).", "percentunit", [
                       Target(_g("vllm_gpu_utilization_ratio"), "gpu {{gpu}}"),
                       Target(_g("vllm_gpu_memory_utilization_ratio"), "memory {{gpu}}")],
                   max_value=1),
        timeseries("Power vs limit", "Board power draw against the enforced power limit.",
                   "watt", [Target(_g("vllm_gpu_power_watts"), "power GPU {{gpu}}"),
                            Target(_g("vllm_gpu_power_limit_watts"), "limit GPU {{gpu}}")]),
        timeseries("Temperature", "GPU die temperature.", "celsius",
                   [Target(_g("vllm_gpu_temperature_celsius"), "GPU {{gpu}}")], min_value=None),
        timeseries("Clocks", "SM and memory clocks.", "hertz", [
            Target(_g("vllm_gpu_sm_clock_hertz"), "SM GPU {{gpu}}"),
            Target(_g("vllm_gpu_memory_clock_hertz"), "memory GPU {{gpu}}")]),
        state_timeline("Throttle reasons", "Which reasons hold the clocks down (1 = active).",
                       [Target("max by (gpu, reason) "
                               f"({sel('vllm_gpu_clock_throttle_active', GPU)})",
                               "GPU {{gpu}} {{reason}}")],
                       width=8, mappings=[(0, "no", "transparent"), (1, "active", "red")]),
        timeseries("Performance state", "P-state: 0 (P0, maximum performance) to 15.", "short",
                   [Target(_g("vllm_gpu_performance_state"), "GPU {{gpu}}")]),
        timeseries("PCIe throughput", "PCIe traffic by direction (only with the collector's "
                   "pcie_throughput switched on).", "Bps",
                   [Target(sum_by(BY_GPU + ("direction",),
                                  sel("vllm_gpu_pcie_throughput_bytes_per_second", GPU)),
                           "{{direction}} GPU {{gpu}}")], width=24, no_value="off"),
    ])


def _errors() -> Row:
    return Row("Errors and health", [
        timeseries("ECC errors", "ECC memory errors per second, by type (any uncorrected error "
                   "fires VllmGpuEccErrors).", "cps",
                   [Target(sum_by(("gpu", "type"), rate("vllm_gpu_ecc_errors_total", GPU)),
                           "{{type}} GPU {{gpu}}")]),
        timeseries("XID errors", "XID critical-error events per rate interval, by XID code.",
                   "short", [Target(sum_by(("gpu", "xid"),
                                           increase("vllm_gpu_xid_errors_total", GPU)),
                                    "XID {{xid}} GPU {{gpu}}")], no_value="0"),
        timeseries("Remapped rows", "Memory rows remapped, by cause; pending and failed remaps.",
                   "short", [
                       Target(sum_by(("gpu", "cause"), sel("vllm_gpu_remapped_rows", GPU)),
                              "{{cause}} GPU {{gpu}}"),
                       Target(_g("vllm_gpu_row_remap_pending"), "pending GPU {{gpu}}"),
                       Target(_g("vllm_gpu_row_remap_failed"), "failed GPU {{gpu}}")]),
    ])


def dashboard() -> Dashboard:
    return Dashboard(
        uid="vllm-exporter-gpu", title="vLLM / GPU",
        description="NVML telemetry of the GPUs the engine runs on.",
        rows=[_memory(), _load(), _errors()],
        variables=scope_variables("vllm_gpu_up") + [gpu_variable()],
        file_name="gpu.json")
