"""The bus against NATS in a container, where a Docker engine answers; skipped elsewhere.

The local-binary fixtures (conftest.py) are what every run uses; this checks the same client
against the upstream NATS image, as a user's `docker compose up` would run it.
"""

import asyncio
import shutil
import subprocess

import pytest

from proto import subjects
from proto.messages import AbortRequest, RequestId
from shared.bus import Bus
from shared.codec import worker_inbound_decoder


def docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        result = subprocess.run(["docker", "info"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(not docker_answers(), reason="no Docker engine answers here"),
]


@pytest.fixture(scope="module")
def nats_container_url():
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    with DockerContainer("nats:2.10").with_exposed_ports(4222) as container:
        wait_for_logs(container, "Server is ready", timeout=60)
        host = container.get_container_host_ip()
        yield f"nats://{host}:{container.get_exposed_port(4222)}"


async def test_bus_round_trip_through_containerised_nats(nats_container_url, namespace):
    received: asyncio.Queue[bytes] = asyncio.Queue()
    async with Bus.connect(nats_container_url) as bus:

        async def on_msg(msg):
            await received.put(msg.data)

        subject = subjects.worker_inbox(namespace, "w")
        await bus.subscribe(subject, on_msg)
        await bus.publish(subject, AbortRequest(request_id=RequestId("r")))
        async with asyncio.timeout(10):
            data = await received.get()
    assert worker_inbound_decoder.decode(data) == AbortRequest(request_id=RequestId("r"))
