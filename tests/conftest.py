"""Session fixtures: real nats-server and etcd processes on free loopback ports."""

import shutil
import uuid
from collections.abc import Iterator

import pytest

from shared.servers import ServerProcess, start_etcd, start_nats


@pytest.fixture(scope="session")
def nats_server() -> Iterator[ServerProcess]:
    server = start_nats()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[ServerProcess]:
    server = start_etcd()
    yield server
    server.stop()
    if server.data_dir:
        shutil.rmtree(server.data_dir, ignore_errors=True)


@pytest.fixture
def namespace() -> str:
    """A namespace of its own for each test, so tests never see each other's traffic."""
    return f"t{uuid.uuid4().hex[:8]}"
