"""Typed wire messages: the contract between Baton's processes.

Every message is a msgspec Struct encoded as msgpack and decoded against the union of the
types a subscriber accepts, so a malformed payload fails with the bad field's path instead
of travelling on as a dict. Evolution rules (see docs/protocol.md):

- New fields go at the end and have defaults; never change a field's type or a tag.
- To retire a field, stop sending it and keep decoding it.
- Never use ``forbid_unknown_fields``: older readers must skip newer fields.
- Enums on the wire are ``IntEnum``.
- Only measured hot structs (``TokenChunk``, ``TokenBatch``) are ``array_like``; their field
  order is then part of the contract, so they only ever grow at the end.
"""

from enum import IntEnum
from typing import NewType

import msgspec

RequestId = NewType("RequestId", str)
InstanceId = NewType("InstanceId", str)
BlockHash = NewType("BlockHash", int)


class Message(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="type"):
    """Base of every bus message; decoded by its tag."""


class FinishReason(IntEnum):
    """Why a stream ended; mapped to OpenAI's ``finish_reason`` by the frontend."""

    STOP = 1  # EOS token, stop token or stop string
    LENGTH = 2  # max_tokens or the context limit
    ABORT = 3  # the client or an operator cancelled it
    ERROR = 4  # the worker failed it; TokenChunk.error says why
    SHED = 5  # its time-to-first-token deadline passed before it started: answered, not served


class ErrorCode(IntEnum):
    """Error classes that cross the wire; shared/errors.py maps each to an exception."""

    INVALID_REQUEST = 1
    OVERLOADED = 2
    UNAVAILABLE = 3
    DEADLINE_EXCEEDED = 4
    CANCELLED = 5
    ENGINE_ERROR = 6
    NOT_FOUND = 7
    SHED = 8  # no worker can meet the request's objectives; retry after ``retry_after_s``


class WorkerRole(IntEnum):
    AGGREGATED = 1  # prefill and decode in one engine
    PREFILL = 2
    DECODE = 3


# Roles that take GenerateRequests (a prefill worker only ever takes PrefillRequests).
SERVING_ROLES = (WorkerRole.AGGREGATED, WorkerRole.DECODE)


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What the engine needs to generate; stop strings stay in the frontend."""

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] = []
    # Engine features (``ModelCard.features`` says which engines have them; the frontend
    # refuses a request whose model lacks one). Penalties as vLLM applies them: presence and
    # frequency over the output tokens, repetition over prompt and output (HF's rule).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = {}
    # Report each output token's log-probability and this many likeliest alternatives
    # (0: the chosen token's only; None: none).
    logprobs: int | None = None
    # Constrain the output to JSON matching this JSON Schema (its text); needs
    # FEATURE_STRUCTURED_OUTPUTS. ``response_format`` json_object is the schema of any object.
    json_schema: str | None = None


# What an engine can do beyond plain sampling; a worker lists its engine's in ``ModelCard``.
FEATURE_LOGPROBS = "logprobs"
FEATURE_PENALTIES = "penalties"
FEATURE_LOGIT_BIAS = "logit_bias"
FEATURE_STRUCTURED_OUTPUTS = "structured_outputs"


class TokenLogprobs(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One output token's log-probability under the model's distribution (before penalties,
    bias and temperature: vLLM's default), and the likeliest tokens at its position as
    (token id, log-probability) pairs, likeliest first."""

    logprob: float
    top: list[tuple[int, float]] = []


# --- requests: frontend -> worker -------------------------------------------------------------


class KVHandle(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Where a running sequence's KV lies on a worker that gave it up (it is draining): that
    worker holds the blocks under ``request_id`` until a peer has read them and sends
    ``KVRelease``, or a hold timeout passes. The blocks hold the KV of the sequence's first
    ``num_kv_tokens`` tokens (prompt and output), one descriptor per block, in order."""

    worker_id: InstanceId
    request_id: RequestId
    kv_agent: str
    block_descriptors: list[tuple[int, int]]
    num_kv_tokens: int


class GenerateRequest(Message, frozen=True, tag="generate"):
    """Ask a worker to run a request. Sent with a reply subject; the worker answers a refusal
    there at once with ``ErrorReply`` and streams the ``TokenChunk``s of a request it takes to
    ``stream_subject`` (the requesting process's token inbox). It says it took it by a
    ``GenerateAccepted`` reply at once, or, with ``answer_on_stream``, on the stream: the
    request's first chunk says so, and if none has gone out within ``ACCEPT_HOLD_S`` its id
    goes in a ``TokenBatch``'s ``accepted`` (with the other requests' from that frontend),
    which saves a message a request on every process it crosses. ``prefill_worker_id`` is the
    router's decision in a disaggregated cluster: set, prefill there and pull the KV; None,
    prefill here. ``frontend_id`` and ``cached_tokens`` are retired (never read; no longer
    sent, still decoded)."""

    request_id: RequestId
    model: str
    token_ids: list[int]
    sampling: SamplingParams = SamplingParams()
    stream_subject: str = ""
    frontend_id: InstanceId = InstanceId("")  # retired
    prefill_worker_id: InstanceId | None = None
    cached_tokens: int | None = None  # retired
    # Objectives (see docs/admission.md): lower ``priority`` is served first and shed last
    # (vLLM's convention); ``ttft_budget_s`` is the time left, when sent, until the first
    # token is due (None: no objective); ``tpot_s`` the time-per-output-token objective.
    priority: int = 0
    ttft_budget_s: float | None = None
    tpot_s: float | None = None
    # A migrated stream: the output tokens the client already has, from a worker that died or
    # dropped the stream. The worker continues after them (no token repeated or missing).
    resume_token_ids: list[int] = []
    # A live migration: the resumed sequence's KV, to read from the worker that holds it
    # rather than recompute (set with ``resume_token_ids``; ``prefill_worker_id`` is then None).
    kv_source: KVHandle | None = None
    # Admitted before, by a worker it has left (a role switch, a drain, a failure): admission
    # checks its predicted first token against the whole ``ttft_budget_s``, not the share
    # (``--slo-admit-fraction``) a new request gets, since shedding it now drops admitted work.
    admitted: bool = False
    answer_on_stream: bool = False


# How long a worker holds the acceptance of an ``answer_on_stream`` request for its first
# chunk to carry it; past this it goes out on its own (batched per frontend). Well inside any
# admission timeout, and longer than a first token takes on an unloaded engine.
ACCEPT_HOLD_S = 0.05


class AbortRequest(Message, frozen=True, tag="abort"):
    """Stop a request and free its KV blocks. Idempotent: unknown ids are ignored."""

    request_id: RequestId


class GenerateAccepted(Message, frozen=True, tag="accepted"):
    request_id: RequestId
    worker_id: InstanceId
    num_prompt_tokens: int


class ErrorReply(Message, frozen=True, tag="error"):
    """A typed failure; the receiver raises the matching ``shared.errors`` class again."""

    code: ErrorCode
    message: str
    retry_after_s: float | None = None


# --- disaggregation: decode worker -> prefill worker ---------------------------------------------


class PrefillRequest(Message, frozen=True, tag="prefill"):
    """Compute a prompt's KV and its first token, then hold the blocks for the requester to
    read until a ``KVRelease`` (or ``hold_timeout_s``). Sent by request-reply; the reply is
    ``PrefillDone`` or ``ErrorReply``. ``decode_worker_id`` is retired."""

    request_id: RequestId
    token_ids: list[int]
    sampling: SamplingParams = SamplingParams()
    decode_worker_id: InstanceId = InstanceId("")  # retired
    hold_timeout_s: float = 30.0
    priority: int = 0
    ttft_budget_s: float | None = None  # as GenerateRequest's, minus what is spent already
    admitted: bool = False  # as GenerateRequest's


class PrefillDone(Message, frozen=True, tag="prefill_done"):
    """The prompt's KV is ready to read: one (address, length) descriptor per block of the
    prompt, in order, in the memory the prefill worker's agent registered (see its
    ``WorkerInfo.kv_agent_metadata``)."""

    request_id: RequestId
    worker_id: InstanceId
    first_token_id: int
    num_prompt_tokens: int
    num_cached_tokens: int
    kv_agent: str
    block_descriptors: list[tuple[int, int]]
    queue_s: float = 0.0
    prefill_s: float = 0.0
    first_token_logprobs: TokenLogprobs | None = None  # when the sampling asked for logprobs


class KVRelease(Message, frozen=True, tag="kv_release"):
    """The decode worker has read (or given up on) a request's blocks: free them."""

    request_id: RequestId


# --- routing: frontend -> router --------------------------------------------------------------


class RouteRequest(Message, frozen=True, tag="route"):
    """Which workers should serve this prompt? Sent by request-reply to the routers' queue."""

    request_id: RequestId
    model: str
    token_ids: list[int]


class RouteDecision(Message, frozen=True, tag="route_decision"):
    """The router's placement: the decode (or aggregated) worker and, when the prompt should
    be prefilled remotely, the prefill worker (None: prefill on the decode worker).
    ``decode_cached_tokens`` is the decode worker's cached prefix as the router sees it.
    ``prefill_cached_tokens`` is retired."""

    request_id: RequestId
    worker_id: InstanceId
    decode_cached_tokens: int = 0
    prefill_worker_id: InstanceId | None = None
    prefill_cached_tokens: int = 0  # retired


# --- token streams: worker -> frontend ----------------------------------------------------------


class TTFTBreakdown(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """Where a request's time to first token went, measured by the workers (seconds)."""

    queue_s: float = 0.0  # waiting for a batch slot (on the prefill worker when remote)
    prefill_s: float = 0.0  # computing the prompt
    transfer_s: float = 0.0  # moving the KV cache to the decode worker (0 when local)
    is_remote_prefill: bool = False


class TokenChunk(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """New tokens of one request from one engine step (hot path: positional fields)."""

    request_id: RequestId
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    ttft: TTFTBreakdown | None = None  # on the first chunk only
    # The request's output tokens once this chunk's are counted (resumed ones included);
    # 0: not said. The frontend finds tokens lost on the bus by it.
    num_output_tokens: int = 0
    # With ``ABORT`` and an ``error``: the worker is draining and holds this request's KV for
    # the worker it moves to (a live migration).
    moved_kv: KVHandle | None = None
    # One per token of ``token_ids`` when the request asked for logprobs.
    logprobs: list[TokenLogprobs] | None = None


class TokenBatch(Message, frozen=True, tag="tokens"):
    """Every chunk one engine step produced for one destination process, and the requests
    (``answer_on_stream``) the worker has taken that no chunk has told of yet."""

    worker_id: InstanceId
    chunks: list[TokenChunk]
    accepted: list[RequestId] = []


# --- discovery (etcd values) and load ------------------------------------------------------------


class ModelCard(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What a frontend needs to serve a model: stored in etcd under the model registry."""

    name: str
    tokenizer: str  # a local directory, or "builtin" for the tokenizer Baton ships
    context_length: int
    kv_block_size: int
    eos_token_ids: list[int] = []
    created: int = 0
    features: list[str] = []  # FEATURE_* its engine has (older workers: none said)


class WorkerInfo(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A live worker, registered under its lease; the key disappears when the lease does."""

    worker_id: InstanceId
    model: str
    role: WorkerRole
    subject: str  # where GenerateRequest and AbortRequest go
    max_num_seqs: int
    num_kv_blocks: int
    host: str = ""
    pid: int = 0
    is_draining: bool = False  # finishing in-flight work: choose another worker
    kv_agent: str = ""  # the KV transfer agent's name ("" when it cannot transfer)
    kv_agent_metadata: bytes = b""  # what a peer's agent needs to read our blocks
    kv_block_size: int = 0
    http_url: str = ""  # /health, /ready and /metrics ("" when it serves no HTTP)


class LoadMetrics(Message, frozen=True, tag="load"):
    """A worker's load, published every few hundred milliseconds and after big changes."""

    worker_id: InstanceId
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    kv_usage: float
    is_draining: bool = False
    # Measured speed: step time ~ step_base_s + step_per_seq_s * decode batch
    # + step_per_token_s * prefill tokens (a regression over the worker's real steps).
    step_base_s: float = 0.0
    step_per_seq_s: float = 0.0
    step_per_token_s: float = 0.0
    num_waiting_tokens: int = 0  # prompt tokens queued for prefill
    predicted_wait_s: float = 0.0  # time a new normal-priority request waits to be prefilled
    max_num_running: int = 0  # the batch cap the TPOT objective sets now (0: none)
    wait_per_token_s: float = 0.0  # how much longer the wait gets per prompt token queued
    max_waiting: int = 0  # queued requests past which it refuses new ones (0: no cap known)
    # Of ``num_running``: requests admitted that wait for their KV, from a prefill worker or
    # from the peer a stream moved from (they hold no batch slot yet).
    num_awaiting_kv: int = 0
    # Counters since the worker started, admitted or not (the planner reads their rates):
    # requests that came for its role, and the prompt tokens of those it would prefill.
    num_arrived: int = 0
    num_arrived_prefill_tokens: int = 0
    # Requests that finished here with output (not those shed before a token), and their
    # output tokens: the planner reads the output length seen from their ratio.
    num_finished: int = 0
    num_finished_output_tokens: int = 0


class FrontendLoad(Message, frozen=True, tag="fload"):
    """What one frontend process answered, published twice a second: completion requests that
    came in and those it answered 429 (shed, at any stage: before reading them, from the
    workers' reports, refused by a worker, or past their deadline while waiting). Counters
    since the process started; the planner reads their rates (a shed request reaches no
    worker's counters)."""

    frontend_id: InstanceId
    num_requests: int = 0
    num_shed: int = 0


# --- KV cache events (consumed by the KV-aware router) -------------------------------------------


class BlockStored(msgspec.Struct, frozen=True, array_like=True, gc=False, tag="s"):
    """Full blocks now cached, in prefix order; ``parent_hash`` is the block before the first."""

    block_hashes: list[BlockHash]
    parent_hash: BlockHash | None = None


class BlockRemoved(msgspec.Struct, frozen=True, array_like=True, gc=False, tag="r"):
    block_hashes: list[BlockHash]


class AllBlocksCleared(msgspec.Struct, frozen=True, array_like=True, gc=False, tag="c"):
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVStateRequest(Message, frozen=True, tag="kv_state_request"):
    """A router lost events of this worker: ask for its whole cached set (request-reply)."""


class KVState(Message, frozen=True, tag="kv_state"):
    """Every block a worker caches now, and the seq of the last KVEventBatch it reflects."""

    worker_id: InstanceId
    seq: int
    block_hashes: list[BlockHash]


class KVEventBatch(Message, frozen=True, tag="kv_events"):
    """KV events of one worker, numbered so that a gap shows lost messages."""

    worker_id: InstanceId
    seq: int
    events: list[KVEvent]


# --- planner (autoscaler) -----------------------------------------------------------------------


class ScaleCommand(Message, frozen=True, tag="scale"):
    """The planner's target for one pool: run ``num_replicas`` workers of ``role``. A target,
    not a step, so it is idempotent: whoever starts and stops workers (the launcher)
    reconciles to the latest one, within its own limits. Sent when the target changes;
    ``seq`` counts the commands (a restarted planner starts again from 1)."""

    planner_id: InstanceId
    role: WorkerRole
    num_replicas: int
    reason: str = ""
    seq: int = 0


class RoleSwitch(Message, frozen=True, tag="role_switch"):
    """Ask a running worker to change role (prefill <-> decode) in place, keeping its process
    and engine. Sent by request-reply to the worker's inbox; the reply is ``RoleSwitched`` or
    ``ErrorReply`` (``UNAVAILABLE`` with ``retry_after_s``: draining, another switch under way,
    or the last decode worker; ``INVALID_REQUEST``: another worker's id, a role it cannot take).
    Asking for the role it has is answered ``RoleSwitched`` at once: a switch is a target."""

    planner_id: InstanceId
    worker_id: InstanceId
    role: WorkerRole
    reason: str = ""
    seq: int = 0


class RoleSwitched(Message, frozen=True, tag="role_switched"):
    """The worker serves as ``role`` now and is registered so: ``switch_s`` from the command's
    arrival to the new registration (0 when it had the role already). ``num_moved`` streams
    moved to decode peers (a decode worker that became prefill); work of the old role that was
    not moved finishes beside the new role. ``seq`` repeats the command's."""

    worker_id: InstanceId
    role: WorkerRole
    previous_role: WorkerRole
    switch_s: float = 0.0
    num_moved: int = 0
    seq: int = 0
