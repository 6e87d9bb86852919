"""``discover`` and ``cameras list|adopt|remove``: find cameras and add them without YAML.

Adopted cameras live in the state database; the running daemon picks an adoption or a removal
up within a second. Passwords are read from files and never printed back.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import time
from pathlib import Path
from typing import Any, get_args

from agent import logs
from agent.cli.output import emit_json, table
from agent.config import Config, Transport, read_secret
from agent.discovery import trust
from agent.discovery.adopted import (
    AdoptedCamera,
    AdoptedCameras,
    held_move_text,
    rtsp_auth_rule,
)
from agent.discovery.catalog import Sighting, camera_id_for, find, host_of
from agent.discovery.trust import Identity
from agent.errors import AgentError, UsageError
from agent.stores import State


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    disc = sub.add_parser("discover", parents=[common],
                          help="list the cameras that answer on this network (ONVIF, mDNS)")
    disc.add_argument("--timeout", type=float, metavar="S",
                      help="seconds to wait for answers (default: discovery.probe_timeout)")
    _credentials(disc, "asks each ONVIF camera for its profiles and stream URLs with these")
    disc.set_defaults(handler=discover)

    cams = sub.add_parser("cameras", help="list, adopt and remove cameras")
    csub = cams.add_subparsers(dest="cameras_command", required=True, metavar="COMMAND")
    ls = csub.add_parser("list", parents=[common],
                         help="the cameras of this agent: from the config file and adopted")
    ls.set_defaults(handler=list_cameras)

    adopt = csub.add_parser("adopt", parents=[common],
                            help="add a discovered camera (see: therelay-agent discover)")
    adopt.add_argument("camera", metavar="DISCOVERED_ID",
                       help="the ID column of `discover` (or the camera's IP address)")
    adopt.add_argument("--profile", default="main", metavar="main|sub|TOKEN",
                       help="ONVIF stream: main (highest resolution, default), sub (lowest), "
                       "or a profile token")
    adopt.add_argument("--id", dest="camera_id", metavar="NAME",
                       help="the camera id used in tokens and URLs (default: from its name)")
    adopt.add_argument("--transport", choices=get_args(Transport), default="tcp",
                       help="RTSP transport (default tcp)")
    _credentials(adopt, "the camera's user")
    adopt.set_defaults(handler=adopt_camera)

    rm = csub.add_parser("remove", parents=[common], help="remove an adopted camera")
    rm.add_argument("camera_id", metavar="ID")
    rm.set_defaults(handler=remove_camera)

    mv = csub.add_parser("move", parents=[common],
                         help="confirm that an adopted camera now answers at ADDRESS (a move "
                         "discovery held), or that it stays where it is")
    mv.add_argument("camera_id", metavar="ID")
    mv.add_argument("address", metavar="ADDRESS", help="the camera's IP address now")
    mv.set_defaults(handler=move_camera)

    basic = csub.add_parser("allow-basic", parents=[common],
                            help="let an adopted camera's RTSP password go by Basic (in clear)")
    basic.add_argument("camera_id", metavar="ID")
    basic.add_argument("allow", choices=("yes", "no"))
    basic.set_defaults(handler=allow_basic)


def _credentials(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--user", metavar="U", help=what)
    parser.add_argument("--password-file", type=Path, metavar="F",
                        help="file holding the camera's password (never on the command line)")


def _password(args: argparse.Namespace) -> str | None:
    if args.password_file is not None and args.user is None:
        raise UsageError("--password-file needs --user")
    if args.password_file is None:
        return None
    return read_secret("camera password", args.password_file)


def _adopted_by_identity(adopted: AdoptedCameras) -> dict[str, str]:
    return {c.identity: c.id for c in adopted.all()}


# -- discover -----------------------------------------------------------------------------


def discover(args: argparse.Namespace, config: Config, state: State) -> int:
    from agent.discovery.scan import scan  # noqa: PLC0415 (zeroconf and zeep load slowly)

    timeout = args.timeout if args.timeout is not None else config.discovery.probe_timeout
    if not 0.5 <= timeout <= 60:
        raise UsageError("--timeout must be between 0.5 and 60 seconds")
    password = _password(args)
    result = asyncio.run(scan(config.discovery, timeout, username=args.user,
                              password=password))
    adopted = state.adopted
    adopted.remember((s.identity, s.to_dict()) for s in result.sightings)
    owners = _adopted_by_identity(adopted)
    if args.json:
        emit_json({"cameras": [{"id": s.short_id, **_public(s, args.user),
                                "adopted_as": owners.get(s.identity)}
                               for s in result.sightings],
                   "problems": result.problems})
        return 0
    for problem in result.problems:
        print(f"warning: {problem}")
    if not result.sightings:
        print(f"no camera answered within {timeout:g} s. Check that this machine is on the "
              "cameras' network and that ONVIF discovery is on in the cameras' settings.")
        return 0
    rows = [[s.short_id, "+".join(s.methods), s.name or "-", _model(s),
             ", ".join(s.addresses[:2]) or "-", owners.get(s.identity, "no")]
            for s in result.sightings]
    print(table(rows, ["id", "found by", "name", "model", "address", "adopted"]))
    for s in result.sightings:
        lines = _streams(s, args.user)
        if lines:
            print(f"\n{s.short_id} {s.name or ''}".rstrip())
            for line in lines:
                print(f"  {line}")
    print("\nAdopt one with: therelay-agent cameras adopt ID --user U --password-file F")
    return 0


def _model(s: Sighting) -> str:
    parts = [p for p in (s.manufacturer, s.model) if p]
    return " ".join(parts) or s.hardware or "-"


def _with_user(url: str | None, user: str | None) -> str | None:
    """The URL to use, with the user name in it; the password is never printed."""
    if not url or not user or "@" in url.partition("://")[2].partition("/")[0]:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{user}@{rest}"


def _streams(s: Sighting, user: str | None) -> list[str]:
    from agent.discovery.scan import adopt_choice  # noqa: PLC0415 (zeep loads slowly)

    out = []
    for p in s.profiles:
        size = f"{p['width']}x{p['height']}" if p.get("width") else "?"
        fps = f"@{p['fps']:g}" if p.get("fps") else ""
        url = _with_user(p.get("stream_uri"), user) or "(no RTSP stream)"
        out.append(f"profile {p['token']} ({p.get('name') or '-'}): {p.get('encoding') or '?'} "
                   f"{size}{fps}  {logs.redact_text(url)}")
    choice = adopt_choice(s.profiles) if s.profiles else None
    if choice is not None:
        token, note = choice
        out.append(f"adopt takes profile {token}" + (f": {note}" if note else ""))
    out += [f"mDNS: {logs.redact_text(url)}" for url in s.rtsp_urls]
    if s.onvif_error:
        out.append(f"ONVIF: {s.onvif_error}")
    return out


def _public(s: Sighting, user: str | None) -> dict[str, Any]:
    data = s.to_dict()
    data["profiles"] = [{**p, "stream_uri": _with_user(p.get("stream_uri"), user)}
                        for p in s.profiles]
    from agent.discovery.scan import adopt_choice  # noqa: PLC0415 (zeep loads slowly)

    choice = adopt_choice(s.profiles) if s.profiles else None
    data["adopt_profile"], data["adopt_note"] = choice if choice is not None else (None, None)
    return data


# -- cameras list / adopt / remove -----------------------------------------------------------


def list_cameras(args: argparse.Namespace, config: Config, state: State) -> int:
    adopted = state.adopted
    rows: list[dict[str, Any]] = [
        {"id": c.id, "name": c.name, "from": "config", "source": logs.redact_text(c.source),
         "username": c.username} for c in config.cameras]
    configured = set(config.camera_ids)
    for a in adopted.all():
        rows.append({"id": a.id, "name": a.name, "from": f"adopted ({a.method})",
                     "source": logs.redact_text(a.source), "username": a.username,
                     "identity": a.identity, "profile": a.profile,
                     "serial": a.serial, "rtsp_auth": rtsp_auth_rule(a),
                     "move_held": a.pending, "ignored": a.id in configured or None})
    if args.json:
        emit_json({"cameras": rows})
        return 0
    print(table([[r["id"], r["name"] or "-", r["from"], r["source"], r["username"] or "-"]
                 for r in rows], ["id", "name", "from", "source", "user"]))
    for r in rows:
        if r.get("ignored"):
            print(f"warning: adopted camera {r['id']!r} is hidden by a camera of the same id in "
                  "the config file")
        if r.get("move_held"):
            print(f"warning: {held_move_text(r['id'], r['move_held'])}")
    return 0


def adopt_camera(args: argparse.Namespace, config: Config, state: State) -> int:
    adopted = state.adopted
    password = _password(args)
    sightings = [Sighting.from_dict(data) for data, _ in adopted.sightings()]
    sighting = find(sightings, args.camera)
    if sighting is None:  # not in the cache of the last `discover`: look now
        from agent.discovery.scan import scan  # noqa: PLC0415

        result = asyncio.run(scan(config.discovery, config.discovery.probe_timeout,
                                  query=False))
        adopted.remember((s.identity, s.to_dict()) for s in result.sightings)
        sighting = find(result.sightings, args.camera)
    if sighting is None:
        raise UsageError(f"no discovered camera {args.camera!r}: run `therelay-agent discover` "
                         "and use its ID column")
    source, xaddr, method, identity, note = asyncio.run(_stream_of(sighting, args, password))
    taken = [*config.camera_ids, *(c.id for c in adopted.all())]
    camera = AdoptedCamera(
        id=args.camera_id or camera_id_for(sighting, taken), identity=sighting.identity,
        method=method, source=source, name=sighting.name or "", username=args.user,
        profile=args.profile, xaddr=xaddr, transport=args.transport,
        serial=identity.serial, hardware_id=identity.hardware_id,
        home_network=trust.home_network(host_of(source) or ""),
        # An ONVIF camera was just reached: ask its RTSP port too. (An mDNS one is learned at
        # its first connection.)
        rtsp_auth=_rtsp_scheme(source, config.media.camera_timeout) if xaddr else None)
    camera = adopted.add(camera, password, taken=config.camera_ids, actor="cli",
                         now=time.time())
    if args.json:
        emit_json({"adopted": {**_adopted_view(camera), "profile_note": note}})
        return 0
    print(f"adopted {sighting.name or sighting.short_id!s} as camera {camera.id!r}\n"
          f"  stream: {logs.redact_text(camera.source)}\n"
          + (f"  {note}\n" if note else "") +
          "A running agent serves it within a second. Give someone access with:\n"
          f"  therelay-agent token create --camera {camera.id} --ttl 7d")
    return 0


def _rtsp_scheme(source: str, timeout: float) -> str | None:
    """How the camera's RTSP server asks for the password (recorded: a later Basic-only
    answer is then a downgrade, refused). None when it cannot be asked right now."""
    from agent.media.sources import rtsp_login  # noqa: PLC0415

    try:
        return rtsp_login.ask(source, timeout).scheme
    except (AgentError, ValueError):
        return None


async def _stream_of(sighting: Sighting, args: argparse.Namespace,
                     password: str | None) -> tuple[str, str | None, str, Identity, str | None]:
    """(stream URL, ONVIF device URL, method, serial and hardware id, what to know about the
    chosen profile's codec) for the camera, asking it over ONVIF if it can."""
    from agent.discovery import onvif  # noqa: PLC0415
    from agent.discovery.scan import profile_url  # noqa: PLC0415

    if sighting.xaddrs:
        xaddr = sighting.xaddrs[0]
        try:
            device = await onvif.query_device(xaddr, args.user, password, timeout=10.0)
            uri = profile_url(device, xaddr, args.profile)
        except onvif.OnvifAuthError as exc:
            hint = "" if args.user else " (give --user and --password-file)"
            raise AgentError(f"{exc}{hint}") from None
        note = onvif.choice_note(device, args.profile, onvif.choose_profile(device, args.profile))
        return uri, xaddr, "onvif", Identity(device.serial, device.hardware_id), note
    if args.profile != "main":
        raise UsageError("--profile applies to ONVIF cameras; this one was found over mDNS")
    if not sighting.rtsp_urls:
        raise AgentError("this camera announced no RTSP stream over mDNS: add it in the config "
                         "file with its RTSP URL instead")
    return sighting.rtsp_urls[0], None, "mdns", Identity(None, None), None


def _adopted_view(camera: AdoptedCamera) -> dict[str, Any]:
    return {"id": camera.id, "name": camera.name, "method": camera.method,
            "identity": camera.identity, "source": logs.redact_text(camera.source),
            "username": camera.username, "profile": camera.profile}


def move_camera(args: argparse.Namespace, config: Config, state: State) -> int:
    """The installer vouches for the address: stream and ONVIF URLs keep their ports and
    paths, take the new host; the password goes by Digest only from now on (unless allowed)."""
    from agent.discovery.onvif import with_host  # noqa: PLC0415 (zeep loads slowly)

    adopted = state.adopted
    camera = adopted.get(args.camera_id)
    address = args.address.strip().strip("[]")
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise UsageError(f"{args.address!r} is not an IP address (give the camera's address "
                         "now, like 192.168.1.64)") from None
    old = host_of(camera.source)
    if address == old:  # it stays: the held move was not the camera
        adopted.clear_held(camera.id, actor="cli", now=time.time())
        if args.json:
            emit_json({"stays": camera.id, "address": address})
        else:
            print(f"camera {camera.id!r} stays at {address}; the held move is dismissed")
        return 0
    source = with_host(camera.source, address)
    xaddr = with_host(camera.xaddr, address) if camera.xaddr else None
    adopted.moved(camera.id, source, xaddr, actor="cli", now=time.time(),
                  detail={"from": old, "to": address, "proof": "installer"},
                  home_network=trust.home_network(address))
    if args.json:
        emit_json({"moved": camera.id, "source": logs.redact_text(source)})
    else:
        print(f"camera {camera.id!r} is now at {address}: {logs.redact_text(source)}\n"
              "Its password goes only by RTSP Digest from now on; if the camera only "
              f"offers Basic: therelay-agent cameras allow-basic {camera.id} yes")
    return 0


def allow_basic(args: argparse.Namespace, config: Config, state: State) -> int:
    allow = args.allow == "yes"
    state.adopted.set_allow_basic(args.camera_id, allow,
                                                            actor="cli", now=time.time())
    if args.json:
        emit_json({"camera": args.camera_id, "allow_basic": allow})
    elif allow:
        print(f"camera {args.camera_id!r} may receive its password by RTSP Basic (in clear "
              "on the network); say no again once the camera offers Digest")
    else:
        print(f"camera {args.camera_id!r} receives its password by RTSP Digest only")
    return 0


def remove_camera(args: argparse.Namespace, config: Config, state: State) -> int:
    if args.camera_id in config.camera_ids:
        if config.origin == "embedded defaults":
            raise UsageError(f"camera {args.camera_id!r} is the built-in test pattern of the "
                             "embedded defaults: write a config file with your cameras "
                             "(see config.example.yaml) to replace it")
        raise UsageError(f"camera {args.camera_id!r} comes from the config file "
                         f"{config.origin}: remove it there, then `sudo systemctl reload "
                         "therelay-agent`")
    state.adopted.remove(args.camera_id, actor="cli",
                                                   now=time.time())
    if args.json:
        emit_json({"removed": args.camera_id})
    else:
        print(f"removed camera {args.camera_id!r}; its viewers are disconnected within a "
              "second. Tokens scoped to it stay until you revoke them.")
    return 0
