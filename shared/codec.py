"""msgpack encoders and typed decoders for the wire messages (pure; built once per process).

Each decoder accepts exactly the union a subscriber expects, so a payload of the wrong type or
shape raises ``msgspec.ValidationError`` naming the bad field (``$.token_ids[1]``).
"""

from typing import Final

import msgspec

from proto.messages import (
    AbortRequest,
    ErrorReply,
    GenerateAccepted,
    GenerateRequest,
    KVEventBatch,
    LoadMetrics,
    ModelCard,
    TokenBatch,
    WorkerInfo,
)

WorkerInbound = GenerateRequest | AbortRequest
GenerateReply = GenerateAccepted | ErrorReply

encoder: Final = msgspec.msgpack.Encoder()

worker_inbound_decoder: Final = msgspec.msgpack.Decoder(WorkerInbound)
generate_reply_decoder: Final = msgspec.msgpack.Decoder(GenerateReply)
token_batch_decoder: Final = msgspec.msgpack.Decoder(TokenBatch)
load_metrics_decoder: Final = msgspec.msgpack.Decoder(LoadMetrics)
kv_event_batch_decoder: Final = msgspec.msgpack.Decoder(KVEventBatch)
worker_info_decoder: Final = msgspec.msgpack.Decoder(WorkerInfo)
model_card_decoder: Final = msgspec.msgpack.Decoder(ModelCard)


def encode(message: msgspec.Struct) -> bytes:
    """msgpack bytes of any wire struct."""
    return encoder.encode(message)
