"""The NVML GPU collector, against a fake pynvml that replays a recording from a real H200."""

from __future__ import annotations

import copy
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pynvml
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from testsupport import fake_pynvml
from exporter.gpu import (GPU_FAMILIES, GpuCollector, GpuConfig, descendants,
                          map_cuda_visible_devices, read_parent_pids)
from testsupport.waiting import wait_for

GIB = 2**30
RECORDING = fake_pynvml.load_recording()
REC = {key: entry.get("value") for key, entry in RECORDING["devices"][0]["calls"].items()}
UUID0 = REC["nvmlDeviceGetUUID"]
NAME0 = REC["nvmlDeviceGetName"]
UUID1 = "GPU-11111111-2222-3333-4444-555555555555"


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def recording(gpus: int = 1) -> dict:
    """The H200 recording, with extra GPUs that differ only by UUID."""
    rec = copy.deepcopy(RECORDING)
    for index in range(1, gpus):
        device = copy.deepcopy(rec["devices"][0])
        device["calls"]["nvmlDeviceGetUUID"] = {"value": UUID1.replace("1111", f"{index:04d}")}
        rec["devices"].append(device)
    return rec


def make(fake, clock=None, proc_root="/proc", root_pid=None, **config):
    config.setdefault("xid_events", False)
    collector = GpuCollector(GpuConfig(**config), root_pid=root_pid or os.getpid(), nvml=fake,
                             proc_root=str(proc_root), clock=clock or FakeClock())
    registry = CollectorRegistry()
    registry.register(collector)
    return collector, registry


def scrape(registry) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted label items) -> value, from the text exposition."""
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples, name, /, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


def names(samples) -> set[str]:
    return {name for name, _ in samples}


def gpu0(**extra):
    return dict(gpu="0", uuid=UUID0, name=NAME0, **extra)


# --- families and values -------------------------------------------------------------------------

def full_coverage_fake():
    """Two GPUs; GPU 1 has MIG on, one unsupported call and one failing call; XID events on."""
    rec = recording(gpus=2)
    calls1 = rec["devices"][1]["calls"]
    calls1["nvmlDeviceGetMigMode"] = {"value": [1, 1]}
    calls1["nvmlDeviceGetMaxMigDeviceCount"] = {"value": 3}
    calls1["mig_devices"] = {"value": [
        {"uuid": "MIG-aaaa", "name": "NVIDIA H200 MIG 1g.18gb",
         "memory": {"total": 18 * GIB, "used": 1 * GIB, "free": 17 * GIB}},
        None,
        {"uuid": "MIG-bbbb", "name": "NVIDIA H200 MIG 1g.18gb",
         "memory": {"total": 18 * GIB, "used": 2 * GIB, "free": 16 * GIB}},
    ]}
    for calls in (rec["devices"][0]["calls"], calls1):
        calls["nvmlDeviceGetSupportedEventTypes"] = {"value": pynvml.nvmlEventTypeAll}
        calls["nvmlDeviceRegisterEvents"] = {"value": None}
    fake = fake_pynvml.FakeNvml(rec)
    fake.fail(1, "nvmlDeviceGetFanSpeed", pynvml.NVMLError_NotSupported)
    fake.fail(1, "nvmlDeviceGetEnforcedPowerLimit", pynvml.NVMLError_NotSupported)
    fake.fail(1, "nvmlDeviceGetTemperature:0", pynvml.NVMLError_Unknown)
    return fake


def test_every_family_is_declared_with_its_labels_and_every_declared_family_is_produced():
    fake = full_coverage_fake()
    collector, registry = make(fake, pcie_throughput=True, xid_events=True, event_wait_ms=20)
    try:
        collector.sample_once()
        collector.sample_once()  # GPU 1's slow calls (one GPU per tick)
        collector.set_memory_budget_ratio(0.9)
        fake.emit_xid(0, 79)
        assert wait_for(lambda: value(scrape(registry), "vllm_gpu_xid_errors_total",
                                      **gpu0(xid="79")) == 1)
        specs = {spec.name: spec for spec in GPU_FAMILIES}
        yielded = {}
        for family in collector.collect():
            spec_name = family.name + "_total" if family.type == "counter" else family.name
            assert spec_name in specs, f"{spec_name} is not in GPU_FAMILIES"
            assert specs[spec_name].kind == family.type
            for sample in family.samples:
                assert set(sample.labels) == set(specs[spec_name].labels), spec_name
            yielded[spec_name] = family
        assert set(yielded) == set(specs), set(specs) - set(yielded)
    finally:
        collector.stop()


def test_families_follow_the_naming_conventions():
    for spec in GPU_FAMILIES:
        assert ":" not in spec.name
        assert spec.name.startswith(("vllm_gpu_", "vllm_exporter_")), spec.name
        assert spec.name.endswith("_total") == (spec.kind == "counter"), spec.name
        assert spec.help and spec.source


def test_values_are_the_recorded_ones_in_base_units():
    collector, registry = make(fake_pynvml.FakeNvml(recording()))
    collector.sample_once()
    s = scrape(registry)
    mem = REC["nvmlDeviceGetMemoryInfo_v2"]
    assert value(s, "vllm_gpu_memory_total_bytes", **gpu0()) == mem["total"]
    assert value(s, "vllm_gpu_memory_used_bytes", **gpu0()) == mem["used"]
    assert value(s, "vllm_gpu_memory_free_bytes", **gpu0()) == mem["free"]
    assert value(s, "vllm_gpu_memory_reserved_bytes", **gpu0()) == mem["reserved"]
    util = REC["nvmlDeviceGetUtilizationRates"]
    assert value(s, "vllm_gpu_utilization_ratio", **gpu0()) == pytest.approx(util["gpu"] / 100)
    assert value(s, "vllm_gpu_memory_utilization_ratio", **gpu0()) == pytest.approx(
        util["memory"] / 100)
    assert value(s, "vllm_gpu_power_watts", **gpu0()) == pytest.approx(
        REC["nvmlDeviceGetPowerUsage"] / 1000)
    assert value(s, "vllm_gpu_power_limit_watts", **gpu0()) == pytest.approx(
        REC["nvmlDeviceGetEnforcedPowerLimit"] / 1000)
    assert value(s, "vllm_gpu_energy_joules_total", **gpu0()) == pytest.approx(
        REC["nvmlDeviceGetTotalEnergyConsumption"] / 1000)
    assert value(s, "vllm_gpu_temperature_celsius", **gpu0()) == REC["nvmlDeviceGetTemperature:0"]
    assert value(s, "vllm_gpu_sm_clock_hertz", **gpu0()) == REC["nvmlDeviceGetClockInfo:1"] * 1e6
    assert value(s, "vllm_gpu_memory_clock_hertz", **gpu0()) == \
        REC["nvmlDeviceGetClockInfo:2"] * 1e6
    assert value(s, "vllm_gpu_performance_state", **gpu0()) == REC["nvmlDeviceGetPerformanceState"]
    assert value(s, "vllm_gpu_ecc_errors_total", **gpu0(type="corrected")) == \
        REC["nvmlDeviceGetTotalEccErrors:0:0"]
    assert value(s, "vllm_gpu_ecc_errors_total", **gpu0(type="uncorrected")) == \
        REC["nvmlDeviceGetTotalEccErrors:1:0"]
    correctable, uncorrectable, pending, failed = REC["nvmlDeviceGetRemappedRows"]
    assert value(s, "vllm_gpu_remapped_rows", **gpu0(cause="correctable")) == correctable
    assert value(s, "vllm_gpu_remapped_rows", **gpu0(cause="uncorrectable")) == uncorrectable
    assert value(s, "vllm_gpu_row_remap_pending", **gpu0()) == (1 if pending else 0)
    assert value(s, "vllm_gpu_row_remap_failed", **gpu0()) == (1 if failed else 0)
    assert value(s, "vllm_gpu_up", **gpu0()) == 1
    assert value(s, "vllm_exporter_collector_up", collector="gpu") == 1
    assert value(s, "vllm_exporter_gpu_last_success_timestamp_seconds") == pytest.approx(
        time.time(), abs=5)
    assert value(s, "vllm_exporter_gpu_collect_duration_seconds") > 0


def test_each_throttle_reason_is_its_own_series():
    fake = fake_pynvml.FakeNvml(recording())
    fake.set_value(0, "nvmlDeviceGetCurrentClocksEventReasons", 0x4 | 0x40)
    collector, registry = make(fake)
    collector.sample_once()
    s = scrape(registry)
    active = {dict(labels)["reason"]: v for (name, labels), v in s.items()
              if name == "vllm_gpu_clock_throttle_active"}
    assert active["sw_power_cap"] == 1 and active["hw_thermal_slowdown"] == 1
    assert active["gpu_idle"] == 0 and active["hw_slowdown"] == 0
    assert sum(active.values()) == 2 and len(active) == 11


def test_memory_falls_back_to_v1_where_v2_is_not_supported():
    fake = fake_pynvml.FakeNvml(recording())
    fake.fail(0, "nvmlDeviceGetMemoryInfo_v2", pynvml.NVMLError_FunctionNotFound)
    collector, registry = make(fake)
    collector.sample_once()
    s = scrape(registry)
    assert value(s, "vllm_gpu_memory_used_bytes", **gpu0()) == \
        REC["nvmlDeviceGetMemoryInfo"]["used"]
    assert value(s, "vllm_gpu_memory_reserved_bytes", **gpu0()) is None


# --- scrapes are decoupled from NVML -------------------------------------------------------------

def test_register_and_scrape_make_no_nvml_call():
    fake = fake_pynvml.FakeNvml(recording(gpus=2))
    collector, registry = make(fake)  # register() calls describe()
    assert fake.calls == []
    collector.sample_once()
    before = list(fake.calls)
    for _ in range(3):
        generate_latest(registry)
    assert fake.calls == before
    assert value(scrape(registry), "vllm_gpu_up", **gpu0()) == 1


def test_scrape_shows_the_last_tick_until_the_next_one():
    fake = fake_pynvml.FakeNvml(recording())
    collector, registry = make(fake)
    collector.sample_once()
    fake.set_value(0, "nvmlDeviceGetPowerUsage", 123_000)
    assert value(scrape(registry), "vllm_gpu_power_watts", **gpu0()) == pytest.approx(
        REC["nvmlDeviceGetPowerUsage"] / 1000)
    collector.sample_once()
    assert value(scrape(registry), "vllm_gpu_power_watts", **gpu0()) == 123.0


# --- failures stay local -------------------------------------------------------------------------

def test_not_supported_is_remembered_per_gpu_and_call_and_is_not_an_error():
    fake = fake_pynvml.FakeNvml(recording(gpus=2))
    fake.fail(0, "nvmlDeviceGetPowerUsage", pynvml.NVMLError_NotSupported)
    collector, registry = make(fake)
    for _ in range(3):
        collector.sample_once()
    s = scrape(registry)
    assert fake.count("nvmlDeviceGetPowerUsage") == 1 + 3  # GPU 0 once, GPU 1 every tick
    assert value(s, "vllm_gpu_power_watts", **gpu0()) is None
    assert value(s, "vllm_gpu_power_watts", gpu="1", uuid=UUID1.replace("1111", "0001"),
                 name=NAME0) is not None
    assert value(s, "vllm_exporter_gpu_call_unsupported", gpu="0",
                 call="nvmlDeviceGetPowerUsage") == 1
    assert value(s, "vllm_exporter_gpu_errors_total", call="nvmlDeviceGetPowerUsage") is None
    assert value(s, "vllm_gpu_temperature_celsius", **gpu0()) is not None
    assert value(s, "vllm_exporter_collector_up", collector="gpu") == 1


def test_a_failing_call_is_counted_and_drops_only_its_own_series():
    fake = fake_pynvml.FakeNvml(recording())
    fake.fail(0, "nvmlDeviceGetTemperature:0", pynvml.NVMLError_Unknown)
    collector, registry = make(fake)
    collector.sample_once()
    collector.sample_once()
    s = scrape(registry)
    assert value(s, "vllm_exporter_gpu_errors_total", call="nvmlDeviceGetTemperature") == 2
    assert value(s, "vllm_gpu_temperature_celsius", **gpu0()) is None
    assert value(s, "vllm_gpu_power_watts", **gpu0()) is not None
    assert value(s, "vllm_exporter_collector_up", collector="gpu") == 1
    fake.fail(0, "nvmlDeviceGetTemperature:0", None)
    collector.sample_once()
    assert value(scrape(registry), "vllm_gpu_temperature_celsius", **gpu0()) is not None


def test_an_unexpected_exception_from_the_binding_is_counted_logged_once_and_contained(caplog):
    fake = fake_pynvml.FakeNvml(recording())
    fake.fail(0, "nvmlDeviceGetPerformanceState", RuntimeError)
    collector, registry = make(fake)
    with caplog.at_level(logging.WARNING, logger="exporter.gpu"):
        for _ in range(3):
            collector.sample_once()
    s = scrape(registry)
    assert value(s, "vllm_exporter_gpu_errors_total", call="nvmlDeviceGetPerformanceState") == 3
    assert value(s, "vllm_gpu_performance_state", **gpu0()) is None
    assert value(s, "vllm_gpu_memory_total_bytes", **gpu0()) is not None
    assert len([r for r in caplog.records
                if "nvmlDeviceGetPerformanceState" in r.getMessage()]) == 1


def test_a_gpu_lost_mid_run_is_dropped_retried_with_backoff_and_comes_back(caplog):
    fake = fake_pynvml.FakeNvml(recording(gpus=2))
    clock = FakeClock()
    collector, registry = make(fake, clock=clock, retry_initial_seconds=2.0)
    uuid1 = UUID1.replace("1111", "0001")
    collector.sample_once()
    assert value(scrape(registry), "vllm_exporter_collector_up", collector="gpu") == 1

    fake.lose_gpu(1)
    with caplog.at_level(logging.WARNING, logger="exporter.gpu"):
        collector.sample_once()
    s = scrape(registry)
    assert value(s, "vllm_gpu_up", gpu="1", uuid=uuid1, name=NAME0) == 0
    assert value(s, "vllm_gpu_up", **gpu0()) == 1
    assert value(s, "vllm_gpu_memory_total_bytes", **gpu0()) is not None
    assert value(s, "vllm_gpu_memory_total_bytes", gpu="1", uuid=uuid1, name=NAME0) is None
    assert value(s, "vllm_exporter_collector_up", collector="gpu") == 0
    assert value(s, "vllm_exporter_gpu_errors_total", call="nvmlDeviceGetMemoryInfo_v2") == 1
    assert any("is lost" in r.getMessage() for r in caplog.records)
    assert fake.count("nvmlInit") == 1

    clock.now += 1.0  # before the 2 s backoff: no re-init, GPU 0 still sampled
    collector.sample_once()
    assert fake.count("nvmlInit") == 1
    assert value(scrape(registry), "vllm_gpu_memory_total_bytes", **gpu0()) is not None

    clock.now += 1.5  # past it: NVML is re-initialised, GPU 1 still lost
    collector.sample_once()
    assert fake.count("nvmlInit") == 2
    assert value(scrape(registry), "vllm_gpu_up", gpu="1", uuid=uuid1, name=NAME0) == 0

    clock.now += 3.0  # the backoff doubled to 4 s: not yet
    collector.sample_once()
    assert fake.count("nvmlInit") == 2

    fake.restore_gpu(1)
    clock.now += 1.5
    collector.sample_once()
    assert fake.count("nvmlInit") == 3
    s = scrape(registry)
    assert value(s, "vllm_gpu_up", gpu="1", uuid=uuid1, name=NAME0) == 1
    assert value(s, "vllm_gpu_memory_total_bytes", gpu="1", uuid=uuid1, name=NAME0) is not None
    assert value(s, "vllm_exporter_collector_up", collector="gpu") == 1
    assert fake.count("nvmlShutdown") == 2  # each re-init closed the previous session


def test_nvml_stopping_under_us_closes_the_session_and_retries(caplog):
    fake = fake_pynvml.FakeNvml(recording())
    clock = FakeClock()
    collector, registry = make(fake, clock=clock)
    collector.sample_once()
    fake.fail(0, "nvmlDeviceGetUtilizationRates", pynvml.NVMLError_DriverNotLoaded)
    with caplog.at_level(logging.WARNING, logger="exporter.gpu"):
        collector.sample_once()
    s = scrape(registry)
    assert value(s, "vllm_exporter_collector_up", collector="gpu") == 0
    assert value(s, "vllm_gpu_up", **gpu0()) == 0
    assert value(s, "vllm_gpu_memory_total_bytes", **gpu0()) is None
    assert fake.count("nvmlShutdown") == 1
    fake.fail(0, "nvmlDeviceGetUtilizationRates", None)
    clock.now += 10
    collector.sample_once()
    assert value(scrape(registry), "vllm_exporter_collector_up", collector="gpu") == 1


def test_without_the_nvml_library_up_is_0_and_the_log_says_so_once(caplog):
    fake = fake_pynvml.FakeNvml(recording(), library_present=False)
    clock = FakeClock()
    collector, registry = make(fake, clock=clock, retry_initial_seconds=1.0,
                               retry_max_seconds=8.0)
    with caplog.at_level(logging.DEBUG, logger="exporter.gpu"):
        for _ in range(40):
            collector.sample_once()
            clock.now += 1.0
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].name == "exporter.gpu"
    assert "NVML Shared Library Not Found" in warnings[0].getMessage()
    s = scrape(registry)
    assert value(s, "vllm_exporter_collector_up", collector="gpu") == 0
    assert not any(name.startswith("vllm_gpu_") for name in names(s))
    # retries after 1, 2, 4, 8, 8, 8 ... seconds: about 8 in 40 s, not 40
    assert 6 <= fake.count("nvmlInit") <= 9
    assert value(s, "vllm_exporter_gpu_errors_total", call="nvmlInit") == fake.count("nvmlInit")


def test_without_a_gpu_up_is_0():
    rec = recording()
    rec["devices"] = []
    collector, registry = make(fake_pynvml.FakeNvml(rec))
    collector.sample_once()
    assert value(scrape(registry), "vllm_exporter_collector_up", collector="gpu") == 0


def test_gpus_beyond_the_cap_are_left_out_logged_and_counted(caplog):
    """Cardinality: a host with more GPUs than gpu.max_devices gets series for the first ones
    only, every GPU family included; the rest is counted, not silently dropped."""
    overflow = []
    fake = fake_pynvml.FakeNvml(recording(gpus=5))
    collector = GpuCollector(GpuConfig(max_devices=3, xid_events=False), root_pid=os.getpid(),
                             nvml=fake, clock=FakeClock(), on_label_overflow=overflow.append)
    registry = CollectorRegistry()
    registry.register(collector)
    with caplog.at_level(logging.WARNING, logger="exporter.gpu"):
        collector.sample_once()
    s = scrape(registry)
    gpus = {dict(labels)["gpu"] for _, labels in s if "gpu" in dict(labels)}
    assert gpus == {"0", "1", "2"}
    assert value(s, "vllm_exporter_collector_up", collector="gpu") == 1
    assert overflow == [2]
    assert "2 left out" in caplog.text
    collector.sample_once()  # a tick with the same session counts nothing more
    assert overflow == [2]
    assert GpuConfig(max_devices=0).problems() == [("max_devices", "must be >= 1, got 0")]


def _real_nvml_works() -> bool:
    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except pynvml.NVMLError:
        return False


@pytest.mark.skipif(_real_nvml_works(), reason="this machine has NVML")
def test_on_this_cpu_machine_the_real_pynvml_says_once_that_nvml_is_missing(caplog):
    collector = GpuCollector(GpuConfig(interval_seconds=0.01, retry_initial_seconds=0.01),
                             root_pid=os.getpid())
    registry = CollectorRegistry()
    registry.register(collector)
    with caplog.at_level(logging.INFO, logger="exporter.gpu"):
        collector.start()
        assert wait_for(lambda: (value(scrape(registry), "vllm_exporter_gpu_errors_total",
                                       call="nvmlInit") or 0) >= 3)
        collector.stop()
    records = [r for r in caplog.records if r.name == "exporter.gpu"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert "NVML" in records[0].getMessage()
    assert value(scrape(registry), "vllm_exporter_collector_up", collector="gpu") == 0


# --- engine attribution --------------------------------------------------------------------------

def fake_proc(tmp_path: Path, parents: dict[int, int], comm: str = "python3") -> Path:
    for pid, ppid in parents.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(f"{pid} ({comm}) S {ppid} {pid} 0 0 -1\n")
    (tmp_path / "self").mkdir()
    (tmp_path / "meminfo").write_text("")
    return tmp_path


def test_read_parent_pids_parses_names_with_spaces_and_parentheses(tmp_path):
    proc = fake_proc(tmp_path, {1: 0, 100: 1, 101: 100}, comm="VLLM::Engine (core) x")
    assert read_parent_pids(str(proc)) == {1: 0, 100: 1, 101: 100}
    assert read_parent_pids(str(tmp_path / "missing")) == {}


def test_descendants_are_the_whole_subtree_and_nothing_else():
    parents = {1: 0, 100: 1, 101: 100, 102: 101, 103: 100, 200: 1, 201: 200}
    assert descendants(100, parents) == {100, 101, 102, 103}
    assert descendants(999, parents) == {999}


def test_process_memory_is_split_into_the_engine_tree_and_everything_else(tmp_path):
    proc = fake_proc(tmp_path, {1: 0, 100: 1, 101: 100, 102: 101, 200: 1, 201: 200})
    fake = fake_pynvml.FakeNvml(recording())
    fake.set_processes(0, [(101, 10 * GIB), (102, 1 * GIB), (201, 4 * GIB),
                           (4242, 2 * GIB)])  # 4242: not in our /proc (another pid namespace)
    clock = FakeClock()
    collector, registry = make(fake, clock=clock, proc_root=proc, root_pid=100,
                               slow_interval_seconds=2.0)
    collector.sample_once()
    s = scrape(registry)
    assert value(s, "vllm_gpu_process_memory_used_bytes", **gpu0(owner="engine")) == 11 * GIB
    assert value(s, "vllm_gpu_process_memory_used_bytes", **gpu0(owner="other")) == 6 * GIB
    assert value(s, "vllm_gpu_processes", **gpu0(owner="engine")) == 2
    assert value(s, "vllm_gpu_processes", **gpu0(owner="other")) == 2
    assert collector.engine_processes.scans == 1

    for _ in range(2):  # a tick without the slow group, then one with it: the same pids
        clock.now += 1.0
        collector.sample_once()
    assert fake.count("nvmlDeviceGetComputeRunningProcesses") == 2
    assert collector.engine_processes.scans == 1

    (proc / "103").mkdir()
    (proc / "103" / "stat").write_text("103 (python3) S 100 103 0 0 -1\n")
    fake.set_processes(0, [(101, 10 * GIB), (103, 3 * GIB)])
    clock.now += 2.0
    collector.sample_once()  # a new pid: one scan finds it below the root
    s = scrape(registry)
    assert collector.engine_processes.scans == 2
    assert value(s, "vllm_gpu_process_memory_used_bytes", **gpu0(owner="engine")) == 13 * GIB
    assert value(s, "vllm_gpu_process_memory_used_bytes", **gpu0(owner="other")) == 0


def test_pids_known_on_any_gpu_need_no_new_scan_when_gpus_take_turns(tmp_path):
    proc = fake_proc(tmp_path, {1: 0, 100: 1, 101: 100, 201: 1})
    fake = fake_pynvml.FakeNvml(recording(gpus=2))
    fake.set_processes(0, [(101, GIB)])
    fake.set_processes(1, [(201, GIB)])
    clock = FakeClock()
    collector, registry = make(fake, clock=clock, proc_root=proc, root_pid=100,
                               slow_interval_seconds=1.0)
    for _ in range(6):  # the slow group alternates between the two GPUs
        collector.sample_once()
        clock.now += 0.5
    assert fake.count("nvmlDeviceGetComputeRunningProcesses") >= 4
    assert collector.engine_processes.scans == 2
    fake.set_processes(1, [])
    for _ in range(4):
        collector.sample_once()
        clock.now += 0.5
    assert collector.engine_processes.scans == 2
    # pid 201 left every GPU and was forgotten; the number now belongs to an engine child
    (proc / "201" / "stat").write_text("201 (python3) S 100 201 0 0 -1\n")
    fake.set_processes(1, [(201, 3 * GIB)])
    for _ in range(2):
        collector.sample_once()
        clock.now += 0.5
    uuid1 = UUID1.replace("1111", "0001")
    assert value(scrape(registry), "vllm_gpu_process_memory_used_bytes", gpu="1", uuid=uuid1,
                 name=NAME0, owner="engine") == 3 * GIB
    assert collector.engine_processes.scans == 3


def test_processes_without_a_memory_figure_count_but_add_no_bytes(tmp_path):
    proc = fake_proc(tmp_path, {1: 0, 100: 1})
    fake = fake_pynvml.FakeNvml(recording())
    fake.set_processes(0, [(100, None)])
    collector, registry = make(fake, proc_root=proc, root_pid=100)
    collector.sample_once()
    s = scrape(registry)
    assert value(s, "vllm_gpu_processes", **gpu0(owner="engine")) == 1
    assert value(s, "vllm_gpu_process_memory_used_bytes", **gpu0(owner="engine")) == 0


# --- CUDA_VISIBLE_DEVICES ------------------------------------------------------------------------

UUIDS = {0: "GPU-aaaa1111-0000", 1: "GPU-bbbb2222-0000", 2: "GPU-cccc3333-0000"}


@pytest.mark.parametrize("value_, expected", [
    (None, {0: 0, 1: 1, 2: 2}),
    ("", {}),
    ("2,0", {2: 0, 0: 1}),
    (" 1 ", {1: 0}),
    ("GPU-cccc3333-0000", {2: 0}),
    ("gpu-BBBB", {1: 0}),                    # a unique prefix, any case
    ("GPU-cccc,GPU-aaaa", {2: 0, 0: 1}),
    ("1,7,0", {1: 0}),                       # CUDA stops at the first invalid entry
    ("GPU-,1", {}),                          # an ambiguous prefix is invalid
    ("1,1", {1: 0}),
    ("-1", {}),
    ("MIG-dddd", {1: 0}),                    # a MIG instance maps to its parent GPU
])
def test_cuda_visible_devices_maps_cuda_ordinals_to_nvml_indices(value_, expected):
    assert map_cuda_visible_devices(value_, UUIDS, {"MIG-dddd-4444": 1}) == expected


def test_engine_visible_gpus_by_uuid_and_by_index_from_config_or_environment(monkeypatch):
    uuid1 = UUID1.replace("1111", "0001")
    collector, registry = make(fake_pynvml.FakeNvml(recording(gpus=2)),
                               cuda_visible_devices=uuid1)
    collector.sample_once()
    s = scrape(registry)
    assert value(s, "vllm_gpu_engine_visible", gpu="1", uuid=uuid1, name=NAME0, cuda_index="0") == 1
    assert value(s, "vllm_gpu_engine_visible", **gpu0(cuda_index="")) == 0

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    collector, registry = make(fake_pynvml.FakeNvml(recording(gpus=2)))
    collector.sample_once()
    s = scrape(registry)
    assert value(s, "vllm_gpu_engine_visible", gpu="1", uuid=uuid1, name=NAME0, cuda_index="0") == 1
    assert value(s, "vllm_gpu_engine_visible", **gpu0(cuda_index="1")) == 1


def test_memory_budget_is_ratio_times_total_less_reserved_on_the_engine_gpus_only(caplog):
    """vLLM's budget is gpu_memory_utilization x cudaMemGetInfo's total, which is NVML's total
    less what the driver reserves (480 MiB on an H100: docs/gpu-daemon-verification.md)."""
    uuid1 = UUID1.replace("1111", "0001")
    collector, registry = make(fake_pynvml.FakeNvml(recording(gpus=2)), cuda_visible_devices="0")
    collector.sample_once()
    assert "vllm_gpu_memory_budget_bytes" not in names(scrape(registry))
    collector.set_memory_budget_ratio(0.9)
    s = scrape(registry)
    memory = REC["nvmlDeviceGetMemoryInfo_v2"]
    total = memory["total"] - memory["reserved"]
    assert memory["reserved"] > 0
    assert value(s, "vllm_gpu_memory_budget_bytes", **gpu0()) == pytest.approx(0.9 * total)
    assert value(s, "vllm_gpu_memory_budget_bytes", gpu="1", uuid=uuid1, name=NAME0) is None
    with caplog.at_level(logging.WARNING, logger="exporter.gpu"):
        collector.set_memory_budget_ratio(1.5)
        collector.set_memory_budget_ratio("nonsense")
    assert len(caplog.records) == 2
    assert value(scrape(registry), "vllm_gpu_memory_budget_bytes", **gpu0()) == pytest.approx(
        0.9 * total)


# --- slow calls, MIG, XID events -----------------------------------------------------------------

def test_slow_calls_run_one_gpu_per_tick_at_the_slow_cadence_and_keep_their_value():
    fake = fake_pynvml.FakeNvml(recording(gpus=2))
    clock = FakeClock()
    collector, registry = make(fake, clock=clock, slow_interval_seconds=10.0)
    collector.sample_once()
    assert fake.count("nvmlDeviceGetTotalEnergyConsumption") == 1
    clock.now += 1
    collector.sample_once()
    assert fake.count("nvmlDeviceGetTotalEnergyConsumption") == 2  # now the other GPU
    for _ in range(5):
        clock.now += 1
        collector.sample_once()
    assert fake.count("nvmlDeviceGetTotalEnergyConsumption") == 2
    assert value(scrape(registry), "vllm_gpu_energy_joules_total", **gpu0()) is not None
    clock.now += 5
    collector.sample_once()
    assert fake.count("nvmlDeviceGetTotalEnergyConsumption") == 3
    assert fake.count("nvmlDeviceGetPcieThroughput") == 0  # opt-in


def test_pcie_throughput_when_switched_on():
    fake = fake_pynvml.FakeNvml(recording())
    collector, registry = make(fake, pcie_throughput=True, energy=False)
    collector.sample_once()
    s = scrape(registry)
    assert fake.count("nvmlDeviceGetTotalEnergyConsumption") == 0
    assert value(s, "vllm_gpu_pcie_throughput_bytes_per_second", **gpu0(direction="tx")) == \
        REC["nvmlDeviceGetPcieThroughput:0"] * 1024
    assert value(s, "vllm_gpu_pcie_throughput_bytes_per_second", **gpu0(direction="rx")) == \
        REC["nvmlDeviceGetPcieThroughput:1"] * 1024


def test_mig_instances_get_their_own_memory_series_and_map_to_their_gpu():
    fake = full_coverage_fake()
    uuid1 = UUID1.replace("1111", "0001")
    collector, registry = make(fake, cuda_visible_devices="MIG-bbbb")
    collector.sample_once()
    s = scrape(registry)
    mig = dict(gpu="1", uuid=uuid1, name=NAME0, mig_name="NVIDIA H200 MIG 1g.18gb")
    assert value(s, "vllm_gpu_mig_memory_used_bytes", mig="0", mig_uuid="MIG-aaaa", **mig) == GIB
    assert value(s, "vllm_gpu_mig_memory_total_bytes", mig="2", mig_uuid="MIG-bbbb", **mig) == \
        18 * GIB
    assert len([k for k in s if k[0] == "vllm_gpu_mig_memory_free_bytes"]) == 2
    assert value(s, "vllm_gpu_engine_visible", gpu="1", uuid=uuid1, name=NAME0, cuda_index="0") == 1
    assert not any(k[0].startswith("vllm_gpu_mig_") and dict(k[1])["gpu"] == "0" for k in s)


def test_xid_events_are_counted_by_code_on_their_own_thread(caplog):
    fake = full_coverage_fake()
    collector, registry = make(fake, xid_events=True, event_wait_ms=20)
    collector.sample_once()
    uuid1 = UUID1.replace("1111", "0001")
    with caplog.at_level(logging.WARNING, logger="exporter.gpu"):
        fake.emit_xid(1, 48)
        fake.emit_xid(1, 48)
        fake.emit_xid(0, 5000)
        assert wait_for(lambda: value(scrape(registry), "vllm_gpu_xid_errors_total", gpu="1",
                                      uuid=uuid1, name=NAME0, xid="48") == 2)
        assert wait_for(lambda: value(scrape(registry), "vllm_gpu_xid_errors_total",
                                      **gpu0(xid="other")) == 1)
    assert len([r for r in caplog.records if "XID 48" in r.getMessage()]) == 1
    started = time.monotonic()
    collector.sample_once()  # a tick is not held up by the waiting thread
    assert time.monotonic() - started < 0.5
    collector.stop()
    assert all(event_set.freed for event_set in fake.event_sets)


def test_xid_events_unsupported_is_shown_and_no_thread_waits():
    fake = fake_pynvml.FakeNvml(recording())
    fake.set_value(0, "nvmlDeviceGetSupportedEventTypes", 0)
    collector, registry = make(fake, xid_events=True)
    collector.sample_once()
    assert value(scrape(registry), "vllm_exporter_gpu_call_unsupported", gpu="0",
                 call="nvmlDeviceRegisterEvents") == 1
    assert all(event_set.freed for event_set in fake.event_sets)


# --- the thread and the config -------------------------------------------------------------------

def test_start_returns_at_once_samples_in_the_background_and_stop_shuts_nvml_down():
    fake = fake_pynvml.FakeNvml(recording())
    collector = GpuCollector(GpuConfig(interval_seconds=0.01, event_wait_ms=20),
                             root_pid=os.getpid(), nvml=fake)
    registry = CollectorRegistry()
    registry.register(collector)
    fake.init_gate = threading.Event()
    collector.start()
    # start() came back while nvmlInit was still waiting: NVML starts on the sampler thread.
    assert not fake.initialized
    assert wait_for(lambda: fake.count("nvmlInit") == 1)
    fake.init_gate.set()
    assert wait_for(lambda: fake.count("nvmlDeviceGetPowerUsage") >= 3)
    assert value(scrape(registry), "vllm_exporter_collector_up", collector="gpu") == 1
    started = time.monotonic()
    collector.stop(timeout=2.0)
    assert time.monotonic() - started < 2.0
    assert fake.count("nvmlShutdown") == 1
    assert not fake.initialized


def test_disabled_collector_starts_nothing():
    fake = fake_pynvml.FakeNvml(recording())
    collector = GpuCollector(GpuConfig(enabled=False), root_pid=os.getpid(), nvml=fake)
    collector.start()
    collector.stop()
    assert fake.calls == []


def test_config_problems_name_the_field():
    assert GpuConfig().problems() == []
    fields = {name for name, _ in GpuConfig(interval_seconds=0, event_wait_ms=5,
                                            retry_initial_seconds=10,
                                            retry_max_seconds=1).problems()}
    assert fields == {"interval_seconds", "event_wait_ms", "retry_max_seconds"}
    assert [name for name, _ in GpuConfig(interval_seconds=5,
                                          slow_interval_seconds=1).problems()] == \
        ["slow_interval_seconds"]


def test_the_gpu_section_of_the_yaml_config_is_type_checked(tmp_path):
    from exporter.config import ConfigError, load_config
    path = tmp_path / "config.yaml"
    path.write_text("gpu:\n  interval_seconds: 2\n  pcie_throughput: true\n"
                    "  cuda_visible_devices: GPU-abc\n")
    gpu = load_config(path).gpu
    assert (gpu.interval_seconds, gpu.pcie_throughput, gpu.cuda_visible_devices) == \
        (2.0, True, "GPU-abc")
    path.write_text("gpu:\n  slow_interval_seconds: 0.5\n")
    with pytest.raises(ConfigError, match="gpu.slow_interval_seconds"):
        load_config(path)


def test_the_config_loads_without_the_collector_or_nvml():
    """exporter/config.py reads GpuConfig from exporter.gpu.config, which stands alone."""
    code = ("import sys, exporter.config; "
            "print(sorted(m for m in sys.modules if m.startswith(('exporter.gpu', 'pynvml'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['exporter.gpu', 'exporter.gpu.config']"


def test_the_benchmark_runs_against_the_fake(tmp_path):
    import json
    import subprocess
    result = subprocess.run([sys.executable, "-m", "bench.bench_gpu_tick", "--fake",
                             "--ticks", "50",
                             "--slow-ticks", "5", "--json", str(tmp_path / "bench.json")],
                            capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["nvml"].startswith("fake")
    assert report["regular"]["median_us_per_tick_per_gpu"] > 0
    assert {row["call"] for row in report["regular_calls"]} >= {
        "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetPowerUsage"}
    assert "nvmlDeviceGetTotalEnergyConsumption" in {row["call"] for row in report["slow_calls"]}


def test_docs_describe_every_family_and_every_option():
    import dataclasses
    text = (Path(__file__).parent.parent / "docs" / "gpu.md").read_text()
    for spec in GPU_FAMILIES:
        assert f"`{spec.name}`" in text, spec.name
    for option in dataclasses.fields(GpuConfig):
        assert f"| `{option.name}` |" in text, option.name


def test_the_metrics_port_text_is_the_collectors_families_and_follows_every_change():
    """render() (what the metrics port serves) formats a tick once and equals prometheus-client's
    text for the same families; a new tick, a budget or an error count makes it anew."""
    from prometheus_client.parser import text_string_to_metric_families as parse

    collector, registry = make(fake_pynvml.FakeNvml(recording()))
    collector.sample_once()

    def parsed(text: str) -> dict:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in parse(text) for s in family.samples}

    first = collector.render(False)
    assert collector.render(False) is first  # the same tick: not formatted again
    assert parsed(first) == scrape(registry)
    with collector.rendered_apart():  # the port renders it itself: collect() yields nothing
        assert list(collector.collect()) == []
    collector.set_memory_budget_ratio(0.5)
    assert ("vllm_gpu_memory_budget_bytes", tuple(sorted(gpu0().items()))) in \
        parsed(collector.render(False))
    collector._count_error("nvmlDeviceGetPowerUsage", RuntimeError("boom"))
    assert parsed(collector.render(False))[
        ("vllm_exporter_gpu_errors_total", (("call", "nvmlDeviceGetPowerUsage"),))] == 1
    before_tick = collector.render(False)
    collector.sample_once()
    assert collector.render(False) is not before_tick  # a new tick is formatted anew
    assert parsed(collector.render(False)) == scrape(registry)


# --- golden exposition ---------------------------------------------------------------------------

GOLDEN_H200 = Path(__file__).parent / "golden" / "gpu_h200.prom"


class SteppingTimer:
    """A perf_counter stand-in that advances 2.5 ms per call, so a tick takes exactly 2.5 ms."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.0025
        return self.now


def golden_h200_exposition(proc_root: Path) -> str:
    """The collector's /metrics text after one tick on the recorded H200, every input fixed:
    the recorded compute process (pid 423) is below the root pid, so it is the engine's; GPU 0
    is the engine's (CUDA_VISIBLE_DEVICES "0", budget 0.9); PCIe is on so that every family the
    H200 answers for is present; the tick's duration (2.5 ms) and the last-success time are
    fixed clocks. Not exercised here: MIG, XID events, errors (covered above)."""
    proc = fake_proc(proc_root, {1: 0, 100: 1, 423: 100})
    collector = GpuCollector(
        GpuConfig(cuda_visible_devices="0", pcie_throughput=True, xid_events=False),
        root_pid=100, nvml=fake_pynvml.FakeNvml(recording()), proc_root=str(proc),
        clock=FakeClock(), timer=SteppingTimer(), wall_clock=lambda: 1_767_225_600.0)
    collector.sample_once()
    collector.set_memory_budget_ratio(0.9)
    return collector.render(False)


def test_the_exposition_on_the_recorded_h200_matches_the_golden_file(tmp_path):
    """Byte for byte: names, help, types, labels, order and value formatting of every family.

    After an intended change, regenerate the file and review its diff:
        UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_gpu.py -k golden
    """
    text = golden_h200_exposition(tmp_path)
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN_H200.parent.mkdir(exist_ok=True)
        GOLDEN_H200.write_text(text)
    assert text == GOLDEN_H200.read_text(), \
        "the GPU exposition changed; see this test's docstring to regenerate the golden file"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_check_metrics_finds_no_problem_in_the_golden_exposition():
    result = subprocess.run(["promtool", "check", "metrics"], input=GOLDEN_H200.read_text(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), \
        result.stdout + result.stderr
