"""The readers: one small function per NVML call (group), one group per module.

A reader has one interface, `Reader`: it reads one GPU of an NVML session and adds its samples
to `out`, or raises one of the session's exceptions (Unavailable, DeviceLost, SessionLost). A
new GPU reading is a function in the module of its group (or a new module), added to
TICK_READERS or to `slow_readers()` below, with its families in ../families.py.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

from ..config import GpuConfig
from ..processes import EngineProcesses
from ..samples import Samples
from ..session import Device, NvmlSession, Unavailable
from .clocks import read_clocks, read_performance_state, read_throttle_reasons
from .ecc import read_ecc, read_remapped_rows
from .memory import read_memory
from .mig import read_mig_memory
from .pcie import read_pcie_throughput
from .power import read_energy, read_power, read_power_limit, read_temperature
from .processes import read_processes
from .utilization import read_utilization

Reader = Callable[[NvmlSession, Device, Samples], None]

# Every tick: cheap (about 1.5-10 us each on an H200) and fast-moving.
TICK_READERS: tuple[Reader, ...] = (
    read_memory, read_utilization, read_power, read_temperature, read_clocks,
    read_throttle_reasons, read_performance_state, read_mig_memory,
)
# Every slow_interval_seconds, one GPU per tick: slow-moving (limits, error counters, process
# lists: the process list alone costs ~30-100 us) or slow to read (energy ~3 ms, PCIe ~21 ms).
# Processes, energy and PCIe are added by `slow_readers()` according to the config.
SLOW_READERS: tuple[Reader, ...] = (read_power_limit, read_ecc, read_remapped_rows)


def slow_readers(config: GpuConfig, engine: EngineProcesses) -> list[Reader]:
    """SLOW_READERS plus the optional ones the config switches on."""
    readers = list(SLOW_READERS)
    if config.processes:
        readers.append(partial(read_processes, engine=engine))
    if config.energy:
        readers.append(read_energy)
    if config.pcie_throughput:
        readers.append(read_pcie_throughput)
    return readers


def read_if_available(reader: Reader, s: NvmlSession, dev: Device, out: Samples) -> None:
    """Run one reader; an unavailable reading only leaves its own series out of this tick."""
    try:
        reader(s, dev, out)
    except Unavailable:
        pass
