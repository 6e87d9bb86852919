"""TLS for the LAN listener: the certificate (given, or self-signed on first start), its
fingerprints, and the server context.

Why these libraries: the standard ``ssl`` module (OpenSSL) serves, through aiohttp's site;
``cryptography`` (already installed, as aiortc's dependency, and the maintained choice in
Python) generates the key and certificate: the standard library cannot build X.509.

A self-signed certificate is trusted by pinning, not by a CA: viewers compare its SHA-256
fingerprint (shown at start, by ``doctor`` and in the Studio's Hosts view), ``curl`` takes
the file itself (``--cacert``) or its key (``--pinnedpubkey``), Chromium the key's hash
(``--ignore-certificate-errors-spki-list``). So the agent keeps the certificate it made
(regenerating it would break every pin) until it nears its end.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.config import Config, check_private
from agent.errors import ConfigError

if TYPE_CHECKING:  # cryptography is imported where a certificate is read or made (TLS on)
    from cryptography import x509

TLS_DIR = "tls"
CERT_NAME = "agent.crt"
KEY_NAME = "agent.key"
#: Lifetime of a self-signed certificate. Pinned, not CA-checked, so a long life spares
#: installers re-pinning; renewed (new key, new fingerprint) within RENEW_BEFORE of its end.
SELF_SIGNED_DAYS = 3650
RENEW_BEFORE = datetime.timedelta(days=30)


@dataclass(frozen=True)
class Certificate:
    """What people compare and pin; never the key."""

    cert_file: Path
    key_file: Path
    #: SHA-256 of the certificate (DER), as AB:CD:… — what browsers show as "fingerprint".
    fingerprint: str
    #: base64 SHA-256 of the public key (SPKI): curl --pinnedpubkey sha256//<this>, and
    #: Chromium's --ignore-certificate-errors-spki-list.
    spki_sha256: str
    not_after: datetime.datetime
    names: tuple[str, ...]
    self_signed: bool

    def log_fields(self) -> dict[str, object]:
        return {"fingerprint_sha256": self.fingerprint, "spki_sha256": self.spki_sha256,
                "not_after": self.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "names": list(self.names), "cert_file": str(self.cert_file),
                "self_signed": self.self_signed}


def enabled(config: Config) -> bool:
    return config.http.tls.enabled


def self_signed_paths(state_dir: Path) -> tuple[Path, Path]:
    return state_dir / TLS_DIR / CERT_NAME, state_dir / TLS_DIR / KEY_NAME


def describe(cert_file: Path, key_file: Path, self_signed: bool = False) -> Certificate:
    """Read a PEM certificate and say what it is; ConfigError naming the file if it is not
    one."""
    from cryptography import x509  # noqa: PLC0415 (only with TLS on)
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except OSError as exc:
        raise ConfigError(f"http.tls.cert_file: {cert_file} cannot be read: "
                          f"{exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"http.tls.cert_file: {cert_file} is not a PEM certificate "
                          "(-----BEGIN CERTIFICATE-----)") from None
    der = cert.public_bytes(serialization.Encoding.DER)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashlib.sha256(der).hexdigest().upper()
    return Certificate(
        cert_file, key_file,
        ":".join(digest[i:i + 2] for i in range(0, len(digest), 2)),
        base64.b64encode(hashlib.sha256(spki).digest()).decode(),
        cert.not_valid_after_utc, _names(cert), self_signed)


def _names(cert: x509.Certificate) -> tuple[str, ...]:
    from cryptography import x509  # noqa: PLC0415 (only with TLS on)

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return (*san.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in san.get_values_for_type(x509.IPAddress)))


def host_names() -> list[str]:
    """The machine's host name and its mDNS name, as viewers may type them."""
    name = socket.gethostname().strip(".") or "localhost"
    short = name.split(".")[0]
    return list(dict.fromkeys([name, short, f"{short}.local"]))


def ensure_self_signed(state_dir: Path, agent_id: str, addresses: list[str],
                       now: datetime.datetime | None = None) -> Certificate:
    """The self-signed certificate in ``state_dir``, made on first start (ECDSA P-256; SANs:
    the host names and ``addresses``; key mode 0600), kept afterwards, renewed near its end.
    Blocking: call in a thread."""
    from cryptography import x509  # noqa: PLC0415 (only with TLS on)
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: PLC0415

    now = now or datetime.datetime.now(datetime.UTC)
    cert_file, key_file = self_signed_paths(state_dir)
    if cert_file.exists() and key_file.exists():
        current = describe(cert_file, key_file, self_signed=True)
        if current.not_after - now > RENEW_BEFORE:
            return current
    cert_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    ips = []
    for address in dict.fromkeys(addresses):
        try:
            ips.append(ipaddress.ip_address(address))
        except ValueError:
            continue
    san = x509.SubjectAlternativeName(
        [x509.DNSName(n) for n in host_names()] + [x509.IPAddress(ip) for ip in ips])
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"TheRelay Agent {agent_id}"[:64])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # a viewer's clock a bit behind
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_encipherment=False, content_commitment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_file, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    tmp = cert_file.with_name(f".{CERT_NAME}.tmp")
    tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tmp.replace(cert_file)
    return describe(cert_file, key_file, self_signed=True)


def _write_private(path: Path, data: bytes) -> None:
    """Write ``path`` with mode 0600 from its first byte (never briefly readable)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)


def certificate(config: Config, addresses: list[str]) -> Certificate | None:
    """The certificate the listener uses (made if self-signed and missing), or None when TLS
    is off. Blocking."""
    t = config.http.tls
    if t.cert_file is not None and t.key_file is not None:
        check_private(t.key_file, "http.tls.key_file")
        return describe(t.cert_file, t.key_file)
    if t.self_signed:
        return ensure_self_signed(config.state_dir, config.agent.id, addresses)
    return None


def server_context(cert: Certificate) -> ssl.SSLContext:
    """A TLS 1.2+ server context with ``cert``; ``reload`` swaps the pair in place."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    reload(context, cert)
    return context


def reload(context: ssl.SSLContext, cert: Certificate) -> None:
    """Load (again) the certificate and key: connections accepted from now on present them;
    the ones already open keep theirs."""
    try:
        context.load_cert_chain(cert.cert_file, cert.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"http.tls: {cert.cert_file} and {cert.key_file} cannot be used together: "
            f"{getattr(exc, 'reason', None) or exc} (is the key the certificate's, in PEM?)"
        ) from None
