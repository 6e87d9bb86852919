"""The agent as a real daemon process, and a WHEP viewer built on aiortc, for tests.

``AgentProcess`` runs ``python -m agent run --config …`` with a private state directory,
logs to a file under the test's tmp_path (scanned later by the leak check), and offers the
CLI against the same state. ``WhepViewer`` is an aiortc peer that POSTs a recvonly offer and
decodes what the agent sends. Both use loopback only: the agent's ICE host candidates are
pinned to 127.0.0.1 through ``webrtc.host_addresses``, the viewer's through the same helper.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import resource
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aioice.ice import CandidatePair
from aiortc import (
    RTCConfiguration,
    RTCIceTransport,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamTrack

from agent.webrtc.ice import install_host_addresses
from tests.conftest import remember
from tests.support.netns import NetnsPair, free_port


def _limit_open_files(limit: int) -> Any:
    """``ulimit -n LIMIT`` (soft and hard) for a child process, set before it execs."""
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    return apply


class AgentProcess:
    """The daemon and its CLI. The tests' event loops fail on any call that blocks them, so
    everything that waits is a coroutine: ``agent = await AgentProcess.start(…)``,
    ``await agent.token(…)``, ``await agent.stop()``. Synchronous tests and fixtures (no
    loop running) wrap the same coroutines in ``asyncio.run``."""

    #: The interpreter the daemon and its CLI run under: the tests' own; benchmarks set an
    #: installer's venv (tests/bench/installed.py).
    python = sys.executable
    #: Where they run: ``python -m agent`` takes the agent package from there (a benchmark
    #: comparing another revision sets its worktree).
    cwd: Path | None = None

    def __init__(self, tmp: Path, cameras: list[dict[str, Any]],
                 tls: dict[str, Any] | None = None, **sections: Any) -> None:
        """Spawn the daemon; it is usable after ``await healthy()`` (``start`` does both).
        ``tls``: the http.tls section; the agent then serves HTTPS only. ``sections``:
        config sections; ``nofile=N`` instead runs the daemon under ``ulimit -n N``."""
        nofile: int | None = sections.pop("nofile", None)
        self.port = free_port()
        self.base = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.rtsp_port = free_port()
        rtsp = {"listen": f"127.0.0.1:{self.rtsp_port}", **sections.pop("rtsp", {})}
        self.state_dir = tmp / "state"
        config = {"agent": {"id": "site1", "account_id": "acme"},
                  "http": {"listen": f"127.0.0.1:{self.port}", **({"tls": tls} if tls else {})},
                  "webrtc": {"host_addresses": ["127.0.0.1"]},
                  # a port of its own: agents of concurrent tests must not contend for 8554
                  "rtsp": rtsp,
                  "audit": {"flush_interval": 0.1},
                  # the host's namespace: never probe or announce on its real interfaces
                  "discovery": {"enabled": False, "advertise": False},
                  "cameras": cameras}
        for name, section in sections.items():  # a section given merges with the defaults
            base = config.get(name)
            config[name] = ({**base, **section} if isinstance(base, dict)
                            and isinstance(section, dict) else section)
        self.config_path = tmp / f"agent-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.env = {**os.environ, "THERELAY_STATE_DIR": str(tmp / "state"),
                    "THERELAY_LOG_FORMAT": "json", "THERELAY_CONFIG": str(self.config_path)}
        self.log_path = tmp / f"agent-{self.port}.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [self.python, "-m", "agent", "run"], env=self.env, stdout=self._log,
            stderr=subprocess.STDOUT, cwd=self.cwd,
            preexec_fn=_limit_open_files(nofile) if nofile else None)  # noqa: PLW1509

    @classmethod
    async def start(cls, tmp: Path, cameras: list[dict[str, Any]],
                    tls: dict[str, Any] | None = None, **sections: Any) -> AgentProcess:
        agent = cls(tmp, cameras, tls, **sections)
        await agent.healthy()
        return agent

    async def healthy(self) -> None:
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"the agent exited: {self.log_path.read_text()[-2000:]}")
                try:  # up yet? (the TLS tests check the certificate themselves)
                    async with http.get(f"{self.base}/healthz", ssl=False) as response:
                        if response.status == 200:
                            return
                except (OSError, aiohttp.ClientError, TimeoutError):
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError("the agent never became healthy")

    async def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        done = await run_async([self.python, "-m", "agent", *args], env=self.env,
                               stdin=stdin, timeout=60, cwd=self.cwd)
        remember(done.stdout)
        return done

    async def token(self, *args: str) -> tuple[str, str]:
        """Create a token with ``token create ARGS``: (id, token)."""
        result = await self.cli("token", "create", "--json", *args)
        assert result.returncode == 0, result.stderr
        data = json.loads(result.stdout)
        return data["id"], data["token"]

    async def audit(self, *args: str) -> list[dict[str, Any]]:
        result = await self.cli("audit", "--json", "--limit", "1000", *args)
        assert result.returncode == 0, result.stderr
        entries: list[dict[str, Any]] = json.loads(result.stdout)
        return entries

    def log_events(self) -> list[dict[str, Any]]:
        if not self._log.closed:
            self._log.flush()
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append({"event": line})
        return out

    async def stop(self) -> int:
        """SIGTERM and wait. The daemon ran in asyncio debug mode (inherited from the tests):
        a callback that blocked its loop, or any traceback, fails the test here."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = await exited(self.proc, timeout=15)
        self._log.close()
        problems = [e.get("event", "") for e in self.log_events()
                    if (e.get("logger") == "asyncio" and blocked_for(str(e.get("event"))) > 0.5)
                    or "Traceback" in json.dumps(e)]
        assert not problems, f"the daemon's log shows: {problems[:3]}"
        return code


async def run_async(argv: list[str], *, env: dict[str, str] | None = None,
                    stdin: str | None = None, timeout: float = 60, cwd: Path | None = None,
                    ) -> subprocess.CompletedProcess[str]:
    """``subprocess.run(argv, capture_output=True, text=True)`` without blocking the loop."""
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, cwd=cwd, stdin=asyncio.subprocess.PIPE if stdin is not None else None,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(stdin.encode() if stdin is not None else None), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return subprocess.CompletedProcess(argv, proc.returncode, out.decode(), err.decode())


async def exited(proc: subprocess.Popen[Any], timeout: float) -> int:
    """``proc.wait(timeout)`` for a ``subprocess.Popen``, without blocking the loop."""
    deadline = time.monotonic() + timeout
    while (code := proc.poll()) is None:
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        await asyncio.sleep(0.02)
    return code


def blocked_for(message: str) -> float:
    """Seconds from asyncio's "Executing <…> took 0.123 seconds" (0 for other messages).

    asyncio reports callbacks over 100 ms; on a loaded 2-core CI machine the scheduler alone
    can stretch one that far, so only a block of half a second counts as the agent's fault.
    """
    match = re.search(r" took (\d+\.\d+) seconds", message)
    return float(match.group(1)) if match else 0.0


async def wait_until(predicate: Any, timeout: float = 10.0, step: float = 0.05) -> None:
    """Poll ``predicate`` (a function returning a bool, or a coroutine function) until true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        await asyncio.sleep(step)
    raise AssertionError("condition not met in time")


async def nominate_another_pair(ice: RTCIceTransport) -> tuple[CandidatePair, CandidatePair]:
    """The controlling peer of ``ice`` moves to a pair from another of its local addresses,
    as after a network change, and closes its old socket. aiortc and aioice have no public
    way to do this, so this (test side only) drives the peer's aioice connection as aioice
    itself does: a check of the new pair, which carries USE-CANDIDATE (aioice nominates
    aggressively when controlling) and on success makes it the selected pair. Returns the
    old and the new pair."""
    connection = ice._connection
    assert connection.ice_controlling, "only the controlling peer nominates"
    old = connection._nominated[1]
    other = next(p for p in connection._protocols
                 if p.local_candidate.host != old.local_addr[0])
    new = CandidatePair(other, old.remote_candidate)
    await connection.check_start(new)
    assert connection._nominated[1] is new, "the peer's ICE did not select the new pair"
    await old.protocol.close()
    return old, new


class WhepViewer:
    """An aiortc WHEP client: offer, answer, decoded frames."""

    def __init__(self, base: str, camera: str, token: str | None, *, audio: bool = True,
                 via_query: bool = False, host_address: str = "127.0.0.1",
                 tls: ssl.SSLContext | None = None,
                 host_addresses: list[str] | None = None) -> None:
        """``host_addresses``: the viewer's ICE host candidates (default: ``host_address``
        alone), taken when ``connect`` gathers."""
        self.tls: ssl.SSLContext | bool = tls if tls is not None else True
        install_host_addresses(host_addresses or [host_address])
        self.url = f"{base}/whep/{camera}"
        self.base = base
        self.token = token
        self.via_query = via_query
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pc.addTransceiver("video", direction="recvonly")
        if audio:
            self.pc.addTransceiver("audio", direction="recvonly")
        self.tracks: dict[str, MediaStreamTrack] = {}
        self._video = asyncio.get_running_loop().create_future()
        self.pc.on("track", self._on_track)
        self.status = 0
        self.location: str | None = None
        self.body = ""
        self.headers: dict[str, str] = {}

    def _on_track(self, track: MediaStreamTrack) -> None:
        self.tracks[track.kind] = track
        if track.kind == "video" and not self._video.done():
            self._video.set_result(track)

    def _auth(self) -> tuple[str, dict[str, str]]:
        if self.token is None:
            return self.url, {}
        if self.via_query:
            return f"{self.url}?token={self.token}", {}
        return self.url, {"Authorization": f"Bearer {self.token}"}

    async def connect(self, sdp: str | None = None) -> int:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        url, headers = self._auth()
        async with aiohttp.ClientSession() as http:
            response = await http.post(url, data=sdp or self.pc.localDescription.sdp,
                                       headers={**headers, "Content-Type": "application/sdp"},
                                       ssl=self.tls)
            self.status = response.status
            self.body = await response.text()
            self.headers = dict(response.headers)
            self.location = response.headers.get("Location")
        if self.status == 201:
            await self.pc.setRemoteDescription(RTCSessionDescription(self.body, "answer"))
        return self.status

    async def frame(self, timeout: float = 10.0) -> Any:
        track = await asyncio.wait_for(self._video, timeout)
        return await asyncio.wait_for(track.recv(), timeout)

    async def delete(self) -> int:
        assert self.location is not None
        url, headers = self._auth()
        target = self.base + self.location + (url[len(self.url):] if self.via_query else "")
        async with aiohttp.ClientSession() as http:
            response = await http.delete(target, headers=headers, ssl=self.tls)
            return response.status

    async def close(self) -> None:
        await self.pc.close()


class NamespacedAgent:
    """The daemon inside the agent namespace of a NetnsPair (browser tests), and its CLI."""

    def __init__(self, pair: NetnsPair, tmp: Path, cameras: list[dict[str, Any]],
                 env: dict[str, str] | None = None, tls: dict[str, Any] | None = None,
                 **sections: Any) -> None:
        self.pair = pair
        self.port = 8800
        self.base = f"{'https' if tls else 'http'}://{pair.agent_ip}:{self.port}"
        self.state_dir = tmp / "state"
        config = tmp / "agent.yaml"
        config.write_text(yaml.safe_dump({
            "agent": {"id": "site1", "account_id": "acme"},
            "http": {"listen": f"{pair.agent_ip}:{self.port}", **({"tls": tls} if tls else {})},
            "cameras": cameras, **sections,
        }))
        self.env = {**os.environ, "THERELAY_STATE_DIR": str(tmp / "state"),
                    "THERELAY_CONFIG": str(config), "THERELAY_LOG_FORMAT": "json",
                    **(env or {})}
        self.log_path = tmp / "agent.log"
        self.log = self.log_path.open("w")
        self.proc = pair.popen(pair.agent_ns, [sys.executable, "-m", "agent", "run"],
                               env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait()

    def _wait(self) -> None:
        probe = ("import ssl, urllib.request; urllib.request.urlopen("
                 f"'{self.base}/healthz', timeout=1, context=ssl._create_unverified_context())")
        for _ in range(150):
            if self.proc.poll() is not None:
                raise AssertionError(f"the agent exited: {self.log_path.read_text()[-2000:]}")
            if self.pair.run(self.pair.agent_ns, [sys.executable, "-c", probe],
                             capture_output=True).returncode == 0:
                return
            time.sleep(0.2)
        raise AssertionError("the agent did not start in its namespace")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "agent", *args], env=self.env, text=True,
                              capture_output=True, timeout=60, check=False)
        remember(done.stdout)
        return done

    def stop(self) -> None:
        """SIGTERM and wait; a traceback, or a callback that blocked the daemon's loop for
        half a second (asyncio debug mode, inherited from the tests), fails the test."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=15)
        self.log.close()
        problems = [line for line in self.log_path.read_text().splitlines()
                    if "Traceback" in line or blocked_for(line) > 0.5]
        assert not problems, problems[:3]
