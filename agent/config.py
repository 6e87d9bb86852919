"""Typed configuration: embedded defaults → YAML file → ``THERELAY_*`` environment → validate.

Each component owns a section (one dataclass each). Unknown keys are errors with a "did you
mean" hint; every error names the key path and what is expected. Secrets are never inline:
they come from files or from systemd credentials (``$CREDENTIALS_DIRECTORY``).
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import socket
import stat
import types
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

import yaml

from agent.access.model import is_identifier
from agent.access.sessions import SessionLimits
from agent.access.tokens import FormatProblem, Kind, parse
from agent.errors import ConfigError, SecretFileExposed

ENV_PREFIX = "THERELAY_"
DEFAULT_CONFIG_PATH = Path("/etc/therelay-agent/config.yaml")
SOURCE_SCHEMES = ("rtsp", "rtsps", "testsrc", "file")
LOG_LEVELS = ("debug", "info", "warning", "error")
#: Where systemd looks for ``LoadCredential=NAME`` (systemd.exec(5)); read by the CLI too.
CREDENTIAL_STORES = ("/etc/credstore", "/run/credstore", "/usr/lib/credstore")

# Keys with a fixed set of values are typed with these Literals: the loader accepts exactly
# the values listed and names them in its error (see _convert).
Transport = Literal["tcp", "udp"]
AudioMode = Literal["auto", "passthrough", "off"]
LogFormat = Literal["auto", "json", "console"]
PublishMode = Literal["on_demand", "always"]
#: cameras[].rtsp_auth values (agent/media/sources/rtsp_login.py applies them).
RtspAuth = Literal["auto", "digest", "basic"]
SendPath = Literal["agent", "aiortc"]


def _default_agent_id() -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64].strip("-._")
    return name or "agent"


def _default_state_dir() -> Path:
    systemd = os.environ.get("STATE_DIRECTORY")  # set by StateDirectory= in the unit
    if systemd:
        return Path(systemd.split(":")[0])
    xdg = os.environ.get("XDG_STATE_HOME")
    return Path(xdg) / "therelay-agent" if xdg else Path.home() / ".local/state/therelay-agent"


@dataclass(frozen=True)
class AgentSection:
    id: str = field(default_factory=_default_agent_id)
    account_id: str = "local"


@dataclass(frozen=True)
class TlsSection:
    #: PEM certificate (chain) and its private key for the LAN listener; re-read on SIGHUP.
    cert_file: Path | None = None
    key_file: Path | None = None
    #: Without files: make an ECDSA P-256 key and a self-signed certificate in state_dir on
    #: first start (viewers pin its fingerprint).
    self_signed: bool = False

    @property
    def enabled(self) -> bool:
        return self.self_signed or self.cert_file is not None


@dataclass(frozen=True)
class HttpSection:
    listen: str = "0.0.0.0:8800"
    #: Seconds a client has to send a request's headers (and between requests on a kept-alive
    #: connection): a slow or silent client holds a connection no longer.
    header_timeout: float = 10.0
    #: Open connections at most, overall and from one address; beyond, new ones are closed
    #: at once without being read.
    max_connections: int = 512
    max_connections_per_ip: int = 64
    tls: TlsSection = field(default_factory=TlsSection)

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


@dataclass(frozen=True)
class RtspSection:
    #: Serve cameras to RTSP clients (VMS, NVRs, VLC, FFmpeg) at rtsp://<agent>:8554/<camera>.
    enabled: bool = True
    listen: str = "0.0.0.0:8554"
    #: Seconds a session may go without a request (or RTCP) before it ends; advertised in
    #: the Session header. Sessions set up and never played end after this too.
    session_timeout: float = 60.0

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


@dataclass(frozen=True)
class HlsSection:
    #: Serve cameras over LL-HLS (fMP4) at /hls/<camera>/index.m3u8, for viewers WebRTC cannot
    #: reach and for H.265 cameras in browsers that play H.265 only in HLS.
    enabled: bool = True
    #: Seconds of video per part (LL-HLS partial segment): latency is about 2-3 parts.
    part_duration: float = 0.5
    #: Seconds per segment; segments start at keyframes, so a longer camera GOP wins.
    segment_duration: float = 2.0
    #: Complete segments kept in memory per camera (and listed in the playlist).
    segments: int = 6
    #: Bytes of segments kept per camera at most, in MB (the oldest go first).
    max_memory_mb: int = 64
    #: Seconds an HLS session may go without a request before it ends.
    session_timeout: float = 30.0
    #: Playlist and part requests waiting (blocking reload) at once, for the whole agent;
    #: beyond, 429. Each HLS session may hold 4 of them.
    max_blocking: int = 512


@dataclass(frozen=True)
class CameraConfig:
    id: str
    source: str
    name: str = ""
    #: RTSP transport: tcp (default, works through most networks) or udp.
    transport: Transport = "tcp"
    #: RTSP user name, when it is not in the URL.
    username: str | None = None
    #: File holding the RTSP password (else the systemd credential ``camera-<id>``).
    password_file: Path | None = None
    #: Keep pulling with no viewer (instant start, GOP always warm) instead of on demand.
    always_on: bool = False
    #: auto: G.711 and Opus passed through, AAC transcoded to Opus once; passthrough: no
    #: transcoding; off: video only.
    audio: AudioMode = "auto"
    #: How the RTSP password may travel: auto (Digest, or Basic for a camera that never
    #: asked for Digest), digest (only ever Digest), basic (Basic allowed even after Digest).
    rtsp_auth: RtspAuth = "auto"


@dataclass(frozen=True)
class MediaSection:
    #: Seconds a camera keeps being pulled after its last viewer left.
    idle_grace: float = 30.0
    #: Start new viewers from the cached GOP (last keyframe onwards) instead of waiting.
    gop_cache: bool = True
    #: Packets a slow viewer may have queued before it skips to the next keyframe.
    queue_packets: int = 300
    #: Socket timeout for cameras, seconds (a dead camera is noticed within this).
    camera_timeout: float = 5.0
    #: Longest wait between reconnection attempts to an unreachable camera, seconds.
    reconnect_max: float = 60.0


@dataclass(frozen=True)
class IceServerConfig:
    urls: list[str]
    username: str | None = None
    #: File holding the TURN credential (never inline).
    credential_file: Path | None = None


@dataclass(frozen=True)
class WebrtcSection:
    #: Local addresses offered as ICE host candidates (default: every interface's address).
    host_addresses: list[str] = field(default_factory=list)
    #: Or: the interfaces whose addresses are offered (e.g. [eth0]); ignored when
    #: host_addresses is set.
    interfaces: list[str] = field(default_factory=list)
    #: STUN/TURN servers for viewers outside this network segment.
    ice_servers: list[IceServerConfig] = field(default_factory=list)
    #: Who sends viewers' media: the agent (packetized once per camera, SRTP and UDP GSO per
    #: viewer, its own RTCP) or aiortc's per-packet sender (the fallback).
    send_path: SendPath = "agent"


@dataclass(frozen=True)
class SnapshotSection:
    #: A JPEG is reused for this long, so a burst of requests decodes once.
    cache_seconds: float = 1.0


@dataclass(frozen=True)
class FailedAttemptsSection:
    burst: int = 10
    per_minute: float = 6.0
    max_ips: int = 10_000


@dataclass(frozen=True)
class TokensSection:
    max_active: int = 1000
    max_ips_per_token: int = 100
    failed_attempts: FailedAttemptsSection = field(default_factory=FailedAttemptsSection)


@dataclass(frozen=True)
class AuditSection:
    retention_days: int = 365
    flush_interval: float = 1.0
    #: Denials from one address for one reason within this many seconds share one row.
    denial_window: float = 60.0
    #: Past this size of the state database, denials are only counted (grants never).
    max_size_mb: int = 1024


@dataclass(frozen=True)
class SessionsSection:
    #: Live viewer sessions at most (every protocol), from one address, and still connecting
    #: from one address; beyond, 503 or 429 with Retry-After.
    max_total: int = SessionLimits.max_total
    max_per_ip: int = SessionLimits.max_per_ip
    max_pending_per_ip: int = SessionLimits.max_pending_per_ip
    #: Seconds a WebRTC session has to connect after its answer; then it is closed and
    #: audited as ice_timeout.
    handshake_timeout: float = 10.0


@dataclass(frozen=True)
class LogSection:
    #: auto: console on a terminal, else json.
    format: LogFormat = "auto"
    level: str = "info"  # one of LOG_LEVELS, in any case


@dataclass(frozen=True)
class RelaySection:
    url: str | None = None
    publisher_token_file: Path | None = None
    #: on_demand: publish only what the relay asks for; always: publish continuously to
    #: whip_url_template (any WHIP server), with or without a control channel.
    publish: PublishMode = "on_demand"
    #: For publish: always — {agent_id} and {camera_id} are filled in.
    whip_url_template: str | None = None
    #: For publish: always — the cameras to publish (empty: every camera).
    always_cameras: list[str] = field(default_factory=list)


def _default_mdns_types() -> list[str]:
    return ["_rtsp._tcp.local.", "_rtsps._tcp.local.", "_axis-video._tcp.local."]


@dataclass(frozen=True)
class DiscoverySection:
    #: Watch the network in the background: ONVIF Hello/Bye, mDNS announcements and periodic
    #: probes; an adopted camera that moves to another address is followed there.
    enabled: bool = True
    #: Seconds between background probes (0: only listen for announcements).
    interval: float = 300.0
    #: Seconds a probe (and `therelay-agent discover`) waits for answers.
    probe_timeout: float = 3.0
    #: Look for ONVIF cameras (WS-Discovery on UDP 3702, multicast 239.255.255.250).
    onvif: bool = True
    #: Look for cameras announced over mDNS/DNS-SD (UDP 5353) of these service types.
    mdns: bool = True
    mdns_types: list[str] = field(default_factory=_default_mdns_types)
    #: Interfaces (names like eth0, or their IPv4 addresses) to discover and announce on;
    #: empty: every IPv4 interface but loopback.
    interfaces: list[str] = field(default_factory=list)
    #: Announce the agent as _therelay._tcp.local. (agent id, version, viewer and WHEP paths)
    #: so apps and installers on the LAN find it.
    advertise: bool = True
    #: Networks (CIDR) an adopted camera may move to on its own after proving over ONVIF
    #: that it is the same device; empty: the network it was adopted in. Elsewhere, a move
    #: waits for `therelay-agent cameras move`.
    follow_networks: list[str] = field(default_factory=list)


def _default_cameras() -> list[CameraConfig]:
    return [CameraConfig(id="demo", name="Test pattern", source="testsrc://")]


@dataclass(frozen=True)
class Config:
    agent: AgentSection = field(default_factory=AgentSection)
    state_dir: Path = field(default_factory=_default_state_dir)
    http: HttpSection = field(default_factory=HttpSection)
    cameras: list[CameraConfig] = field(default_factory=_default_cameras)
    media: MediaSection = field(default_factory=MediaSection)
    webrtc: WebrtcSection = field(default_factory=WebrtcSection)
    snapshot: SnapshotSection = field(default_factory=SnapshotSection)
    tokens: TokensSection = field(default_factory=TokensSection)
    audit: AuditSection = field(default_factory=AuditSection)
    sessions: SessionsSection = field(default_factory=SessionsSection)
    log: LogSection = field(default_factory=LogSection)
    relay: RelaySection = field(default_factory=RelaySection)
    rtsp: RtspSection = field(default_factory=RtspSection)
    hls: HlsSection = field(default_factory=HlsSection)
    discovery: DiscoverySection = field(default_factory=DiscoverySection)
    #: Where this config came from (a path, or "embedded defaults"); not a YAML key.
    origin: str = field(default="embedded defaults", compare=False)

    @property
    def camera_ids(self) -> list[str]:
        return [c.id for c in self.cameras]


_NOT_KEYS = {"origin"}


# -- building dataclasses from plain data -------------------------------------------------


def _hint(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(choices)})"


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return None if value is None else _convert(value, args[0], path)
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of keys, got {_kind(value)}")
        return _build(tp, value, path)  # type: ignore[arg-type]
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {_kind(value)}")
        (item,) = get_args(tp)
        return [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:
        return _choice(value, get_args(tp), path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {_kind(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected a whole number, got {_kind(value)}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{path}: expected a number, got {_kind(value)}")
    if tp is Path:
        if isinstance(value, str) and value:
            return Path(value).expanduser()
        raise ConfigError(f"{path}: expected a file or directory path, got {_kind(value)}")
    if tp is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}: expected text, got {_kind(value)}")
    raise TypeError(f"unsupported config type {tp!r}")  # pragma: no cover


def _choice(value: Any, allowed: tuple[str, ...], path: str) -> str:
    """One of ``allowed``. YAML 1.1 reads an unquoted ``off`` as false: taken as "off"."""
    if value is False and "off" in allowed:
        return "off"
    if isinstance(value, str) and value in allowed:
        return value
    raise ConfigError(f"{path}: must be one of {', '.join(allowed)}, got {_kind(value)}")


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", bool: "true/false", str: f"text {value!r}"}.get(
        type(value), f"{type(value).__name__} {value!r}"
    )


def _build(cls: type[Any], data: dict[str, Any], path: str) -> Any:
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls) if f.name not in _NOT_KEYS]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in names:
            raise ConfigError(f"{where}: unknown key{_hint(str(key), names)}")
        kwargs[key] = _convert(value, hints[key], where)
    for f in fields(cls):
        if f.default is MISSING and f.default_factory is MISSING and f.name not in kwargs:
            raise ConfigError(f"{path}.{f.name}: required key is missing")
    return cls(**kwargs)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# -- environment overrides ----------------------------------------------------------------


def _env_keys(cls: type[Any], prefix: str = "") -> dict[str, tuple[str, ...]]:
    """``THERELAY_TOKENS_MAX_ACTIVE`` → ("tokens", "max_active") for every scalar key."""
    out: dict[str, tuple[str, ...]] = {}
    hints = get_type_hints(cls)
    for f in fields(cls):
        if f.name in _NOT_KEYS or get_origin(hints[f.name]) is list:
            continue
        if is_dataclass(hints[f.name]):
            for env, keys in _env_keys(hints[f.name], f"{prefix}{f.name}_").items():
                out[env] = (f.name, *keys)
        else:
            out[f"{ENV_PREFIX}{prefix}{f.name}".upper()] = (f.name,)
    return out


def _leaf_type(keys: tuple[str, ...]) -> Any:
    """The declared type of the key at ``keys`` (``str | None`` → ``str``)."""
    tp: Any = Config
    for key in keys:
        tp = get_type_hints(tp)[key]
    if get_origin(tp) in (Union, types.UnionType):
        return next(a for a in get_args(tp) if a is not type(None))
    return tp


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    known = _env_keys(Config)
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == f"{ENV_PREFIX}CONFIG":
            continue
        if name not in known:
            raise ConfigError(f"environment {name}: unknown setting{_hint(name, sorted(known))}")
        if not raw.strip():
            value = None
        elif (leaf := _leaf_type(known[name])) in (str, Path) or get_origin(leaf) is Literal:
            value = raw.strip()  # text as given: YAML would turn 0123 into 83, off into False
        else:
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                value = raw
            if isinstance(value, dict | list):
                value = raw
        node = out
        *parents, leaf = known[name]
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out


# -- loading and validation ---------------------------------------------------------------


def load(path: Path | None = None, environ: dict[str, str] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then the environment; validated."""
    env = dict(os.environ if environ is None else environ)
    if path is None and env.get(f"{ENV_PREFIX}CONFIG"):
        path = Path(env[f"{ENV_PREFIX}CONFIG"])
    data: dict[str, Any] = {}
    origin = "embedded defaults"
    if path is not None:
        data = _read_yaml(path)
        origin = str(path)
    data = _merge(data, _env_overrides(env))
    config: Config = replace(_build(Config, data, ""), origin=origin)
    validate(config)
    return config


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"config file {path}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections at the top")
    return data


def _tls_problems(tls: TlsSection) -> list[str]:
    problems = []
    if (tls.cert_file is None) != (tls.key_file is None):
        problems.append("http.tls: cert_file and key_file go together (the certificate and "
                        "its key)")
    if tls.self_signed and tls.cert_file is not None:
        problems.append("http.tls: self_signed: true or cert_file/key_file, not both")
    return problems


def validate(config: Config) -> None:
    """Raise ConfigError listing every problem, each with its key path."""
    problems: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    need(is_identifier(config.agent.id),
         f"agent.id: {config.agent.id!r} must be 1-64 letters, digits, '.', '_' or '-'")
    need(is_identifier(config.agent.account_id),
         f"agent.account_id: {config.agent.account_id!r} must be 1-64 letters, digits, '.', "
         "'_' or '-'")
    host, sep, port = config.http.listen.rpartition(":")
    need(bool(sep) and bool(host) and port.isascii() and port.isdigit()
         and 0 < int(port) < 65536,
         f"http.listen: {config.http.listen!r} must be host:port, like 0.0.0.0:8800")
    problems += _tls_problems(config.http.tls)
    host, sep, port = config.rtsp.listen.rpartition(":")
    need(bool(sep) and bool(host) and port.isascii() and port.isdigit()
         and 0 <= int(port) < 65536,
         f"rtsp.listen: {config.rtsp.listen!r} must be host:port, like 0.0.0.0:8554")
    need(1 <= config.rtsp.session_timeout <= 3600,
         "rtsp.session_timeout: must be between 1 and 3600 seconds")
    seen: set[str] = set()
    for i, cam in enumerate(config.cameras):
        need(is_identifier(cam.id),
             f"cameras[{i}].id: {cam.id!r} must be 1-64 letters, digits, '.', '_' or '-'")
        need(cam.id not in seen, f"cameras[{i}].id: {cam.id!r} is used twice")
        seen.add(cam.id)
        scheme = cam.source.partition("://")[0].lower() if "://" in cam.source else ""
        need(scheme in SOURCE_SCHEMES,
             f"cameras[{i}].source: must start with one of "
             f"{', '.join(s + '://' for s in SOURCE_SCHEMES)}")
    m = config.media
    need(m.idle_grace >= 0, "media.idle_grace: must be 0 or more seconds")
    need(m.queue_packets >= 10, "media.queue_packets: must be at least 10")
    need(0 < m.camera_timeout <= 60, "media.camera_timeout: must be between 0 and 60 seconds")
    need(m.reconnect_max >= 1, "media.reconnect_max: must be at least 1 second")
    for i, address in enumerate(config.webrtc.host_addresses):
        need(_is_ip(address),
             f"webrtc.host_addresses[{i}]: {address!r} must be an IP address like 192.168.1.20")
    for i, server in enumerate(config.webrtc.ice_servers):
        for j, url in enumerate(server.urls):
            need(url.startswith(("stun:", "turn:", "turns:")),
                 f"webrtc.ice_servers[{i}].urls[{j}]: {url!r} must start with stun:, turn: "
                 "or turns:")
    need(config.snapshot.cache_seconds >= 0, "snapshot.cache_seconds: must be 0 or more")
    t = config.tokens
    need(t.max_active >= 1, "tokens.max_active: must be at least 1")
    need(t.max_ips_per_token >= 1, "tokens.max_ips_per_token: must be at least 1")
    need(t.failed_attempts.burst >= 1, "tokens.failed_attempts.burst: must be at least 1")
    need(t.failed_attempts.per_minute > 0, "tokens.failed_attempts.per_minute: must be > 0")
    need(t.failed_attempts.max_ips >= 1, "tokens.failed_attempts.max_ips: must be at least 1")
    need(config.audit.retention_days >= 1, "audit.retention_days: must be at least 1")
    need(0 < config.audit.flush_interval <= 60,
         "audit.flush_interval: must be between 0 and 60 seconds")
    _validate_limits(config, need)
    _validate_hls(config.hls, need)
    need(config.log.level.lower() in LOG_LEVELS,
         f"log.level: {config.log.level!r} must be one of {', '.join(LOG_LEVELS)}")
    r = config.relay
    if r.publish == "always":
        need(r.whip_url_template is not None and "{camera_id}" in r.whip_url_template
             and r.whip_url_template.startswith(("https://", "http://")),
             "relay.whip_url_template: publish: always needs an http(s) URL with {camera_id}, "
             "like https://whip.example.net/{agent_id}/{camera_id}")
    for i, camera_id in enumerate(r.always_cameras):
        need(camera_id in config.camera_ids,
             f"relay.always_cameras[{i}]: {camera_id!r} is not one of the cameras")
    if config.relay.url is not None:
        need(config.relay.url.startswith(("wss://", "ws://")),
             "relay.url: must start with wss:// (or ws:// for a relay on this LAN)")
        need(not config.relay.url.startswith("ws://") or _is_lan_url(config.relay.url),
             "relay.url: ws:// (no TLS) only to a private or loopback IP address; use wss://")
    problems.extend(_discovery_problems(config.discovery))
    if problems:
        raise ConfigError("\n".join(problems))


def _validate_limits(config: Config, need: Callable[[bool, str], None]) -> None:
    """The bounds that keep strangers from filling the disk or exhausting descriptors."""
    need(1 <= config.audit.denial_window <= 3600,
         "audit.denial_window: must be 1 to 3600 seconds")
    need(config.audit.max_size_mb >= 16, "audit.max_size_mb: must be at least 16")
    h = config.http
    need(0 < h.header_timeout <= 300, "http.header_timeout: must be between 0 and 300 seconds")
    need(h.max_connections >= 16, "http.max_connections: must be at least 16")
    need(1 <= h.max_connections_per_ip <= h.max_connections,
         "http.max_connections_per_ip: must be 1 to http.max_connections")
    v = config.sessions
    need(v.max_total >= 1, "sessions.max_total: must be at least 1")
    need(1 <= v.max_per_ip <= v.max_total, "sessions.max_per_ip: must be 1 to sessions.max_total")
    need(1 <= v.max_pending_per_ip <= v.max_per_ip,
         "sessions.max_pending_per_ip: must be 1 to sessions.max_per_ip")
    need(1 <= v.handshake_timeout <= 120,
         "sessions.handshake_timeout: must be 1 to 120 seconds")


def _validate_hls(h: HlsSection, need: Callable[[bool, str], None]) -> None:
    need(0.1 <= h.part_duration <= 5, "hls.part_duration: must be 0.1 to 5 seconds")
    need(1 <= h.segment_duration <= 20, "hls.segment_duration: must be 1 to 20 seconds")
    need(h.segment_duration >= 2 * h.part_duration,
         "hls.segment_duration: must be at least twice hls.part_duration")
    need(2 <= h.segments <= 60, "hls.segments: must be 2 to 60")
    need(4 <= h.max_memory_mb <= 4096, "hls.max_memory_mb: must be 4 to 4096")
    need(5 <= h.session_timeout <= 3600, "hls.session_timeout: must be 5 to 3600 seconds")
    need(1 <= h.max_blocking <= 100_000, "hls.max_blocking: must be 1 to 100000")


def _discovery_problems(d: DiscoverySection) -> list[str]:
    out = []
    if not (d.interval == 0 or d.interval >= 10):
        out.append("discovery.interval: must be 0 (announcements only) or at least 10 seconds")
    if not 0.5 <= d.probe_timeout <= 30:
        out.append("discovery.probe_timeout: must be 0.5 to 30 seconds")
    out += _network_problems(d.follow_networks, "discovery.follow_networks")
    for i, service_type in enumerate(d.mdns_types):
        if re.fullmatch(r"_[A-Za-z0-9-]{1,15}\._(tcp|udp)\.local\.", service_type) is None:
            out.append(f"discovery.mdns_types[{i}]: {service_type!r} must look like "
                       "_rtsp._tcp.local.")
    return out


def _network_problems(networks: list[str], key: str) -> list[str]:
    out = []
    for i, network in enumerate(networks):
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            out.append(f"{key}[{i}]: {network!r} is not a network like 192.168.1.0/24")
    return out


def _is_lan_url(url: str) -> bool:
    host = (urlsplit(url).hostname or "").strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    return address.is_private or address.is_loopback


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# -- secrets ------------------------------------------------------------------------------


def read_secret(name: str, path: Path | None, environ: dict[str, str] | None = None) -> str | None:
    """A secret from ``path``, else from the systemd credential ``name``, else None.

    Outside the service (``sudo therelay-agent doctor``, a manual ``run``), the credential
    stores systemd itself reads from are searched too, when this user may read them."""
    env = os.environ if environ is None else environ
    where = path
    if where is None and env.get("CREDENTIALS_DIRECTORY"):
        candidate = Path(env["CREDENTIALS_DIRECTORY"]) / name
        where = candidate if candidate.exists() else None
    elif where is None:
        where = next((c for c in (Path(d) / name for d in CREDENTIAL_STORES)
                      if os.access(c, os.R_OK)), None)
    if where is None:
        return None
    if path is not None and not _systemd_credential(path, env):
        check_private(path, name)
    try:
        value = where.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"secret file {where} for {name} cannot be read: {exc}") from None
    if not value:
        raise ConfigError(f"secret file {where} for {name} is empty")
    return value


def _systemd_credential(path: Path, env: dict[str, str] | os._Environ[str]) -> bool:
    """Is ``path`` inside a systemd credential directory? systemd owns those files' modes."""
    roots = [*CREDENTIAL_STORES, *([env["CREDENTIALS_DIRECTORY"]]
                                   if env.get("CREDENTIALS_DIRECTORY") else [])]
    resolved = path.resolve()
    return any(resolved.is_relative_to(Path(root).resolve()) for root in roots)


def check_private(path: Path, what: str) -> None:
    """Refuse a secret file others may read, as OpenSSH does with private keys: a token or
    password is only as secret as its file. The message carries the fix."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # reading it says what is wrong
    if stat.S_ISREG(mode) and mode & 0o077:
        raise SecretFileExposed(
            f"secret file {path} for {what} can be read or changed by other users (mode "
            f"{stat.S_IMODE(mode):04o}): run 'chmod 600 {path}' (owned by the agent's user)",
            f"chmod 600 {path}")


def check_secret_files(config: Config) -> None:
    """Every secret file the configuration names is private (see ``check_private``); run at
    start, so a readable file stops the agent at once rather than at the first pull."""
    named: list[tuple[Path | None, str]] = [
        (config.relay.publisher_token_file, "publisher-token"),
        *((c.password_file, f"camera-{c.id}") for c in config.cameras),
        *((server.credential_file, f"turn-{i}")
          for i, server in enumerate(config.webrtc.ice_servers)),
        (config.http.tls.key_file, "http.tls.key_file"),
    ]
    for path, what in named:
        if path is not None and not _systemd_credential(path, os.environ):
            check_private(path, what)


def publisher_token(config: Config, environ: dict[str, str] | None = None) -> str | None:
    """The publisher token, checked offline for shape, checksum and kind."""
    token = read_secret("publisher-token", config.relay.publisher_token_file, environ)
    if token is None:
        if config.relay.url is not None or config.relay.publish == "always":
            raise ConfigError(
                "relay.publisher_token_file: the relay is configured but no publisher token was "
                "found: point publisher_token_file at a file holding the trp_ token, or load "
                "the systemd credential 'publisher-token'"
            )
        return None
    parsed = parse(token)
    if parsed is FormatProblem.MALFORMED or parsed is FormatProblem.CORRUPTED:
        raise ConfigError(
            f"relay.publisher_token_file: the publisher token is {parsed.value}: copy the "
            "whole trp_ token from TheRelay Dashboard again"
        )
    if parsed.kind is not Kind.PUBLISHER:
        raise ConfigError(
            "relay.publisher_token_file: this is an "
            f"{parsed.kind.value} token; the relay needs a publisher token (trp_)"
        )
    return token
