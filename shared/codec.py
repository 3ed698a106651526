"""msgpack encoders and typed decoders for the wire messages (pure; built once per process).

Each decoder accepts exactly the union a subscriber expects, so a payload of the wrong type or
shape raises ``msgspec.ValidationError`` naming the bad field (``$.token_ids[1]``).
"""

from typing import Final

import msgspec
from msgspec.msgpack import Decoder

from proto.messages import (
    AbortRequest,
    ErrorReply,
    FrontendLoad,
    GenerateAccepted,
    GenerateRequest,
    KVEventBatch,
    KVRelease,
    KVState,
    KVStateRequest,
    LoadMetrics,
    ModelCard,
    PrefillDone,
    PrefillRequest,
    RoleSwitch,
    RoleSwitched,
    RouteDecision,
    RouteRequest,
    ScaleCommand,
    TokenBatch,
    WorkerInfo,
)

# Every worker decodes the same union whatever its role, so that a message of the other role
# gets a typed refusal rather than a decode error, and a worker can change roles (RoleSwitch).
WorkerInbound = (
    GenerateRequest | PrefillRequest | AbortRequest | KVRelease | KVStateRequest | RoleSwitch
)
GenerateReply = GenerateAccepted | ErrorReply
PrefillReply = PrefillDone | ErrorReply
RouteReply = RouteDecision | ErrorReply
RoleSwitchReply = RoleSwitched | ErrorReply

encoder: Final = msgspec.msgpack.Encoder()

worker_inbound_decoder: Final[
    Decoder[
        GenerateRequest | PrefillRequest | AbortRequest | KVRelease | KVStateRequest | RoleSwitch
    ]
] = Decoder(WorkerInbound)
generate_reply_decoder: Final[Decoder[GenerateAccepted | ErrorReply]] = Decoder(GenerateReply)
prefill_reply_decoder: Final[Decoder[PrefillDone | ErrorReply]] = Decoder(PrefillReply)
route_request_decoder: Final[Decoder[RouteRequest]] = Decoder(RouteRequest)
route_reply_decoder: Final[Decoder[RouteDecision | ErrorReply]] = Decoder(RouteReply)
kv_state_decoder: Final[Decoder[KVState | ErrorReply]] = Decoder(KVState | ErrorReply)
token_batch_decoder: Final[Decoder[TokenBatch]] = Decoder(TokenBatch)
load_metrics_decoder: Final[Decoder[LoadMetrics]] = Decoder(LoadMetrics)
frontend_load_decoder: Final[Decoder[FrontendLoad]] = Decoder(FrontendLoad)
kv_event_batch_decoder: Final[Decoder[KVEventBatch]] = Decoder(KVEventBatch)
worker_info_decoder: Final[Decoder[WorkerInfo]] = Decoder(WorkerInfo)
model_card_decoder: Final[Decoder[ModelCard]] = Decoder(ModelCard)
scale_command_decoder: Final[Decoder[ScaleCommand]] = Decoder(ScaleCommand)
role_switch_reply_decoder: Final[Decoder[RoleSwitched | ErrorReply]] = Decoder(RoleSwitchReply)


def encode(message: msgspec.Struct) -> bytes:
    """msgpack bytes of any wire struct."""
    return encoder.encode(message)
