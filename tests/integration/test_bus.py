"""The bus against a real nats-server: publish, request-reply, payload limits, token streams."""

import asyncio

import msgspec
import pytest

from proto import subjects
from proto.messages import (
    AbortRequest,
    FinishReason,
    GenerateAccepted,
    GenerateRequest,
    InstanceId,
    RequestId,
    TokenChunk,
)
from shared.bus import Bus
from shared.codec import encode, generate_reply_decoder, token_batch_decoder, worker_inbound_decoder
from shared.errors import DeadlineExceeded, PayloadTooLarge, Unavailable
from shared.streams import StreamDemux, encode_batches, group_chunks, publish_chunks


async def test_publish_delivers_typed_message_to_subscriber(nats_server, namespace):
    received: asyncio.Queue[bytes] = asyncio.Queue()
    async with Bus.connect(nats_server.url) as bus:

        async def on_msg(msg):
            await received.put(msg.data)

        subject = subjects.worker_inbox(namespace, "w1")
        await bus.subscribe(subject, on_msg)
        await bus.publish(subject, AbortRequest(request_id=RequestId("r1")))
        async with asyncio.timeout(5):
            data = await received.get()
    assert worker_inbound_decoder.decode(data) == AbortRequest(request_id=RequestId("r1"))


async def test_request_reply_round_trip(nats_server, namespace):
    subject = subjects.worker_inbox(namespace, "w1")
    async with Bus.connect(nats_server.url) as bus:

        async def responder(msg):
            request = worker_inbound_decoder.decode(msg.data)
            assert isinstance(request, GenerateRequest)
            reply = GenerateAccepted(
                request_id=request.request_id,
                worker_id=InstanceId("w1"),
                num_prompt_tokens=len(request.token_ids),
            )
            await bus.publish_bytes(msg.reply, encode(reply))

        await bus.subscribe(subject, responder)
        data = await bus.request(
            subject,
            GenerateRequest(request_id=RequestId("r"), model="m", token_ids=[1, 2, 3]),
            timeout_s=5,
        )
    reply = generate_reply_decoder.decode(data)
    assert reply == GenerateAccepted(
        request_id=RequestId("r"), worker_id=InstanceId("w1"), num_prompt_tokens=3
    )


async def test_request_without_responder_raises_unavailable(nats_server, namespace):
    async with Bus.connect(nats_server.url) as bus:
        with pytest.raises(Unavailable, match="no responder"):
            await bus.request(
                subjects.worker_inbox(namespace, "nobody"),
                AbortRequest(request_id=RequestId("r")),
                timeout_s=2,
            )


async def test_request_to_silent_responder_raises_deadline_exceeded(nats_server, namespace):
    subject = subjects.worker_inbox(namespace, "silent")
    async with Bus.connect(nats_server.url) as bus:

        async def silent(msg):
            return None

        await bus.subscribe(subject, silent)
        with pytest.raises(DeadlineExceeded):
            await bus.request(subject, AbortRequest(request_id=RequestId("r")), timeout_s=0.3)


async def test_oversized_message_is_refused_and_connection_survives(nats_server, namespace):
    subject = subjects.worker_inbox(namespace, "w1")
    received: asyncio.Queue[bytes] = asyncio.Queue()
    async with Bus.connect(nats_server.url) as bus:

        async def on_msg(msg):
            await received.put(msg.data)

        await bus.subscribe(subject, on_msg)
        too_many = bus.max_payload // 4  # msgpack ints above 127 take 3+ bytes each
        big = GenerateRequest(request_id=RequestId("r"), model="m", token_ids=[70000] * too_many)
        with pytest.raises(PayloadTooLarge) as info:
            await bus.publish(subject, big)
        assert info.value.max_payload_bytes == bus.max_payload
        assert info.value.size_bytes > bus.max_payload
        with pytest.raises(PayloadTooLarge):
            await bus.request(subject, big, timeout_s=1)
        # The connection is still usable.
        await bus.publish(subject, AbortRequest(request_id=RequestId("after")))
        async with asyncio.timeout(5):
            data = await received.get()
        assert bus.is_connected
    assert worker_inbound_decoder.decode(data) == AbortRequest(request_id=RequestId("after"))


def test_malformed_payload_names_the_bad_field():
    bad = msgspec.msgpack.encode(
        {"type": "generate", "request_id": "r", "model": "m", "token_ids": [1, "two"]}
    )
    with pytest.raises(msgspec.ValidationError, match=r"\$\.token_ids\[1\]"):
        worker_inbound_decoder.decode(bad)


def test_token_batches_split_under_max_payload():
    chunks = [TokenChunk(RequestId(f"r{i}"), list(range(100))) for i in range(50)]
    payloads = encode_batches(InstanceId("w"), chunks, max_payload=2000)
    assert len(payloads) > 1
    assert all(len(p) <= 2000 for p in payloads)
    decoded = [c for p in payloads for c in token_batch_decoder.decode(p).chunks]
    assert decoded == chunks
    with pytest.raises(PayloadTooLarge):
        encode_batches(InstanceId("w"), [TokenChunk(RequestId("x"), list(range(5000)))], 2000)


async def test_stream_demux_routes_batched_chunks_to_their_streams(nats_server, namespace):
    inbox = subjects.stream_inbox(namespace, "f1")
    async with Bus.connect(nats_server.url) as frontend, Bus.connect(nats_server.url) as worker:
        demux = StreamDemux(frontend, inbox)
        await demux.start()
        streams = {RequestId(f"r{i}"): demux.open(RequestId(f"r{i}")) for i in range(1000)}
        # One engine step: one message carrying a chunk for every stream.
        step = [(inbox, TokenChunk(rid, [i, i + 1])) for i, rid in enumerate(streams)]
        grouped = group_chunks(step)
        assert list(grouped) == [inbox]
        await publish_chunks(worker, InstanceId("w"), grouped)
        final = [(inbox, TokenChunk(rid, [7], FinishReason.LENGTH)) for rid in streams]
        await publish_chunks(worker, InstanceId("w"), group_chunks(final))
        await worker.flush()
        async with asyncio.timeout(10):
            for i, (rid, stream) in enumerate(streams.items()):
                got: list[TokenChunk] = []
                while not got or got[-1].finish_reason is None:
                    got += await stream.get()
                assert [t for c in got for t in c.token_ids] == [i, i + 1, 7]
                assert got[-1].finish_reason == FinishReason.LENGTH
                assert got[0].request_id == rid
        assert demux.num_orphan_chunks == 0


async def test_stream_fails_when_its_worker_goes_away(nats_server, namespace):
    async with Bus.connect(nats_server.url) as bus:
        demux = StreamDemux(bus, subjects.stream_inbox(namespace, "f1"))
        stream = demux.open(RequestId("r1"))
        stream.worker_id = InstanceId("w1")
        other = demux.open(RequestId("r2"))
        other.worker_id = InstanceId("w2")
        assert demux.fail_worker(InstanceId("w1"), Unavailable("worker w1 went away")) == 1
        with pytest.raises(Unavailable, match="w1"):
            async with asyncio.timeout(1):
                await stream.get()


async def test_idle_sweep_fails_only_placed_silent_streams(nats_server, namespace):
    async with Bus.connect(nats_server.url) as bus:
        demux = StreamDemux(bus, subjects.stream_inbox(namespace, "f1"))
        silent = demux.open(RequestId("silent"))
        silent.worker_id = InstanceId("w1")
        unplaced = demux.open(RequestId("unplaced"))  # still being placed: not the sweep's
        now = asyncio.get_running_loop().time()
        assert demux.fail_idle(10.0, now + 5) == 0
        assert demux.fail_idle(10.0, now + 11) == 1
        with pytest.raises(DeadlineExceeded, match="no tokens from worker w1"):
            await silent.get()
        assert unplaced.worker_id is None


async def test_a_new_attempt_drops_chunks_of_the_abandoned_one(nats_server, namespace):
    # A worker that took the first attempt late (its admission timed out) still streams under
    # the old id after the request was placed again: none of that reaches the new attempt.
    inbox = subjects.stream_inbox(namespace, "f1")
    async with Bus.connect(nats_server.url) as frontend, Bus.connect(nats_server.url) as worker:
        demux = StreamDemux(frontend, inbox)
        await demux.start()
        stream = demux.open(RequestId("r"))
        first = demux.new_attempt(stream)
        second = demux.new_attempt(stream)
        assert (first, second) == ("r", "r-1")
        stale = [(inbox, TokenChunk(first, [1, 2], FinishReason.ABORT))]
        await publish_chunks(worker, InstanceId("w"), group_chunks(stale))
        fresh = [(inbox, TokenChunk(second, [3], FinishReason.LENGTH))]
        await publish_chunks(worker, InstanceId("w"), group_chunks(fresh))
        await worker.flush()
        async with asyncio.timeout(10):
            got = await stream.get()
        assert [(c.token_ids, c.finish_reason) for c in got] == [([3], FinishReason.LENGTH)]
        assert demux.num_orphan_chunks == 1


async def test_a_new_attempt_drops_what_the_last_one_left_in_the_stream(nats_server, namespace):
    # An attempt abandoned after a gap goes on streaming until the abort reaches its worker:
    # chunks that arrived before the stream was placed again must not open the new attempt
    # (their counts would read as a gap at once, and every later attempt would fail the same
    # way until the stream ran out of moves).
    inbox = subjects.stream_inbox(namespace, "f1")
    async with Bus.connect(nats_server.url) as frontend, Bus.connect(nats_server.url) as worker:
        demux = StreamDemux(frontend, inbox)
        await demux.start()
        arrived = asyncio.Event()
        demux.on_batch = lambda _worker_id: arrived.set()
        stream = demux.open(RequestId("r"))
        first = demux.new_attempt(stream)
        late = [(inbox, TokenChunk(first, [7], num_output_tokens=7))]
        await publish_chunks(worker, InstanceId("w"), group_chunks(late))
        async with asyncio.timeout(10):
            await arrived.wait()  # handed to the stream, not yet taken
        second = demux.new_attempt(stream)
        assert demux.num_stale_chunks == 1
        fresh = [(inbox, TokenChunk(second, [3], FinishReason.LENGTH, num_output_tokens=3))]
        await publish_chunks(worker, InstanceId("w"), group_chunks(fresh))
        await worker.flush()
        async with asyncio.timeout(10):
            got = await stream.get()
        assert [(c.token_ids, c.num_output_tokens) for c in got] == [([3], 3)]
