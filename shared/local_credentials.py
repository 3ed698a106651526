"""Throwaway credentials for a local cluster: a CA, certificates, random passwords.

``baton up --secure`` and the auth tests use them. Certificates come from the ``openssl``
command (present wherever Python's own ``ssl`` module was built; no Python package needed):
an EC P-256 CA valid for a week and leaves it signs for ``localhost`` and ``127.0.0.1``, usable
by servers and clients (mTLS). Every file is written mode 0600 into a directory the caller
owns (``mkdtemp``'s are 0700), and nothing here logs a secret.
"""

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from shared.security import BusSecurity, ClusterSecurity, EtcdSecurity
from shared.servers import ServerTLS

VALID_DAYS: Final = 7
NATS_USER: Final = "baton"
ETCD_USER: Final = "root"  # etcd's auth needs a root user; a local cluster needs no other

_CA_CONF: Final = """[req]
distinguished_name = dn
prompt = no
x509_extensions = ext
[dn]
CN = Baton local CA
[ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""

_LEAF_CONF: Final = """[req]
distinguished_name = dn
prompt = no
[dn]
CN = {name}
[ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = {alt_names}
"""


def new_secret() -> str:
    """A random password or token: 192 bits, URL- and config-safe characters."""
    return secrets.token_urlsafe(24)


def _openssl(*args: str) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise FileNotFoundError("openssl not found on PATH; it makes the local certificates")
    done = subprocess.run([openssl, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {done.stderr.strip()[-500:]}")


def _private(*paths: Path) -> None:
    for path in paths:
        path.chmod(0o600)


@dataclass(frozen=True, slots=True)
class CertificateAuthority:
    """A CA whose files live in ``directory``; ``issue`` signs leaf certificates."""

    directory: Path
    cert_file: Path
    key_file: Path

    @classmethod
    def create(cls, directory: str | Path) -> "CertificateAuthority":
        directory = Path(directory)
        conf = directory / "ca.cnf"
        conf.write_text(_CA_CONF)
        cert, key = directory / "ca.pem", directory / "ca.key"
        _openssl(
            "req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-days", str(VALID_DAYS), "-config", str(conf),
            "-keyout", str(key), "-out", str(cert),
        )  # fmt: skip
        _private(cert, key, conf)
        return cls(directory, cert, key)

    def issue(
        self, name: str, hosts: tuple[str, ...] = ("localhost", "127.0.0.1")
    ) -> tuple[Path, Path]:
        """A certificate and key for ``name`` (files ``<name>.pem``/``.key``) naming ``hosts``
        (DNS names or IP addresses), for a server or a client."""
        alt_names = ", ".join(
            f"IP:{h}" if h.replace(".", "").isdigit() or ":" in h else f"DNS:{h}" for h in hosts
        )
        conf = self.directory / f"{name}.cnf"
        conf.write_text(_LEAF_CONF.format(name=name, alt_names=alt_names))
        cert, key, csr = (self.directory / f"{name}.{ext}" for ext in ("pem", "key", "csr"))
        _openssl(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-config", str(conf), "-keyout", str(key), "-out", str(csr),
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(self.cert_file),
            "-CAkey", str(self.key_file), "-set_serial", str(secrets.randbits(63)),
            "-days", str(VALID_DAYS), "-extfile", str(conf), "-extensions", "ext",
            "-out", str(cert),
        )  # fmt: skip
        os.unlink(csr)
        _private(cert, key, conf)
        return cert, key


@dataclass(frozen=True, slots=True)
class LocalCredentials:
    """What the servers of one local cluster require, and what its services present: a NATS
    user and password, etcd's root password, and TLS for both from one throwaway CA."""

    nats_password: str
    etcd_password: str
    tls: ServerTLS

    @classmethod
    def create(cls, directory: str | Path) -> "LocalCredentials":
        """New secrets, a CA and a server certificate, written into ``directory``."""
        ca = CertificateAuthority.create(directory)
        cert, key = ca.issue("server")
        tls = ServerTLS(cert_file=str(cert), key_file=str(key), ca_file=str(ca.cert_file))
        return cls(nats_password=new_secret(), etcd_password=new_secret(), tls=tls)

    def nats_server_options(self) -> dict[str, Any]:
        """``shared.servers.start_nats``'s keyword arguments."""
        return {"user": NATS_USER, "password": self.nats_password, "tls": self.tls}

    def etcd_server_options(self) -> dict[str, Any]:
        """``shared.servers.start_etcd``'s keyword arguments."""
        return {"tls": self.tls, "root_password": self.etcd_password}

    def nats_security(self) -> BusSecurity:
        return BusSecurity(
            nats_user=NATS_USER, nats_password=self.nats_password, nats_tls_ca=self.tls.ca_file
        )

    def etcd_security(self) -> EtcdSecurity:
        return EtcdSecurity(
            etcd_user=ETCD_USER, etcd_password=self.etcd_password, etcd_tls_ca=self.tls.ca_file
        )

    def client_security(self) -> ClusterSecurity:
        """What every service of the cluster presents."""
        return ClusterSecurity(nats=self.nats_security(), etcd=self.etcd_security())
