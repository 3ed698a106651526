"""NATS and etcd with authentication and TLS on: real servers, real round trips, and refusals
that come at once with the reason (no retrying forever on a wrong password)."""

import asyncio
import base64
import hashlib
import json
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import nacl.signing
import nkeys
import pytest

from proto import subjects
from proto.messages import AbortRequest, RequestId
from services.launcher.cluster import ClusterSpec, local_cluster
from shared.bus import Bus
from shared.codec import worker_inbound_decoder
from shared.config import describe, load_config
from shared.discovery import Discovery
from shared.errors import Unavailable
from shared.local_credentials import CertificateAuthority, new_secret
from shared.security import BusSecurity, ClusterSecurity, EtcdSecurity
from shared.servers import (
    ServerProcess,
    ServerTLS,
    find_binary,
    free_port,
    start_etcd,
    start_nats,
    stop_process,
    wait_for_port,
)

REFUSAL_S = 3.0  # a refusal must come this fast: nothing waits for a timeout


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.create(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def server_tls(ca: CertificateAuthority) -> ServerTLS:
    cert, key = ca.issue("server")
    return ServerTLS(cert_file=str(cert), key_file=str(key), ca_file=str(ca.cert_file))


@pytest.fixture(scope="module")
def mutual_tls(ca: CertificateAuthority, server_tls: ServerTLS) -> ServerTLS:
    """Server TLS that also requires client certificates (the pair is the client's)."""
    cert, key = ca.issue("client")
    return ServerTLS(
        cert_file=server_tls.cert_file,
        key_file=server_tls.key_file,
        ca_file=server_tls.ca_file,
        client_cert_file=str(cert),
        client_key_file=str(key),
    )


def stopped(server: ServerProcess) -> None:
    server.stop()
    if server.data_dir:
        shutil.rmtree(server.data_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def password() -> str:
    return new_secret()


@pytest.fixture(scope="module")
def nats_with_password(password: str) -> Iterator[ServerProcess]:
    server = start_nats(user="baton", password=password)
    yield server
    stopped(server)


@pytest.fixture(scope="module")
def etcd_with_tls_and_root(server_tls: ServerTLS, password: str) -> Iterator[ServerProcess]:
    server = start_etcd(tls=server_tls, root_password=password)
    yield server
    stopped(server)


async def round_trip(bus: Bus, namespace: str) -> None:
    """A request answered through the server: both directions work."""
    subject = subjects.worker_inbox(namespace, "w1")

    async def echo(msg):
        await bus.publish_bytes(msg.reply, msg.data)

    await bus.subscribe(subject, echo)
    sent = AbortRequest(request_id=RequestId("r1"))
    reply = await bus.request(subject, sent, timeout_s=5)
    assert worker_inbound_decoder.decode(reply) == sent


async def refused(connect, match: str) -> None:
    """``connect()`` (an async context manager) fails with ``Unavailable`` naming ``match``,
    within ``REFUSAL_S``."""
    start = time.monotonic()
    with pytest.raises(Unavailable, match=match):
        await enter(connect)
    assert time.monotonic() - start < REFUSAL_S


async def enter(connect) -> None:
    async with asyncio.timeout(REFUSAL_S * 3), connect():
        pass


def file_modes(directory: Path) -> dict[str, int]:
    """The permission bits of ``directory`` (as ".") and of each file in it."""
    modes = {".": stat.S_IMODE(directory.stat().st_mode)}
    modes.update({p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()})
    return modes


# --- NATS ------------------------------------------------------------------------------------


async def test_nats_user_password_serves_and_wrong_or_missing_password_is_refused(
    nats_with_password, password, namespace
):
    url = nats_with_password.url
    good = BusSecurity(nats_user="baton", nats_password=password)
    async with Bus.connect(url, security=good) as bus:
        await round_trip(bus, namespace)
    wrong = BusSecurity(nats_user="baton", nats_password="not-" + password)
    await refused(lambda: Bus.connect(url, security=wrong), "Authorization Violation")
    await refused(lambda: Bus.connect(url), "Authorization Violation")


async def test_nats_token_serves_and_wrong_token_is_refused(namespace):
    token = new_secret()
    server = start_nats(token=token)
    try:
        async with Bus.connect(server.url, security=BusSecurity(nats_token=token)) as bus:
            await round_trip(bus, namespace)
        wrong = BusSecurity(nats_token=new_secret())
        await refused(lambda: Bus.connect(server.url, security=wrong), "Authorization Violation")
    finally:
        stopped(server)


async def test_nats_tls_verifies_the_server_with_the_ca(server_tls, namespace):
    server = start_nats(tls=server_tls)
    try:
        assert server.url.startswith("tls://")
        async with Bus.connect(
            server.url, security=BusSecurity(nats_tls_ca=server_tls.ca_file)
        ) as bus:
            await round_trip(bus, namespace)
        # Without our CA the server's certificate does not verify.
        await refused(lambda: Bus.connect(server.url), "CERTIFICATE_VERIFY_FAILED")
    finally:
        stopped(server)


async def test_nats_mutual_tls_needs_the_client_certificate(mutual_tls, namespace):
    server = start_nats(tls=mutual_tls)
    try:
        with_cert = BusSecurity(
            nats_tls_ca=mutual_tls.ca_file,
            nats_tls_cert=mutual_tls.client_cert_file,
            nats_tls_key=mutual_tls.client_key_file,
        )
        async with Bus.connect(server.url, security=with_cert) as bus:
            await round_trip(bus, namespace)
        without = BusSecurity(nats_tls_ca=mutual_tls.ca_file)
        with pytest.raises(Unavailable):
            await enter(lambda: Bus.connect(server.url, security=without))
    finally:
        stopped(server)


async def test_nats_password_is_never_sent_in_clear_when_tls_was_asked_for(
    nats_with_password, password, server_tls
):
    # The server speaks plain text: a client that asked for TLS keeps its password.
    url = nats_with_password.url.replace("nats://", "tls://")
    security = BusSecurity(
        nats_user="baton", nats_password=password, nats_tls_ca=server_tls.ca_file
    )
    await refused(lambda: Bus.connect(url, security=security), "SecureConnWanted")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def new_nkey(prefix: int) -> tuple[str, str, nkeys.KeyPair]:
    """A fresh nkey of the kind ``prefix``: its seed, public key and key pair."""
    seed = nkeys.encode_seed(bytes(nacl.signing.SigningKey.generate()), prefix)
    pair = nkeys.from_seed(bytearray(seed))
    return seed.decode(), pair.public_key.decode(), pair


def signed_jwt(signer: nkeys.KeyPair, issuer: str, subject: str, nats: dict) -> str:
    """A NATS JWT (what nsc writes) with ``nats`` claims, signed by ``signer``."""
    claims = {"iat": int(time.time()), "iss": issuer, "sub": subject, "nats": nats}
    claims["jti"] = b64url(hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest())
    head = b64url(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = b64url(json.dumps(claims).encode())
    return f"{head}.{body}.{b64url(signer.sign(f'{head}.{body}'.encode()))}"


def write_creds(path: Path, account: tuple[str, nkeys.KeyPair]) -> Path:
    """A user of ``account`` (public key, key pair) as a .creds file."""
    seed, user, _ = new_nkey(nkeys.PREFIX_BYTE_USER)
    limits = {"subs": -1, "data": -1, "payload": -1}
    user_jwt = signed_jwt(
        account[1], account[0], user, {"type": "user", "version": 2, "pub": {}, "sub": {}, **limits}
    )
    path.write_text(
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    )
    return path


@pytest.fixture
def operator_nats(tmp_path: Path) -> Iterator[tuple[str, str, nkeys.KeyPair]]:
    """nats-server in operator mode (users are JWTs): its URL, and the one account it trusts
    (public key and key pair, to sign users with)."""
    _, operator, operator_pair = new_nkey(nkeys.PREFIX_BYTE_OPERATOR)
    _, account, account_pair = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
    limits = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "conn": -1}
    account_jwt = signed_jwt(
        operator_pair, operator, account, {"type": "account", "version": 2, "limits": limits}
    )
    operator_jwt = signed_jwt(operator_pair, operator, operator, {"type": "operator", "version": 2})
    conf = tmp_path / "nats.conf"
    conf.write_text(
        f"operator: {operator_jwt}\nresolver: MEMORY\n"
        f"resolver_preload: {{ {account}: {account_jwt} }}\n"
    )
    port = free_port()
    args = [find_binary("nats-server"), "-a", "127.0.0.1", "-p", str(port), "-c", str(conf)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, 10.0, proc)
        yield f"nats://127.0.0.1:{port}", account, account_pair
    finally:
        stop_process(proc)


async def test_nats_credentials_file_serves_and_a_stranger_is_refused(
    operator_nats, tmp_path, namespace
):
    url, account, account_pair = operator_nats
    creds = write_creds(tmp_path / "user.creds", (account, account_pair))
    async with Bus.connect(url, security=BusSecurity(nats_creds=str(creds))) as bus:
        await round_trip(bus, namespace)
    _, other, other_pair = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)  # an account nobody trusts
    stranger = write_creds(tmp_path / "stranger.creds", (other, other_pair))
    security = BusSecurity(nats_creds=str(stranger))
    await refused(lambda: Bus.connect(url, security=security), "Authorization Violation")


# --- etcd ------------------------------------------------------------------------------------


def etcd_security(server_tls: ServerTLS, password: str) -> EtcdSecurity:
    return EtcdSecurity(etcd_user="root", etcd_password=password, etcd_tls_ca=server_tls.ca_file)


async def test_etcd_tls_and_user_auth_serve_keys_leases_and_watches(
    etcd_with_tls_and_root, server_tls, password, namespace
):
    url = etcd_with_tls_and_root.url
    assert url.startswith("https://")
    security = etcd_security(server_tls, password)
    async with Discovery.connect(url, security=security) as discovery:
        await discovery.put(f"/{namespace}/plain", b"1")
        assert await discovery.get(f"/{namespace}/plain") == b"1"
        async with discovery.watch_prefix(f"/{namespace}/workers/") as view:
            registration = await discovery.register(f"/{namespace}/workers/w1", b"up", ttl_s=5)
            async with asyncio.timeout(5):
                await view.wait_for(lambda: view.items == {f"/{namespace}/workers/w1": b"up"})
            await registration.revoke()
            async with asyncio.timeout(5):
                await view.wait_for(lambda: not view.items)


async def test_etcd_wrong_or_missing_credentials_fail_with_the_reason(
    etcd_with_tls_and_root, server_tls, password
):
    url = etcd_with_tls_and_root.url
    wrong = EtcdSecurity(
        etcd_user="root", etcd_password="not-" + password, etcd_tls_ca=server_tls.ca_file
    )
    await refused(lambda: Discovery.connect(url, security=wrong), "invalid user ID or password")
    no_user = EtcdSecurity(etcd_tls_ca=server_tls.ca_file)
    await refused(lambda: Discovery.connect(url, security=no_user), "set --etcd-user")
    with pytest.raises(ValueError, match="not https"):
        async with Discovery.connect(url.replace("https", "http"), security=no_user):
            pass


async def test_etcd_without_the_ca_does_not_trust_the_server(etcd_with_tls_and_root, password):
    # The system's CAs do not know our throwaway CA.
    security = EtcdSecurity(etcd_user="root", etcd_password=password)
    with pytest.raises(Unavailable, match="CERTIFICATE_VERIFY_FAILED"):
        async with Discovery.connect(
            etcd_with_tls_and_root.url, security=security, call_timeout_s=2
        ):
            pass


async def test_etcd_mutual_tls_serves_with_the_client_certificate(mutual_tls, namespace):
    server = start_etcd(tls=mutual_tls)
    try:
        security = EtcdSecurity(
            etcd_tls_ca=mutual_tls.ca_file,
            etcd_tls_cert=mutual_tls.client_cert_file,
            etcd_tls_key=mutual_tls.client_key_file,
        )
        async with Discovery.connect(server.url, security=security) as discovery:
            await discovery.put(f"/{namespace}/k", b"v")
            assert await discovery.get(f"/{namespace}/k") == b"v"
    finally:
        stopped(server)


async def test_etcd_login_authenticates_again_after_etcd_restarts(tmp_path, namespace):
    # A restarted etcd forgets every token; calls refused for theirs make the client log in again.
    password = new_secret()
    server = await asyncio.to_thread(
        start_etcd, data_dir=str(tmp_path / "etcd"), root_password=password
    )
    security = EtcdSecurity(etcd_user="root", etcd_password=password)
    try:
        async with Discovery.connect(server.url, security=security, call_timeout_s=2) as discovery:
            await discovery.put(f"/{namespace}/before", b"1")
            server.stop()
            server = await asyncio.to_thread(
                start_etcd, server.port, data_dir=server.data_dir, root_password=password
            )
            async with asyncio.timeout(10):
                while True:
                    try:
                        await discovery.put(f"/{namespace}/after", b"2")
                        break
                    except Unavailable:
                        await asyncio.sleep(0.1)
            assert await discovery.get(f"/{namespace}/before") == b"1"
    finally:
        stopped(server)


# --- configuration ---------------------------------------------------------------------------


def test_security_settings_travel_as_env_and_never_reach_the_log(server_tls):
    from services.router.config import RouterConfig

    security = ClusterSecurity(
        nats=BusSecurity(
            nats_user="baton", nats_password="pw-secret", nats_tls_ca=server_tls.ca_file
        ),
        etcd=EtcdSecurity(etcd_user="root", etcd_password="etcd-secret"),
    )
    config = load_config(RouterConfig, "router", [], env=security.env())
    assert config.security == security
    line = describe(RouterConfig(security=security, nats_url="nats://u:url-secret@host:4222"))
    assert "'nats_user': 'baton'" in line
    for secret in ("pw-secret", "etcd-secret", "url-secret"):
        assert secret not in line
    with pytest.raises(ValueError, match="go together"):
        BusSecurity(nats_user="baton")
    with pytest.raises(ValueError, match="one of"):
        BusSecurity(nats_token="t", nats_user="u", nats_password="p")


# --- a whole secure cluster ------------------------------------------------------------------


async def test_secure_cluster_serves_a_completion_and_refuses_strangers(namespace):
    spec = ClusterSpec(
        namespace=namespace,
        secure=True,
        num_routers=0,
        num_workers=1,
        log_level="warning",
        ready_timeout_s=40.0,
        stop_timeout_s=15.0,
    )
    async with local_cluster(spec) as cluster:
        assert cluster.nats_url.startswith("tls://")
        assert cluster.etcd_url.startswith("https://")
        secrets_dir = Path(cluster._secrets_dir)
        modes = file_modes(secrets_dir)
        assert modes.pop(".") == 0o700
        assert {"ca.pem", "ca.key", "server.pem", "server.key"} <= modes.keys()
        assert set(modes.values()) == {0o600}
        body = {
            "model": "baton-sim",
            "max_tokens": 4,
            "ignore_eos": True,  # a sampled output may end early, as a model's would
            "messages": [{"role": "user", "content": "Hello"}],
        }
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            async with session.post(f"{cluster.api}/chat/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
                answer = await resp.json()
        assert answer["usage"]["completion_tokens"] == 4
        ca_file = str(secrets_dir / "ca.pem")
        await refused(
            lambda: Bus.connect(cluster.nats_url, security=BusSecurity(nats_tls_ca=ca_file)),
            "Authorization Violation",
        )
    assert not await asyncio.to_thread(secrets_dir.exists)
