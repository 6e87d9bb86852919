"""``/metrics`` in the Prometheus text format, and the event-loop lag probe behind it.

Values are in base units (bytes, seconds), as Prometheus names them: ``_bytes_total``,
``_bytes_per_second``, ``_seconds``. Per-protocol series exist only for the protocols the
agent serves (``SESSION_PROTOCOLS``); state series list every state, 0 for the others.
"""

from __future__ import annotations

import asyncio
import typing
from collections import Counter
from collections.abc import Callable, Iterable

from aiohttp import web

from agent.access.model import SESSION_PROTOCOLS, Action
from agent.access.service import AccessService
from agent.beat import until_beat
from agent.http.auth import denial, header_token, peer_ip
from agent.media.cameras import Cameras
from agent.media.hub import CameraState

if typing.TYPE_CHECKING:
    from agent.webrtc.rtpsend import ReceptionStats


class LoopLag:
    """How late the event loop runs a callback that asked to run every ``interval``."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.last = 0.0
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            wait = until_beat(self.interval)  # with the other periodic work: one wake-up
            due = loop.time() + wait
            await asyncio.sleep(wait)
            self.last = max(0.0, loop.time() - due)
            self.worst = max(self.worst, self.last)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class RelayState(typing.Protocol):
    """What /metrics reads from the relay link."""

    @property
    def state(self) -> str: ...

    @property
    def publish_sessions(self) -> int: ...


class Metrics:
    def __init__(self, access: AccessService, cameras: Cameras, lag: LoopLag,
                 relay: RelayState | None = None, relay_states: Iterable[str] = (),
                 reception: Callable[[], list[tuple[str, ReceptionStats]]] | None = None,
                 ) -> None:
        """``relay_states``: every state the relay link can be in (one series each);
        ``reception``: live WebRTC viewers' receiver-report figures, by camera."""
        self._reception = reception
        self._access = access
        self._cameras = cameras
        self._lag = lag
        self._relay = relay
        self._relay_states = tuple(relay_states)

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/metrics", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        """Camera ids are not public: scrapers present an admin token (Prometheus:
        ``authorization: {credentials_file: …}``)."""
        decision = await self._access.authorize(header_token(request), None, None,
                                                peer_ip(request), action=Action.ADMIN)
        if not decision.granted:
            return denial(decision)
        return web.Response(text=self.render(), content_type="text/plain",
                            headers={"X-Content-Type-Options": "nosniff"})

    def render(self) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str,
                   samples: list[tuple[dict[str, str], float]]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                out.append(f"{name}{{{text}}} {value}" if text else f"{name} {value}")

        states = Counter(c.hub.status.state for c in self._cameras)
        metric("therelay_cameras", "gauge", "Cameras by state.",
               [({"state": s.value}, float(states[s])) for s in CameraState])
        metric("therelay_viewers", "gauge", "Live sessions by camera and protocol.",
               [({"camera": c.id, "protocol": p.value},
                 float(self._access.sessions.count(c.id, p.value)))
                for c in self._cameras for p in SESSION_PROTOCOLS])
        metric("therelay_authorizations_total", "counter",
               "Authorization decisions by reason.",
               [({"reason": r}, float(n)) for r, n in sorted(self._access.decisions.items())])
        live = sum(s.bytes_sent() for s in self._access.sessions)
        metric("therelay_sent_bytes_total", "counter", "Media bytes sent to viewers.",
               [({}, float(live + self._access.bytes_ended))])
        metric("therelay_camera_received_bytes_total", "counter",
               "Video bytes received from each camera since the agent started.",
               [({"camera": c.id}, float(c.hub.received_bytes)) for c in self._cameras])
        metric("therelay_camera_received_bytes_per_second", "gauge",
               "Video bytes per second from each camera over the last 5 s window (0 when not "
               "pulled).",
               [({"camera": c.id}, (c.hub.status.bitrate_kbps or 0) * 1000 / 8)
                for c in self._cameras])
        if self._reception is not None:
            self._viewer_quality(metric)
        if self._relay is not None:
            metric("therelay_relay_link", "gauge", "Relay control channel state (1 = current).",
                   [({"state": s}, float(self._relay.state == s)) for s in self._relay_states])
            metric("therelay_publish_sessions", "gauge", "WHIP sessions to the relay.",
                   [({}, float(self._relay.publish_sessions))])
        metric("therelay_event_loop_lag_seconds", "gauge",
               "How late the event loop ran a timer, last probe.", [({}, self._lag.last)])
        metric("therelay_event_loop_lag_max_seconds", "gauge",
               "Worst event-loop lag since start.", [({}, self._lag.worst)])
        return "\n".join(out) + "\n"

    def _viewer_quality(self, metric: Callable[..., None]) -> None:
        """Per camera, the worst live WebRTC viewer (from its RTCP receiver reports) and the
        repair work done for the live ones; no series for a camera without such viewers, and
        no family at all while there is none."""
        assert self._reception is not None
        by_camera: dict[str, list[ReceptionStats]] = {}
        for camera_id, stats in self._reception():
            by_camera.setdefault(camera_id, []).append(stats)
        worst = sorted(by_camera.items())
        if not worst:
            return
        metric("therelay_webrtc_viewer_loss_ratio", "gauge",
               "Worst live viewer's fraction of packets lost (last receiver report).",
               [({"camera": c}, max(s.fraction_lost for s in v)) for c, v in worst])
        metric("therelay_webrtc_viewer_jitter_seconds", "gauge",
               "Worst live viewer's interarrival jitter (last receiver report).",
               [({"camera": c}, max(s.jitter_seconds for s in v)) for c, v in worst])
        metric("therelay_webrtc_viewer_rtt_seconds", "gauge",
               "Worst live viewer's round-trip time (from sender/receiver reports).",
               [({"camera": c}, max(s.rtt_seconds or 0.0 for s in v)) for c, v in worst])
        metric("therelay_webrtc_retransmitted_packets", "gauge",
               "Packets resent to the live viewers on NACK (RFC 4585), since each joined.",
               [({"camera": c}, float(sum(s.retransmitted for s in v))) for c, v in worst])
        metric("therelay_webrtc_keyframe_requests", "gauge",
               "PLI/FIR received from the live viewers, since each joined.",
               [({"camera": c}, float(sum(s.keyframe_requests for s in v)))
                for c, v in worst])
