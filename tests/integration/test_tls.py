"""HTTPS on the LAN listener, against the real daemon: curl with the certificate pinned,
the WHEP flow over TLS, the fingerprint where installers look for it, a wrong certificate
refused, and certificate files re-read on SIGHUP.

Chromium over HTTPS (trusting the certificate by its key's hash) is in
test_browser_viewer.py, where the browser has its network namespace.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import signal
import ssl
import stat
from pathlib import Path

import aiohttp
import pytest

from agent.http import tls
from tests.support.agent import AgentProcess, WhepViewer, wait_until

SRC = "testsrc://?size=320x240&fps=15&gop=1"


async def curl(*args: str) -> tuple[int, str]:
    """curl's exit status and body (exit 60: certificate not trusted, 90: pin mismatch)."""
    proc = await asyncio.create_subprocess_exec(
        "curl", "--silent", "--show-error", "--max-time", "10", "--noproxy", "*", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def presented(port: int) -> str:
    """The SHA-256 fingerprint of the certificate the agent presents now."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only reading what is presented
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    await writer.wait_closed()
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


async def test_self_signed_https_is_pinned_and_carries_whep(tmp_path: Path) -> None:
    agent = await AgentProcess.start(tmp_path, [{"id": "cam1", "source": SRC}],
                                     tls={"self_signed": True})
    try:
        cert_file, key_file = tls.self_signed_paths(agent.state_dir)
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        cert = tls.describe(cert_file, key_file)
        assert "127.0.0.1" in cert.names
        (ready,) = [e for e in agent.log_events() if e.get("event") == "tls_ready"]
        assert ready["fingerprint_sha256"] == cert.fingerprint == await presented(agent.port)
        url = f"{agent.base}/healthz"
        # Pinned by the certificate file, or by its key (curl -k then checks only the pin).
        assert (await curl("--cacert", str(cert_file), url))[0] == 0
        assert (await curl("-k", "--pinnedpubkey", f"sha256//{cert.spki_sha256}", url))[0] == 0
        # Another certificate, as an impostor on the LAN would present: refused.
        other = await asyncio.to_thread(tls.ensure_self_signed, tmp_path / "other", "x",
                                        ["127.0.0.1"])
        assert (await curl("--cacert", str(other.cert_file), url))[0] == 60
        assert (await curl("-k", "--pinnedpubkey", f"sha256//{other.spki_sha256}", url))[0] == 90
        assert (await curl(url))[0] == 60  # not trusted by the system's CAs either
        code, _ = await curl(url.replace("https://", "http://"))
        assert code != 0  # nothing is served in clear
        # The WHEP flow over HTTPS, the client trusting exactly this certificate.
        _, token = await agent.token("--camera", "cam1")
        pinned = ssl.create_default_context(cafile=str(cert_file))
        viewer = WhepViewer(agent.base, "cam1", token, tls=pinned)
        try:
            assert await viewer.connect() == 201, viewer.body
            frame = await viewer.frame()
            assert (frame.width, frame.height) == (320, 240)
            assert await viewer.delete() == 200
        finally:
            await viewer.close()
        refused = WhepViewer(agent.base, "cam1", token,
                             tls=ssl.create_default_context(cafile=str(other.cert_file)))
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await refused.connect()
        await refused.close()
        # The fingerprint where installers look: the Studio's host view (admin API), doctor.
        _, admin = await agent.token("--admin")
        async with aiohttp.ClientSession() as http, http.get(
                f"{agent.base}/api/v1/admin/hosts", ssl=pinned,
                headers={"Authorization": f"Bearer {admin}"}) as r:
            host = (await r.json())["hosts"][0]
        assert host["tls"]["fingerprint_sha256"] == cert.fingerprint
        assert host["tls"]["spki_sha256"] == cert.spki_sha256 and host["tls"]["self_signed"]
        doctor = await agent.cli("doctor", "--json", "--timeout", "2")
        checks = {(c["group"], c["check"]): c for c in json.loads(doctor.stdout)["checks"]}
        assert checks[("agent", "tls")]["status"] == "ok"
        assert cert.fingerprint in checks[("agent", "tls")]["finding"]
        assert checks[("agent", "http")]["finding"].startswith("the agent is running")
    finally:
        assert await agent.stop() == 0


async def test_certificate_files_are_read_again_on_sighup(tmp_path: Path) -> None:
    first = await asyncio.to_thread(tls.ensure_self_signed, tmp_path / "a", "site1",
                                    ["127.0.0.1"])
    second = await asyncio.to_thread(tls.ensure_self_signed, tmp_path / "b", "site1",
                                     ["127.0.0.1"])
    cert_file, key_file = tmp_path / "agent.crt", tmp_path / "agent.key"

    def install(made: tls.Certificate) -> None:
        shutil.copy(made.cert_file, cert_file)
        shutil.copy(made.key_file, key_file)
        key_file.chmod(0o600)

    install(first)
    agent = await AgentProcess.start(
        tmp_path, [{"id": "cam1", "source": SRC}],
        tls={"cert_file": str(cert_file), "key_file": str(key_file)})
    try:
        assert await presented(agent.port) == first.fingerprint
        assert (await curl("--cacert", str(first.cert_file), f"{agent.base}/healthz"))[0] == 0
        install(second)  # a renewed certificate
        agent.proc.send_signal(signal.SIGHUP)
        await wait_until(lambda: any(e.get("event") == "tls_reloaded"
                                     for e in agent.log_events()), 10)
        assert await presented(agent.port) == second.fingerprint
        # A broken pair (the old key with the new certificate) keeps the running one.
        shutil.copy(first.key_file, key_file)
        agent.proc.send_signal(signal.SIGHUP)
        await wait_until(lambda: any(e.get("event") == "tls_reload_failed"
                                     for e in agent.log_events()), 10)
        assert await presented(agent.port) == second.fingerprint
        assert (await curl("--cacert", str(second.cert_file), f"{agent.base}/healthz"))[0] == 0
    finally:
        assert await agent.stop() == 0
