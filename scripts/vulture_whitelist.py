# Names the dead-code check (vulture, run by ./test.sh) must not report, and why.
# Vulture sees only Python code in agent/: it cannot know that a library reads an attribute
# we set, that an enum member is reached by its value, or that a record field is written
# to the database or to the wire. Everything else it reports is dead: delete it.
# This file is read by vulture, never imported. Format: `name` or `_.attribute`.

# Read by the library we hand the object to (setters on C objects, callbacks, protocols).
__getattr__  # agent/__init__.py: module attribute hook (PEP 562), called by Python
_.wsse  # onvif.py: zeep reads it when it builds a request
_.StartDoctypeDeclHandler  # wsd_xml.py: expat parser callbacks
_.EntityDeclHandler
_.UnparsedEntityDeclHandler
_.NotationDeclHandler
_.ExternalEntityRefHandler
_.StartElementHandler
_.EndElementHandler
_.CharacterDataHandler
_.layout  # media: PyAV codec context settings, read by FFmpeg when the codec opens
_.bit_rate
_.pix_fmt
_.qmax
_.qmin
_.framerate
_.gop_size
_.async_update_records  # mdns.py: zeroconf RecordUpdateListener callbacks
_.async_update_records_complete
_.datagram_received  # wsd.py: asyncio.DatagramProtocol callbacks
_.error_received
on_state  # webrtc: registered with @pc.on("connectionstatechange")
submit  # stopping.py: concurrent.futures.Executor interface, called by asyncio
_.current_ntp_time  # speedups.py: replaces an aiortc method
_.exc_text  # logs.py: logging.LogRecord fields the formatter reads (a malformed request's
_.stack_info  # record is rewritten to one short line)
_.levelname
_.levelno

# Parameters fixed by the base class's signature.
option_string  # argparse.Action.__call__
cancel_futures  # Executor.shutdown

# Enum members reached by their value (parsed from the database, config or a request).
WEBRTC
RTSP
HLS
READ
PUBLISH

# Record fields: stored in the database, sent on the wire, or part of what a peer reported.
adopted_at
updated_at
snapshot_uri
firmware
serial
hardware_id
clock_offset_s
heartbeat_s

# Counters and states kept so that tests can observe behaviour (one pull per camera, one
# decode per snapshot window, why WS-Discovery dropped a datagram).
_.connections
_.decodes
_.closed
received
hellos
byes
duplicates
oversized
rate_limited
garbage
tracked_ids

# aiortc's RTCRtpSender methods, replaced on one sender instance so that aiortc calls the
# agent's RTCP handling instead (agent/webrtc/internals.py): aiortc reads them, not the agent.
_._handle_rtcp_packet
_._send_rtcp
