"""Links an installer can paste: the viewer page and the RTSP URL of a camera.

Light on imports: ``token create`` prints them without loading the daemon's stack.
"""

from __future__ import annotations

from urllib.parse import quote

import ifaddr

from agent.access.model import Protocol, TokenRecord
from agent.config import Config

#: The user name put before the token in RTSP URLs; the agent accepts any.
RTSP_USER = "token"


def lan_addresses(listen_host: str, limit: int | None = 3) -> list[str]:
    """The addresses clients on this network reach a server listening on ``listen_host`` by
    (in printed links, and in the TLS certificate)."""
    if listen_host in ("0.0.0.0", "::", ""):  # noqa: S104 (comparing, not binding)
        addresses = [ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips
                     if isinstance(ip.ip, str) and not ip.ip.startswith("127.")][:limit]
        return addresses or ["127.0.0.1"]
    return [listen_host]


def lan_hosts(listen_host: str, limit: int = 3) -> list[str]:
    """:func:`lan_addresses` as URL hosts (IPv6 in brackets)."""
    return [f"[{h}]" if ":" in h else h for h in lan_addresses(listen_host, limit)]


def viewer_urls(config: Config, token: str) -> list[str]:
    """Links that open the viewer page with ``token`` in the fragment (never sent in a URL);
    https:// when the listener uses TLS."""
    host, port = config.http.host_port
    scheme = "https" if config.http.tls.enabled else "http"
    return [f"{scheme}://{h}:{port}/#token={token}" for h in lan_hosts(host)]


def certificate_names(config: Config) -> list[str]:
    """Every address a viewer may use: all of the LAN addresses, loopback and the WebRTC
    ones."""
    return [*lan_addresses(config.http.host_port[0], limit=None), "127.0.0.1", "::1",
            *config.webrtc.host_addresses]


def rtsp_urls(config: Config, camera: str, token: str | None) -> list[str]:
    """``rtsp://token:<token>@host:port/<camera>`` (Basic credentials, which every RTSP
    client takes from the URL); none when RTSP is off."""
    if not config.rtsp.enabled:
        return []
    host, port = config.rtsp.host_port
    auth = f"{RTSP_USER}:{quote(token, safe='')}@" if token else ""
    return [f"rtsp://{auth}{h}:{port}/{camera}" for h in lan_hosts(host, limit=1)]


def allows_rtsp(record: TokenRecord) -> bool:
    return not record.protocols or Protocol.RTSP in record.protocols
