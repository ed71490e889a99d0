"""Every GPU family the collector exports: name, type, help, labels and the NVML call behind it.

The single source for the GPU part of docs/metrics.md, the dashboards and the alert rules, as
exporter/metrics.py is for the engine's families.
"""

from __future__ import annotations

from ..families import FamilySpec

GPU_LABELS = ("gpu", "uuid", "name")
MIG_LABELS = GPU_LABELS + ("mig", "mig_uuid", "mig_name")


def _spec(name: str, kind: str, help: str, labels: tuple[str, ...], source: str) -> FamilySpec:
    return FamilySpec(name, kind, help, labels=labels, source=source, where="server")


GPU_FAMILIES: tuple[FamilySpec, ...] = (
    # --- identity and engine mapping --------------------------------------------------------
    _spec("vllm_gpu_up", "gauge",
          "1 while NVML answers for this GPU, 0 once it is lost (fell off the bus, needs reset).",
          GPU_LABELS, "nvmlDeviceGetHandleByIndex and every per-GPU call"),
    _spec("vllm_gpu_engine_visible", "gauge",
          "1 if the engine can use this GPU (CUDA_VISIBLE_DEVICES, by index or UUID), else 0; "
          "cuda_index is the CUDA ordinal the engine sees it as ('' when not visible).",
          GPU_LABELS + ("cuda_index",), "CUDA_VISIBLE_DEVICES matched to nvmlDeviceGetUUID"),
    # --- memory -----------------------------------------------------------------------------
    _spec("vllm_gpu_memory_total_bytes", "gauge", "Installed GPU memory.",
          GPU_LABELS, "nvmlDeviceGetMemoryInfo(v2).total"),
    _spec("vllm_gpu_memory_used_bytes", "gauge",
          "GPU memory allocated by processes (driver-reserved memory excluded).",
          GPU_LABELS, "nvmlDeviceGetMemoryInfo(v2).used"),
    _spec("vllm_gpu_memory_free_bytes", "gauge", "GPU memory free for allocation.",
          GPU_LABELS, "nvmlDeviceGetMemoryInfo(v2).free"),
    _spec("vllm_gpu_memory_reserved_bytes", "gauge",
          "GPU memory the driver and firmware reserve.",
          GPU_LABELS, "nvmlDeviceGetMemoryInfo(v2).reserved"),
    _spec("vllm_gpu_memory_budget_bytes", "gauge",
          "GPU memory vLLM plans to take: gpu_memory_utilization x (total - reserved), as vLLM "
          "computes it from cudaMemGetInfo, on the GPUs the engine uses (present once the "
          "engine is up). The CUDA context and CUDA graphs come on top.",
          GPU_LABELS, "set_memory_budget_ratio() x nvmlDeviceGetMemoryInfo(v2) (total - "
                      "reserved)"),
    _spec("vllm_gpu_process_memory_used_bytes", "gauge",
          "GPU memory used by compute processes, by owner: engine = the daemon's process tree "
          "(daemon, engine core, workers), other = every other process.",
          GPU_LABELS + ("owner",),
          "nvmlDeviceGetComputeRunningProcesses + /proc parent pids (slow group)"),
    _spec("vllm_gpu_processes", "gauge",
          "Compute processes on the GPU, by owner (engine or other).",
          GPU_LABELS + ("owner",), "nvmlDeviceGetComputeRunningProcesses + /proc parent pids "
          "(slow group)"),
    # --- load, power, heat, clocks ----------------------------------------------------------
    _spec("vllm_gpu_utilization_ratio", "gauge",
          "Fraction of the last sample period in which a kernel ran on the GPU (0-1).",
          GPU_LABELS, "nvmlDeviceGetUtilizationRates.gpu / 100"),
    _spec("vllm_gpu_memory_utilization_ratio", "gauge",
          "Fraction of the last sample period in which device memory was read or written (0-1).",
          GPU_LABELS, "nvmlDeviceGetUtilizationRates.memory / 100"),
    _spec("vllm_gpu_power_watts", "gauge", "Power draw of the board.",
          GPU_LABELS, "nvmlDeviceGetPowerUsage (mW) / 1000"),
    _spec("vllm_gpu_power_limit_watts", "gauge", "Power limit the driver enforces.",
          GPU_LABELS, "nvmlDeviceGetEnforcedPowerLimit (mW) / 1000 (slow group)"),
    _spec("vllm_gpu_energy_joules_total", "counter",
          "Energy the GPU consumed since the driver was loaded.",
          GPU_LABELS, "nvmlDeviceGetTotalEnergyConsumption (mJ) / 1000 (slow group)"),
    _spec("vllm_gpu_temperature_celsius", "gauge", "GPU die temperature.",
          GPU_LABELS, "nvmlDeviceGetTemperature(NVML_TEMPERATURE_GPU)"),
    _spec("vllm_gpu_sm_clock_hertz", "gauge", "Current SM clock.",
          GPU_LABELS, "nvmlDeviceGetClockInfo(NVML_CLOCK_SM) (MHz) x 1e6"),
    _spec("vllm_gpu_memory_clock_hertz", "gauge", "Current memory clock.",
          GPU_LABELS, "nvmlDeviceGetClockInfo(NVML_CLOCK_MEM) (MHz) x 1e6"),
    _spec("vllm_gpu_clock_throttle_active", "gauge",
          "1 while this reason holds the clocks down (gpu_idle, sw_power_cap, hw_slowdown, "
          "sw_thermal_slowdown, hw_thermal_slowdown, hw_power_brake_slowdown, ...), else 0.",
          GPU_LABELS + ("reason",), "nvmlDeviceGetCurrentClocksEventReasons bit mask"),
    _spec("vllm_gpu_performance_state", "gauge",
          "Performance state: 0 (P0, maximum performance) to 15 (P15, minimum).",
          GPU_LABELS, "nvmlDeviceGetPerformanceState"),
    _spec("vllm_gpu_pcie_throughput_bytes_per_second", "gauge",
          "PCIe throughput over the last 20 ms, by direction (tx or rx). Off by default "
          "(pcie_throughput: the call blocks ~20 ms).",
          GPU_LABELS + ("direction",), "nvmlDeviceGetPcieThroughput (KB/s) x 1024 (slow group)"),
    # --- errors and health ------------------------------------------------------------------
    _spec("vllm_gpu_ecc_errors_total", "counter",
          "ECC memory errors since the driver was loaded, by type (corrected or uncorrected).",
          GPU_LABELS + ("type",),
          "nvmlDeviceGetTotalEccErrors(type, NVML_VOLATILE_ECC) (slow group)"),
    _spec("vllm_gpu_remapped_rows", "gauge",
          "Memory rows remapped, by cause (correctable or uncorrectable errors).",
          GPU_LABELS + ("cause",), "nvmlDeviceGetRemappedRows (slow group)"),
    _spec("vllm_gpu_row_remap_pending", "gauge",
          "1 if a row remap is pending (takes effect at the next GPU reset), else 0.",
          GPU_LABELS, "nvmlDeviceGetRemappedRows.isPending (slow group)"),
    _spec("vllm_gpu_row_remap_failed", "gauge",
          "1 if a row remap failed (the GPU should be serviced), else 0.",
          GPU_LABELS, "nvmlDeviceGetRemappedRows.failureOccurred (slow group)"),
    _spec("vllm_gpu_xid_errors_total", "counter",
          "XID critical error events, by XID code (codes above 999 count as 'other').",
          GPU_LABELS + ("xid",), "nvmlEventSetWait on nvmlEventTypeXidCriticalError"),
    # --- MIG instances (where MIG is enabled) -----------------------------------------------
    _spec("vllm_gpu_mig_memory_total_bytes", "gauge", "Memory of a MIG instance.",
          MIG_LABELS, "nvmlDeviceGetMemoryInfo(MIG device handle).total"),
    _spec("vllm_gpu_mig_memory_used_bytes", "gauge", "Memory used in a MIG instance.",
          MIG_LABELS, "nvmlDeviceGetMemoryInfo(MIG device handle).used"),
    _spec("vllm_gpu_mig_memory_free_bytes", "gauge", "Memory free in a MIG instance.",
          MIG_LABELS, "nvmlDeviceGetMemoryInfo(MIG device handle).free"),
    # --- the collector's own health ---------------------------------------------------------
    _spec("vllm_exporter_collector_up", "gauge",
          "1 while the collector works: for gpu, NVML is initialised and every GPU answers; "
          "0 without NVML, without a GPU, or while a GPU is lost.",
          ("collector",), "the GPU collector"),
    _spec("vllm_exporter_gpu_collect_duration_seconds", "gauge",
          "Wall time of the last GPU collection tick (all GPUs).",
          (), "the GPU collector"),
    _spec("vllm_exporter_gpu_last_success_timestamp_seconds", "gauge",
          "Unix time of the last tick in which every GPU answered.",
          (), "the GPU collector"),
    _spec("vllm_exporter_gpu_errors_total", "counter",
          "Failed NVML calls, by NVML function (NotSupported excluded: see "
          "vllm_exporter_gpu_call_unsupported).",
          ("call",), "the GPU collector"),
    _spec("vllm_exporter_gpu_call_unsupported", "gauge",
          "1 for each NVML call this GPU answered NotSupported; it is not called again.",
          ("gpu", "call"), "the GPU collector"),
)

# Families rendered even with no sample, so that "no GPU" is visible as such.
ALWAYS_RENDERED = ("vllm_exporter_collector_up", "vllm_exporter_gpu_errors_total")
