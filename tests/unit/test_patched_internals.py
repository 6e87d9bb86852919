"""What agent/webrtc/speedups.py and agent/webrtc/ice.py reach into in aiortc and aioice.

Both modules replace a library function process-wide. A release that renames it, changes its
signature or stops looking it up through its module would make the replacement fail or, worse,
silently do nothing. pyproject.toml caps both libraries; before raising a cap, run this file
against the new release: each failure names the attribute and the agent module that needs it.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import aioice
import aioice.ice
import aiortc.clock
import aiortc.rtcpeerconnection
import aiortc.rtcrtpsender
import pytest

from agent.webrtc import ice, speedups


def required(module: ModuleType, name: str, user: str) -> Callable[..., Any]:
    """``module.name``, a function, or a failure that says who needs it."""
    value = getattr(module, name, None)
    assert value is not None, (
        f"{module.__name__}.{name} is gone in this release; {user} replaces it")
    assert callable(value), f"{module.__name__}.{name} is no longer a function; {user} replaces it"
    return value  # type: ignore[no-any-return]


def parameters(function: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(function).parameters)


# -- aiortc.clock.current_ntp_time (agent/webrtc/speedups.py) --------------------------------

SPEEDUPS = "agent/webrtc/speedups.py"


def test_aiortc_clock_current_ntp_time_is_a_function_of_no_arguments() -> None:
    original = required(aiortc.clock, "current_ntp_time", SPEEDUPS)
    if original is speedups.ntp_time:  # installed already by another test in this process
        pytest.skip("aiortc.clock.current_ntp_time is the agent's replacement here")
    assert parameters(original) == [], (
        f"aiortc.clock.current_ntp_time now takes {parameters(original)}; the replacement in "
        f"{SPEEDUPS} takes none")
    before = speedups.ntp_time()
    theirs = original()
    after = speedups.ntp_time()
    assert isinstance(theirs, int), (
        f"aiortc.clock.current_ntp_time returns {type(theirs).__name__}, not the int "
        f"(32.32 NTP timestamp) that {SPEEDUPS} returns")
    slack = 1 << 32  # a second, in NTP fixed point
    assert before - slack <= theirs <= after + slack, (
        "aiortc.clock.current_ntp_time no longer means the NTP time the agent's replacement "
        f"computes ({SPEEDUPS})")


@pytest.mark.parametrize("module", [aiortc.rtcrtpsender, aiortc.rtcpeerconnection],
                         ids=lambda m: m.__name__)
def test_aiortc_looks_current_ntp_time_up_through_its_clock_module(module: ModuleType) -> None:
    # speedups.install() rebinds aiortc.clock.current_ntp_time: only callers that write
    # clock.current_ntp_time() at call time see it; a "from .clock import" copy would not.
    assert getattr(module, "clock", None) is aiortc.clock, (
        f"{module.__name__} no longer uses aiortc.clock as a module: the replacement of "
        f"aiortc.clock.current_ntp_time in {SPEEDUPS} would not reach it")
    assert "current_ntp_time" not in vars(module), (
        f"{module.__name__} holds its own current_ntp_time: the replacement in {SPEEDUPS} "
        "would not reach it")
    assert "current_ntp_time" in inspect.getsource(module), (
        f"{module.__name__} no longer calls aiortc.clock.current_ntp_time: check whether "
        f"{SPEEDUPS} is still needed")


def test_the_installed_ntp_time_is_what_aiortc_calls() -> None:
    saved = aiortc.clock.current_ntp_time
    try:
        speedups.install()
        assert vars(aiortc.rtcrtpsender)["clock"].current_ntp_time is speedups.ntp_time
    finally:
        aiortc.clock.current_ntp_time = saved


# -- aioice.ice.get_host_addresses (agent/webrtc/ice.py) -------------------------------------

ICE = "agent/webrtc/ice.py"


@pytest.fixture
def restored_lookup() -> Iterator[None]:
    saved = aioice.ice.get_host_addresses
    yield
    aioice.ice.get_host_addresses = saved


def test_aioice_get_host_addresses_takes_the_arguments_the_replacement_takes(
        restored_lookup: None) -> None:
    ice.install_host_addresses(None)  # aioice's own function
    original = required(aioice.ice, "get_host_addresses", ICE)
    assert parameters(original) == ["use_ipv4", "use_ipv6"], (
        f"aioice.ice.get_host_addresses now takes {parameters(original)}; the replacement in "
        f"{ICE} takes (use_ipv4, use_ipv6) and aioice calls it by those names")
    addresses = original(use_ipv4=True, use_ipv6=False)
    assert isinstance(addresses, list) and all(isinstance(a, str) for a in addresses), (
        f"aioice.ice.get_host_addresses no longer returns a list of address strings ({ICE})")


async def test_aioice_gathers_host_candidates_from_the_replaced_lookup(
        restored_lookup: None) -> None:
    # The real thing: an ICE agent gathers its host candidates through the replacement
    # (loopback only; no STUN server, so nothing leaves the machine).
    ice.install_host_addresses(["127.0.0.1"])
    connection = aioice.Connection(ice_controlling=True)
    started = time.monotonic()
    try:
        await connection.gather_candidates()
        hosts = sorted({c.host for c in connection.local_candidates})
    finally:
        await connection.close()
    assert hosts == ["127.0.0.1"], (
        f"aioice gathered {hosts} although {ICE} replaced aioice.ice.get_host_addresses "
        "with a lookup that offers only 127.0.0.1: aioice no longer calls it")
    assert time.monotonic() - started < 5
