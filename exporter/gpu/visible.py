"""CUDA_VISIBLE_DEVICES -> NVML indices: which GPUs the engine uses, parsed the way CUDA parses
the variable. See docs/gpu.md#which-gpus-the-engine-uses-cuda_visible_devices."""

from __future__ import annotations


def map_cuda_visible_devices(value: str | None, gpu_uuids: dict[int, str],
                             mig_parents: dict[str, int] | None = None) -> dict[int, int]:
    """NVML index -> CUDA ordinal of every GPU a process with this CUDA_VISIBLE_DEVICES sees.

    Entries are NVML-order indices or (prefixes of) GPU-/MIG- UUIDs, as CUDA accepts them; like
    CUDA, parsing stops at the first entry that matches nothing. A MIG UUID maps to its parent
    GPU. Integer entries assume CUDA enumerates in PCI bus order, as NVML does (true with
    CUDA_DEVICE_ORDER=PCI_BUS_ID or identical GPUs); UUIDs are exact either way.
    """
    if value is None:
        return {index: ordinal for ordinal, index in enumerate(sorted(gpu_uuids))}
    by_uuid = {uuid.lower(): index for index, uuid in gpu_uuids.items()}
    by_uuid.update({uuid.lower(): index for uuid, index in (mig_parents or {}).items()})
    mapping: dict[int, int] = {}
    for entry in (e.strip() for e in value.split(",")):
        index = _match_visible_entry(entry, gpu_uuids, by_uuid)
        if index is None or index in mapping:
            break
        mapping[index] = len(mapping)
    return mapping


def _match_visible_entry(entry: str, gpu_uuids: dict[int, str],
                         by_uuid: dict[str, int]) -> int | None:
    if entry.isdigit():
        index = int(entry)
        return index if index in gpu_uuids else None
    prefix = entry.lower()
    if not prefix.startswith(("gpu-", "mig-")):
        return None
    matches = {index for uuid, index in by_uuid.items() if uuid.startswith(prefix)}
    return matches.pop() if len(matches) == 1 else None

