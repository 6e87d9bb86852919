"""TLS for the LAN listener: the self-signed certificate, fingerprints, config rules, links."""

from __future__ import annotations

import base64
import datetime
import hashlib
import shutil
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from agent import links
from agent.config import Config, check_secret_files, load
from agent.errors import ConfigError
from agent.http import tls


def config(tmp_path: Path, **tls_section: object) -> Config:
    return load(None, {"THERELAY_STATE_DIR": str(tmp_path / "state"),
                       "THERELAY_HTTP_LISTEN": "192.168.7.20:8443",
                       **{f"THERELAY_HTTP_TLS_{k.upper()}": str(v)
                          for k, v in tls_section.items()}})


def test_a_self_signed_certificate_is_made_once_with_every_name(tmp_path: Path) -> None:
    made = tls.ensure_self_signed(tmp_path, "nvr1", ["192.168.7.20", "10.0.0.5", "not-an-ip"])
    cert_file, key_file = tls.self_signed_paths(tmp_path)
    assert (made.cert_file, made.key_file, made.self_signed) == (cert_file, key_file, True)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {
        "192.168.7.20", "10.0.0.5"}
    assert set(tls.host_names()) <= set(san.get_values_for_type(x509.DNSName))
    assert set(made.names) == {*tls.host_names(), "192.168.7.20", "10.0.0.5"}
    der = ssl.PEM_cert_to_DER_cert(cert_file.read_text())
    assert made.fingerprint.replace(":", "") == hashlib.sha256(der).hexdigest().upper()
    assert len(made.fingerprint) == 95
    spki = base64.b64decode(made.spki_sha256)
    assert len(spki) == 32
    # Kept on the next start (pins stay valid)...
    again = tls.ensure_self_signed(tmp_path, "nvr1", ["192.168.7.99"])
    assert again.fingerprint == made.fingerprint
    # ...and renewed only near its end.
    later = made.not_after - datetime.timedelta(days=10)
    renewed = tls.ensure_self_signed(tmp_path, "nvr1", ["192.168.7.20"], now=later)
    assert renewed.fingerprint != made.fingerprint and renewed.spki_sha256 != made.spki_sha256


def test_the_server_context_takes_the_pair_and_refuses_a_wrong_key(tmp_path: Path) -> None:
    one = tls.ensure_self_signed(tmp_path / "one", "nvr1", ["127.0.0.1"])
    other = tls.ensure_self_signed(tmp_path / "two", "nvr1", ["127.0.0.1"])
    context = tls.server_context(one)
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    mixed = tls.Certificate(one.cert_file, other.key_file, one.fingerprint, one.spki_sha256,
                            one.not_after, one.names, False)
    with pytest.raises(ConfigError, match="cannot be used together"):
        tls.server_context(mixed)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(ConfigError, match="is not a PEM certificate"):
        tls.describe(garbage, other.key_file)


@pytest.mark.parametrize(("section", "message"), [
    ({"cert_file": "/etc/agent.crt"}, "cert_file and key_file go together"),
    ({"key_file": "/etc/agent.key"}, "cert_file and key_file go together"),
    ({"self_signed": "true", "cert_file": "/a.crt", "key_file": "/a.key"}, "not both"),
])
def test_config_rules(tmp_path: Path, section: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, **section)


def test_links_use_https_and_the_key_file_must_be_private(tmp_path: Path) -> None:
    assert links.viewer_urls(config(tmp_path), "T") == ["http://192.168.7.20:8443/#token=T"]
    on = config(tmp_path, self_signed="true")
    assert tls.enabled(on)
    assert links.viewer_urls(on, "T") == ["https://192.168.7.20:8443/#token=T"]
    made = tls.ensure_self_signed(tmp_path / "made", "nvr1", ["192.168.7.20"])
    key = tmp_path / "agent.key"
    shutil.copy(made.key_file, key)
    key.chmod(0o644)
    files = config(tmp_path, cert_file=made.cert_file, key_file=key)
    with pytest.raises(ConfigError, match=f"chmod 600 {key}"):
        check_secret_files(files)
    with pytest.raises(ConfigError, match=f"chmod 600 {key}"):
        tls.certificate(files, [])
    key.chmod(0o600)
    assert tls.certificate(files, []) == tls.describe(made.cert_file, key)
    assert tls.certificate(config(tmp_path), []) is None
