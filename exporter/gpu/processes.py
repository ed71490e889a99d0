"""Which compute processes on a GPU are the engine's: the daemon's pid and every process below
it, found through /proc parent pids (no psutil). See docs/gpu.md#engine-attribution."""

from __future__ import annotations

import os
from typing import Iterable


def read_parent_pids(proc_root: str = "/proc") -> dict[int, int]:
    """pid -> parent pid for every process under `proc_root` (processes that exit are skipped)."""
    parents = {}
    try:
        entries = os.listdir(proc_root)
    except OSError:
        return parents
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(os.path.join(proc_root, entry, "stat"), "rb") as f:
                stat = f.read()
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            parents[int(entry)] = int(stat[stat.rindex(b")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return parents


def descendants(root_pid: int, parents: dict[int, int]) -> set[int]:
    """`root_pid` and every process below it."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = {root_pid}, [root_pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in tree:
                tree.add(child)
                todo.append(child)
    return tree


class EngineProcesses:
    """Answers 'which of these pids are the engine's?': the root pid and its descendants.

    /proc is scanned at most once per call, and only when NVML reports a pid not seen before;
    a pid keeps its owner as long as some GPU still lists it (see `retain`).
    """

    def __init__(self, root_pid: int, proc_root: str = "/proc"):
        self.root_pid = root_pid
        self.proc_root = proc_root
        self.scans = 0
        self._owner: dict[int, bool] = {}

    def owners(self, pids: Iterable[int]) -> dict[int, bool]:
        """pid -> True where it is the engine's."""
        pids = list(pids)
        if any(pid not in self._owner for pid in pids):
            tree = descendants(self.root_pid, read_parent_pids(self.proc_root))
            self.scans += 1
            for pid in pids:
                self._owner.setdefault(pid, pid in tree)
        return {pid: self._owner[pid] for pid in pids}

    def retain(self, pids: set[int]) -> None:
        """Forget every pid no GPU lists any more (a later process may reuse the number)."""
        for pid in set(self._owner) - pids:
            del self._owner[pid]

