"""Baton's KV connector for vLLM: disaggregated prefill and decode with ``--engine vllm``
(docs/decisions/0005-vllm.md, "The Baton KV connector").

Two halves, as Baton's verbs need them:

- ``BatonConnector`` is the class vLLM loads (``kv_transfer_config`` names this module). Its
  scheduler half lends vLLM's block allocation to Baton: a request the adapter added to hold
  its KV keeps its blocks after it finishes (``request_finished``), and a request the adapter
  reserved asks for its prompt's KV to be loaded from outside (``get_num_new_matched_tokens``),
  so that vLLM allocates its blocks (``update_state_after_alloc``: Baton's ``Reservation``) and
  parks it in its wait-for-remote-KV state. Its worker half moves no bytes: it reports, each
  step, the holds Baton released (done sending: vLLM frees the blocks) and the reservations
  Baton committed or gave up (done receiving: vLLM schedules or frees them).
- ``VllmKVConnector`` is Baton's ``KVConnector`` for the worker (``make_connector``): it
  registers vLLM's per-layer KV tensors with the transfer agent, describes blocks and pulls
  peers' blocks with one-sided reads, outside vLLM's step, as for every Baton engine.

The engine core runs in the adapter's process and thread (``multiprocess_mode=False``), so the
three meet in an ``EngineLink`` found by a key unique per engine
(``kv_connector_extra_config``). vLLM makes one worker-side connector per process and shares it
between engines, so that half keeps no state of its own: what it reports comes in the metadata
the scheduler half built for the same step.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.request import RequestStatus

from shared.engine.interface import Reservation
from shared.engine.kv_connector import KVSource
from shared.kv_transfer import TransferAgent, TransferError

logger = logging.getLogger(__name__)

CONNECTOR_NAME: Final = "BatonConnector"
KEY_FIELD: Final = "baton_engine_key"  # in kv_connector_extra_config
MODE_FIELD: Final = "baton"  # in a request's kv_transfer_params: HOLD or RESERVE
HOLD: Final = "hold"
RESERVE: Final = "reserve"


@dataclass(slots=True)
class Reserved:
    """A request vLLM allocated blocks for, waiting for its prompt's KV."""

    block_ids: list[int]
    num_cached_tokens: int  # vLLM's own prefix hit
    request: Any  # vllm.v1.request.Request: the adapter writes the first token into it


@dataclass(slots=True)
class EngineLink:
    """What the adapter and the connector halves of one engine share (by vLLM request id)."""

    held: dict[str, list[int]] = field(default_factory=dict)  # finished, blocks kept
    reserved: dict[str, Reserved] = field(default_factory=dict)  # waiting for their KV
    full_hits: set[str] = field(default_factory=set)  # nothing to load: cached here already
    to_send: set[str] = field(default_factory=set)  # holds released, to report as sent
    to_recv: set[str] = field(default_factory=set)  # reservations ended, to report as received
    kv_caches: dict[str, Any] = field(default_factory=dict)  # layer name -> torch.Tensor

    @property
    def has_reports(self) -> bool:
        return bool(self.to_send or self.to_recv)


# Every engine of this process, by key; and the key of the engine being started (vLLM gives
# its KV tensors to the process's one worker-side connector while that engine starts). Module
# state because vLLM builds the connector itself, from a class path and its own config.
_links: dict[str, EngineLink] = {}
_starting: list[str] = []


def open_link(key: str) -> EngineLink:
    """A new link for the engine about to start under ``key`` (``close_link`` when it stops)."""
    link = EngineLink()
    _links[key] = link
    _starting.append(key)
    return link


def started(key: str) -> None:
    """The engine under ``key`` has its KV tensors: later registrations are not its."""
    if key in _starting:
        _starting.remove(key)


def close_link(key: str) -> None:
    started(key)
    _links.pop(key, None)


@dataclass(slots=True)
class BatonMetadata(KVConnectorMetadata):  # type: ignore[misc,unused-ignore]
    """One step's reports, from the scheduler half to the worker half."""

    sent: set[str]
    received: set[str]


class BatonConnector(KVConnectorBase_V1):  # type: ignore[misc,unused-ignore]
    """vLLM's side of Baton's hold / reserve / commit / release (see the module docstring)."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        key = vllm_config.kv_transfer_config.kv_connector_extra_config[KEY_FIELD]
        # The worker half is made once per process: it must not keep this engine's link.
        self._link = _links[key] if role == KVConnectorRole.SCHEDULER else None

    # --- scheduler half -------------------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """A reserved request loads every prompt token past vLLM's own hit, asynchronously.
        Its prompt ends with the first output token, which vLLM computes itself, so the hit
        can cover the whole real prompt: then nothing is loaded (the adapter adds the request
        afresh at commit), and it is left unscheduled meanwhile."""
        if _mode(request) != RESERVE:
            return 0, False
        num_to_load = request.num_tokens - 1 - num_computed_tokens
        if num_to_load <= 0:
            assert self._link is not None
            self._link.full_hits.add(request.request_id)
            return None, False
        return num_to_load, True

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if num_external_tokens <= 0 or _mode(request) != RESERVE:
            return
        assert self._link is not None
        block_ids = list(blocks.get_block_ids()[0])
        num_cached = request.num_tokens - 1 - num_external_tokens
        self._link.reserved[request.request_id] = Reserved(block_ids, num_cached, request)

    def build_connector_meta(self, scheduler_output: Any) -> BatonMetadata:
        link = self._link
        assert link is not None
        meta = BatonMetadata(sent=link.to_send, received=link.to_recv)
        link.to_send = set()
        link.to_recv = set()
        return meta

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, Any]:
        """A held request that ran to its end keeps its blocks until Baton releases it."""
        if _mode(request) != HOLD or request.status not in _RAN_TO_END:
            return False, None
        assert self._link is not None
        self._link.held[request.request_id] = list(block_ids)
        return True, None

    # --- worker half ----------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        if not _starting:
            logger.warning("vLLM registered KV caches while no Baton engine was starting")
            return
        _links[_starting[-1]].kv_caches = dict(kv_caches)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if not self.has_connector_metadata():
            return None, None
        meta = self._get_connector_metadata()
        assert isinstance(meta, BatonMetadata)
        return meta.sent or None, meta.received or None

    # Baton moves the bytes itself, outside the step: nothing to do in the forward pass.
    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        return

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(
        self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return

    def wait_for_save(self) -> None:
        return


_RAN_TO_END: Final = (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED)


def _mode(request: Any) -> str | None:
    params = request.kv_transfer_params
    return params.get(MODE_FIELD) if isinstance(params, dict) else None


@dataclass(frozen=True, slots=True)
class _Range:
    """One layer's K or V: where block 0's bytes start, the step to the next block, the size."""

    base: int
    stride: int
    length: int


def block_ranges(kv_caches: dict[str, Any], num_blocks: int) -> list[_Range]:
    """Per layer, in vLLM's order, the K and then the V range of a block. Each layer tensor is
    ``[2, num_blocks, ...]`` (CPU) or ``[num_blocks, 2, ...]``, one block's K (or V) contiguous;
    ``ValueError`` for any other layout."""
    ranges: list[_Range] = []
    for name, tensor in kv_caches.items():
        shape = tuple(tensor.shape)
        if len(shape) >= 3 and shape[0] == 2 and shape[1] == num_blocks:
            kv_dim, block_dim = 0, 1
        elif len(shape) >= 3 and shape[0] == num_blocks and shape[1] == 2:
            kv_dim, block_dim = 1, 0
        else:
            raise ValueError(f"layer {name}: KV tensor of shape {shape} is not [2, blocks, ...]")
        one = tensor.select(block_dim, 0).select(0, 0)  # one block's K
        if not one.is_contiguous():
            raise ValueError(f"layer {name}: a block's K is not contiguous ({tensor.stride()})")
        size = tensor.element_size()
        for kv in range(2):
            base = tensor.select(kv_dim, kv).data_ptr()
            ranges.append(_Range(base, tensor.stride(block_dim) * size, one.numel() * size))
    return ranges


class VllmKVConnector:
    """Baton's ``KVConnector`` over vLLM's per-layer KV tensors.

    A vLLM block (``block_size`` tokens) is described as ``2 x num_layers`` descriptors, K then
    V of each layer in order; ``Reservation`` and held block ids are vLLM's, and a
    reservation's ``num_cached_tokens`` counts whole vLLM blocks.
    """

    def __init__(self, agent: TransferAgent, ranges: list[_Range], block_size: int) -> None:
        self.agent = agent
        self.ranges = ranges
        self.block_size = block_size
        self._known: dict[str, bytes] = {}  # peer agent name -> metadata added

    @classmethod
    def register(
        cls, agent: TransferAgent, kv_caches: dict[str, Any], num_blocks: int, block_size: int
    ) -> "VllmKVConnector":
        """Register every KV tensor's memory with ``agent``; ``ValueError`` where it cannot
        serve it (shm agents serve only memory they allocated)."""
        ranges = block_ranges(kv_caches, num_blocks)
        seen: set[int] = set()
        for tensor in kv_caches.values():
            storage = tensor.untyped_storage()
            if storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            if tensor.device != torch.device("cpu"):
                raise ValueError(f"vLLM's KV cache is on {tensor.device}; only cpu is served")
            agent.register(storage.data_ptr(), storage.nbytes(), "cpu")
        return cls(agent, ranges, block_size)

    def describe(self, block_ids: Sequence[int]) -> list[tuple[int, int]]:
        return [(r.base + b * r.stride, r.length) for b in block_ids for r in self.ranges]

    async def pull(self, source: KVSource, reservation: Reservation) -> int:
        ranges = self.ranges
        per_block = len(ranges)
        descriptors = source.block_descriptors
        if len(descriptors) % per_block:
            raise TransferError(
                f"the peer described {len(descriptors)} ranges; ours are {per_block} per block "
                "(a model with another layer count?)",
                remote_name=source.agent_name,
            )
        num_blocks = len(descriptors) // per_block
        first = reservation.num_cached_tokens // self.block_size
        if first >= num_blocks:
            return 0
        if len(reservation.block_ids) < num_blocks:
            raise TransferError(
                f"the peer described {num_blocks} blocks; {len(reservation.block_ids)} "
                "were reserved",
                remote_name=source.agent_name,
            )
        transfers = []
        for index in range(first, num_blocks):
            block_id = reservation.block_ids[index]
            for offset, r in enumerate(ranges):
                address, length = descriptors[index * per_block + offset]
                if length != r.length:
                    raise TransferError(
                        f"the peer's block range has {length} bytes; ours have {r.length}",
                        remote_name=source.agent_name,
                    )
                transfers.append((address, r.base + block_id * r.stride, length))
        if self._known.get(source.agent_name) != source.agent_metadata:
            self.agent.add_remote(source.agent_metadata)
            self._known[source.agent_name] = source.agent_metadata
        await self.agent.read(source.agent_name, transfers)
        return num_blocks - first
