"""A test-only KV connector whose loads are asynchronous: vLLM's ExampleConnector, with the
load of a stored prompt's KV cache reported finished only a fixed delay after it started.

Why: the families that count requests waiting for an asynchronous KV load
(vllm_requests_waiting_kv_fetch, from SchedulerStats.num_kv_fetch_reqs_by_stage, and the
`deferred` waiting reason, from num_skipped_waiting_reqs) move only with a connector that
answers load_kv_async=True, and none that vLLM ships runs on the CPU build. This one does.

What it fakes: only the timing of the load. The KV still comes from ExampleConnector's
safetensors files (saved by the first request of a prompt, as ExampleConnector does), written
into the blocks the scheduler allocated for the load, so the request's output stays right.

The protocol (vLLM 0.32's scheduler, WAITING_FOR_REMOTE_KVS):

* scheduler side: `get_num_new_matched_tokens` answers ExampleConnector's hit with
  load_kv_async=True. The scheduler then allocates the hit's blocks, calls
  `update_state_after_alloc` (here: the load is noted with those blocks), moves the request to
  WAITING_FOR_REMOTE_KVS (stage in_progress; counted deferred) without scheduling it, and the
  next `build_connector_meta` sends the load to the worker. ExampleConnector itself would only
  load requests scheduled this step, so the asynchronous loads travel in a list of their own.
* worker side: `start_load_kv` (called even in a step with nothing to run) writes the files'
  KV into those blocks at once and notes the time; `get_finished` reports the request as
  finished receiving once `async_load_delay_seconds` (kv_connector_extra_config, default
  1.5 s) have passed. The scheduler then marks it completed_waiting and, in its next step,
  schedules it from the loaded tokens on.

Load it with kv_transfer_config {"kv_connector": "AsyncExampleConnector",
"kv_connector_module_path": "testsupport.async_kv_connector", "kv_role": "kv_both",
"kv_connector_extra_config": {"shared_storage_path": DIR, "async_load_delay_seconds": 1.5}}
(the repository root on the engine's PYTHONPATH). Limits: no MLA models (with no forward pass
there is no attention metadata to tell the layout), one KV cache group, no failure reporting.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch

from vllm.distributed.kv_transfer.kv_connector.v1.example_connector import (
    ExampleConnector,
    ExampleConnectorMetadata,
    align_to_block_size,
)
from vllm.logger import init_logger

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

# Under "vllm." so that vLLM's logging configuration prints it in the engine's log.
logger = init_logger(f"vllm.{__name__}")

DELAY_KEY = "async_load_delay_seconds"
DEFAULT_DELAY_SECONDS = 1.5


@dataclass
class AsyncLoad:
    """One asynchronous load: the stored prefix (the key of its files) and its blocks."""
    req_id: str
    token_ids: torch.Tensor
    block_ids: list[int]
    mm_hashes: list[str]


@dataclass
class AsyncExampleConnectorMetadata(ExampleConnectorMetadata):
    # ExampleConnector's stores and synchronous loads stay in `requests`.
    async_loads: list[AsyncLoad] = field(default_factory=list)


class AsyncExampleConnector(ExampleConnector):

    def __init__(self, vllm_config: "VllmConfig", role: "KVConnectorRole",
                 kv_cache_config: "KVCacheConfig"):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        if vllm_config.model_config.use_mla:
            raise ValueError("AsyncExampleConnector does not support MLA models")
        self._delay = float(self._kv_transfer_config.get_from_extra_config(
            DELAY_KEY, DEFAULT_DELAY_SECONDS))
        self._loads_to_send: list[AsyncLoad] = []  # scheduler side
        self._loads_due: dict[str, float] = {}  # worker side: request id -> monotonic time

    # --- scheduler side ------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: "Request",
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        tokens, _ = super().get_num_new_matched_tokens(request, num_computed_tokens)
        return tokens, bool(tokens and tokens > 0)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        # Every hit is answered asynchronously, so external tokens here mean a load to start
        # (not one for ExampleConnector's `_requests_need_load`, which it expects among this
        # step's scheduled requests).
        if num_external_tokens <= 0:
            return
        prompt = list(request.prompt_token_ids or [])
        stored = align_to_block_size(len(prompt) - 1, self._block_size)  # as the hit check
        self._loads_to_send.append(AsyncLoad(
            req_id=request.request_id,
            token_ids=torch.tensor(prompt[:stored]),
            block_ids=list(blocks.get_block_ids()[0][:stored // self._block_size]),
            mm_hashes=[f.identifier for f in request.mm_features]))

    def build_connector_meta(self, scheduler_output: "SchedulerOutput"
                             ) -> AsyncExampleConnectorMetadata:
        base = super().build_connector_meta(scheduler_output)
        meta = AsyncExampleConnectorMetadata(requests=base.requests,
                                             async_loads=self._loads_to_send)
        self._loads_to_send = []
        return meta

    # --- worker side ---------------------------------------------------------------------
    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, AsyncExampleConnectorMetadata)
        if meta.requests:  # ExampleConnector's own work (it warns in a step without forward)
            super().start_load_kv(forward_context, **kwargs)
        for load in meta.async_loads:
            self._write_kv(forward_context, load)
            self._loads_due[load.req_id] = time.monotonic() + self._delay

    def _write_kv(self, forward_context: "ForwardContext", load: AsyncLoad) -> None:
        size = self._block_size
        num_tokens = len(load.token_ids)
        # Token i of the prefix goes to block block_ids[i // size], offset i % size.
        block_idxs = torch.tensor(load.block_ids).repeat_interleave(size)[:num_tokens]
        offsets = torch.arange(size).repeat(len(load.block_ids))[:num_tokens]
        for layer_name, layer in forward_context.no_compile_layers.items():
            kv_cache = getattr(layer, "kv_cache", None)
            if kv_cache is None:  # not an attention layer
                continue
            filename = self._generate_filename_debug(layer_name, load.token_ids,
                                                     load.mm_hashes)
            stored = safetensors.torch.load_file(filename)["kv_cache"]
            kv_cache[block_idxs.to(kv_cache.device), :, offsets.to(kv_cache.device)] = \
                stored.to(kv_cache.device)
        logger.info("Async load of %d tokens for %s written; reported finished in %.1f s",
                    num_tokens, load.req_id, self._delay)

    def get_finished(self, finished_req_ids: set[str]
                     ) -> tuple[set[str] | None, set[str] | None]:
        now = time.monotonic()
        done = {req_id for req_id, due in self._loads_due.items() if due <= now}
        for req_id in done:
            del self._loads_due[req_id]
        return None, done or None
