"""Where one request runs: its decode worker, and its prefill there or on a prefill worker (pure).

The router is the one owner of placement. For each ``RouteRequest`` ``place`` picks, from the
live workers etcd lists:

1. the decode (or aggregated) worker, by ``Router.route`` over the serving pool;
2. whether the prompt is prefilled remotely: only if the model has prefill workers that can
   send KV, the decode worker can receive it (a ``kv_agent``), ``DisaggPolicy.is_remote``
   says the uncached part of the prompt is worth the transfer, and
   ``DisaggPolicy.is_worth_the_wait`` says the prefill pool's queue is not much longer than
   the decode worker's own;
3. if so, the prefill worker, by ``Router.route`` over the prefill pool with its own policy,
   kept only if its own queue (not the pool's shortest) is worth the wait.

Both choices are recorded as the chosen workers' pending load. A decode worker whose prompt
is prefilled elsewhere is charged the prompt's KV blocks but no prefill work; a remote
prefill worker is charged its uncached blocks. The decode worker follows the answer: it
prefills remotely on ``Placement.prefill``'s worker when there is one, and itself otherwise.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from proto.messages import SERVING_ROLES, BlockHash, InstanceId, WorkerInfo, WorkerRole
from shared.errors import Unavailable
from shared.routing.cost import Decision, RoutingPolicy
from shared.routing.disagg import DisaggPolicy
from shared.routing.router import Router


@dataclass(frozen=True, slots=True)
class Placement:
    """The decode decision, and the prefill decision when the prefill runs remotely."""

    decode: Decision
    num_decode_cached_tokens: int  # the decode worker's cached prefix, as the router sees it
    prefill: Decision | None = None  # None: the decode worker prefills the prompt itself

    @property
    def is_remote_prefill(self) -> bool:
        return self.prefill is not None


def place(
    router: Router,
    workers: Iterable[WorkerInfo],
    model: str,
    block_hashes: Sequence[BlockHash],
    num_prompt_tokens: int,
    *,
    block_size: int,
    disagg: DisaggPolicy,
    prefill_policy: RoutingPolicy | None = None,
) -> Placement:
    """Place a prompt of ``num_prompt_tokens`` (whose full blocks hash to ``block_hashes``)
    for ``model`` on ``workers``; draining workers and other models' are skipped.

    Raises ``Unavailable`` when no worker serves the model. ``prefill_policy`` weighs the
    prefill pool (default: the router's own policy).
    """
    serving: dict[InstanceId, WorkerInfo] = {}
    prefill_ids: list[InstanceId] = []
    for info in workers:
        if info.model != model or info.is_draining:
            continue
        if info.role in SERVING_ROLES:
            serving[info.worker_id] = info
        elif info.role is WorkerRole.PREFILL and info.kv_agent:
            prefill_ids.append(info.worker_id)
    if not serving:
        raise Unavailable(f"no live worker serves model {model!r}")
    decode = router.route(block_hashes, list(serving), record=False)
    num_cached_tokens = decode.overlap_blocks * block_size
    prefill: Decision | None = None
    if (
        prefill_ids
        and serving[decode.worker_id].kv_agent
        and disagg.is_remote(num_prompt_tokens, num_cached_tokens)
    ):
        # The prefill worker is chosen by its cost (cache hit and load); the prompt goes
        # there only if that worker's queue, not the pool's shortest, is worth the wait.
        candidate = router.route(block_hashes, prefill_ids, policy=prefill_policy, record=False)
        if disagg.is_worth_the_wait(
            _prefill_wait_s(router, candidate.worker_id, block_size),
            _prefill_wait_s(router, decode.worker_id, block_size),
        ):
            router.commit(candidate, block_hashes)
            prefill = candidate
    router.commit(decode, block_hashes, 0 if prefill is not None else None)
    return Placement(decode=decode, num_decode_cached_tokens=num_cached_tokens, prefill=prefill)


def _prefill_wait_s(router: Router, worker_id: InstanceId, block_size: int) -> float:
    load = router.load_of(worker_id)
    return 0.0 if load is None else load.prefill_wait_s(block_size)
