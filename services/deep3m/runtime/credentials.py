"""Credentials for a deployment that has none yet: a CA, a certificate, tokens.

``generate_credentials(folder)`` writes a private CA, one certificate it signs
(usable by servers and, for mutual TLS, by clients: ``localhost`` and
``127.0.0.1`` plus any ``hosts``), a client token and one worker token per role,
and returns where they are and the ``DEEP3M_*`` variables each process needs
(``server_env``, ``worker_env(role)``, ``client_env``). Existing credentials in
the folder are reused, so a restarted deployment keeps its tokens. Private keys
and tokens are written with mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deep3m.core.errors import InvalidArgumentError
from deep3m.runtime.channel import ChannelSecurity
from deep3m.runtime.settings import WORKER_ROLES

VALID_DAYS = 365


@dataclass(frozen=True)
class Credentials:
    folder: Path
    ca_file: Path
    cert_file: Path
    key_file: Path
    token_dir: Path
    client_token: str
    worker_tokens: dict[str, str] = field(default_factory=dict)
    mutual_tls: bool = True

    def _tls_env(self) -> dict[str, str]:
        return {
            "DEEP3M_TLS_ENABLED": "true",
            "DEEP3M_TLS_CA_FILE": str(self.ca_file),
            "DEEP3M_TLS_CERT_FILE": str(self.cert_file),
            "DEEP3M_TLS_KEY_FILE": str(self.key_file),
        }

    def server_env(self) -> dict[str, str]:
        """What every server needs: TLS, and the token folder it accepts."""
        return {
            **self._tls_env(),
            "DEEP3M_TLS_CLIENT_AUTH": "true" if self.mutual_tls else "false",
            "DEEP3M_AUTH_ENABLED": "true",
            "DEEP3M_AUTH_TOKEN_DIR": str(self.token_dir),
        }

    def worker_env(self, role: str) -> dict[str, str]:
        """A role's server and its worker: the server settings plus its worker token."""
        return {
            **self.server_env(),
            "DEEP3M_AUTH_TOKEN_FILE": str(self.token_dir / f"worker-{role}"),
        }

    def client_env(self) -> dict[str, str]:
        """The CLI and Python client: TLS and the client token."""
        return {**self._tls_env(), "DEEP3M_AUTH_TOKEN_FILE": str(self.token_dir / "client")}

    def client_security(self) -> ChannelSecurity:
        """A client's channel: TLS (with this certificate, for mutual TLS) and the client token."""
        return ChannelSecurity(
            token=self.client_token,
            tls=True,
            ca_file=str(self.ca_file),
            cert_file=str(self.cert_file),
            key_file=str(self.key_file),
        )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _token(path: Path) -> str:
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    _write_private(path, token.encode())
    return token


def _certificates(folder: Path, hosts: Sequence[str]) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "deep3m CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(("localhost", "127.0.0.1", *hosts)):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "deep3m")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (folder / "ca.pem").write_bytes(ca.public_bytes(pem))
    (folder / "cert.pem").write_bytes(cert.public_bytes(pem))
    _write_private(
        folder / "key.pem",
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


def _layout(root: Path, token: Callable[[Path], str], mutual_tls: bool = True) -> Credentials:
    token_dir = root / "tokens"
    return Credentials(
        root,
        root / "ca.pem",
        root / "cert.pem",
        root / "key.pem",
        token_dir,
        token(token_dir / "client"),
        {role: token(token_dir / f"worker-{role}") for role in WORKER_ROLES},
        mutual_tls,
    )


def generate_credentials(
    folder: Path | str, *, hosts: Sequence[str] = (), mutual_tls: bool = True
) -> Credentials:
    """Create (or reuse) the CA, certificate and tokens under ``folder``."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokens").mkdir(exist_ok=True)
    if not all((root / n).is_file() for n in ("ca.pem", "cert.pem", "key.pem")):
        _certificates(root, hosts)
    return _layout(root, _token, mutual_tls)


def read_credentials(folder: Path | str) -> Credentials:
    """The credentials ``generate_credentials`` wrote under ``folder``, made nothing new;
    InvalidArgumentError naming the file that cannot be read."""

    def existing(path: Path) -> str:
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise InvalidArgumentError(
                f"cannot read the token {path}: {exc.strerror}", field="credentials"
            ) from None

    return _layout(Path(folder), existing)
