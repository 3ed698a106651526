"""How a process proves who it is to NATS and etcd, and how it checks who they are.

One declaration, nested in every service's configuration (and ``baton up``'s), so that
``--nats-password`` / ``BATON_NATS_PASSWORD`` means the same everywhere. Empty strings mean
"not set". Secrets given here are redacted from the startup log by ``shared.config.describe``.

- NATS: one of user/password, token or a credentials file (``.creds``: a user JWT and its
  nkey seed); TLS with a ``tls://`` URL or a CA file, and a client certificate for mTLS.
- etcd: user/password (the client authenticates and sends the token with every call); TLS
  with an ``https://`` URL, a CA file, and a client certificate for mTLS.
"""

import dataclasses
import os
import ssl
from dataclasses import dataclass, field

from shared.config import doc


def _check_pair(cert: str, key: str, what: str) -> None:
    if bool(cert) != bool(key):
        raise ValueError(f"{what}_tls_cert and {what}_tls_key go together; got only one of them")


def _check_files(**paths: str) -> None:
    for name, path in paths.items():
        if path and not os.path.isfile(path):
            raise ValueError(f"{name}: no such file {path!r}")


def _ssl_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    """A client context that verifies the server against ``ca`` (the system's CAs if empty)
    and presents ``cert``/``key`` if given."""
    context = ssl.create_default_context(cafile=ca or None)
    if cert:
        context.load_cert_chain(cert, key)
    return context


@dataclass(frozen=True, slots=True, kw_only=True)
class BusSecurity:
    """Credentials and TLS for NATS; at most one of user/password, token and creds file."""

    nats_user: str = field(default="", metadata=doc("NATS user (with --nats-password)"))
    nats_password: str = field(default="", metadata={**doc("NATS password"), "secret": True})
    nats_token: str = field(default="", metadata={**doc("NATS token"), "secret": True})
    nats_creds: str = field(
        default="", metadata=doc("NATS credentials file (.creds: user JWT and nkey seed)")
    )
    nats_tls_ca: str = field(
        default="",
        metadata=doc("CA file to verify the NATS server with; setting it requires TLS"),
    )
    nats_tls_cert: str = field(default="", metadata=doc("client certificate for NATS mTLS"))
    nats_tls_key: str = field(default="", metadata=doc("client key for NATS mTLS"))

    def __post_init__(self) -> None:
        if bool(self.nats_user) != bool(self.nats_password):
            raise ValueError("nats_user and nats_password go together; got only one of them")
        methods = [bool(self.nats_user), bool(self.nats_token), bool(self.nats_creds)]
        if sum(methods) > 1:
            raise ValueError("give one of nats_user/nats_password, nats_token and nats_creds")
        _check_pair(self.nats_tls_cert, self.nats_tls_key, "nats")
        _check_files(
            nats_creds=self.nats_creds,
            nats_tls_ca=self.nats_tls_ca,
            nats_tls_cert=self.nats_tls_cert,
            nats_tls_key=self.nats_tls_key,
        )

    @property
    def has_tls_files(self) -> bool:
        """Whether a CA or client certificate is set: then the connection must use TLS."""
        return bool(self.nats_tls_ca or self.nats_tls_cert)

    def ssl_context(self) -> ssl.SSLContext:
        """The client TLS context these settings describe."""
        return _ssl_context(self.nats_tls_ca, self.nats_tls_cert, self.nats_tls_key)


@dataclass(frozen=True, slots=True, kw_only=True)
class EtcdSecurity:
    """Credentials and TLS for etcd."""

    etcd_user: str = field(default="", metadata=doc("etcd user (with --etcd-password)"))
    etcd_password: str = field(default="", metadata={**doc("etcd password"), "secret": True})
    etcd_tls_ca: str = field(
        default="",
        metadata=doc("CA file to verify etcd with (https URLs; default: the system's CAs)"),
    )
    etcd_tls_cert: str = field(default="", metadata=doc("client certificate for etcd mTLS"))
    etcd_tls_key: str = field(default="", metadata=doc("client key for etcd mTLS"))

    def __post_init__(self) -> None:
        if bool(self.etcd_user) != bool(self.etcd_password):
            raise ValueError("etcd_user and etcd_password go together; got only one of them")
        _check_pair(self.etcd_tls_cert, self.etcd_tls_key, "etcd")
        _check_files(
            etcd_tls_ca=self.etcd_tls_ca,
            etcd_tls_cert=self.etcd_tls_cert,
            etcd_tls_key=self.etcd_tls_key,
        )

    @property
    def has_tls_files(self) -> bool:
        """Whether a CA or client certificate is set: then the URL must be ``https://``."""
        return bool(self.etcd_tls_ca or self.etcd_tls_cert)

    def ssl_context(self) -> ssl.SSLContext:
        """The client TLS context these settings describe (for etcd's HTTP endpoints)."""
        return _ssl_context(self.etcd_tls_ca, self.etcd_tls_cert, self.etcd_tls_key)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterSecurity:
    """NATS's and etcd's settings together: the one field each service nests."""

    nats: BusSecurity = field(default_factory=BusSecurity)
    etcd: EtcdSecurity = field(default_factory=EtcdSecurity)

    def env(self) -> dict[str, str]:
        """The ``BATON_*`` variables that give a child process these settings (the set ones)."""
        values: dict[str, str] = {}
        for part in (self.nats, self.etcd):
            for setting in dataclasses.fields(part):
                value = getattr(part, setting.name)
                if value:
                    values[f"BATON_{setting.name.upper()}"] = str(value)
        return values
