"""What a check reports, and how a report is judged.

A check has a status, a one-line finding and, for a warning or a failure, a fix an installer
can follow. Findings and fixes pass through ``redact_text`` when they are made, so a camera
password or a token can never reach the output, whatever a peer echoed back.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from agent.logs import redact_text

#: Seconds per network step of a check (``doctor --timeout``).
DEFAULT_TIMEOUT = 5.0


class Status(enum.Enum):
    OK = "ok"
    INFO = "info"  # a fact worth knowing; nothing to fix (no ONVIF, the daemon is running)
    WARN = "warn"  # works, but something will bite (H.265, clock skew, little disk)
    FAIL = "fail"  # the agent cannot do its job here until fixed
    SKIP = "skip"  # does not apply, or an earlier step failed


@dataclass(frozen=True)
class Result:
    group: str  # "agent", "camera <id>", "relay"
    name: str  # short and stable: config, state_dir, dns, rtsp, token …
    status: Status
    finding: str
    fix: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"group": self.group, "check": self.name, "status": self.status.value,
                "finding": self.finding, "fix": self.fix}


def result(group: str, name: str, status: Status, finding: str,
           fix: str | None = None) -> Result:
    """A Result with its text redacted (URLs with passwords, tokens, Authorization values)."""
    return Result(group, name, status, redact_text(finding),
                  redact_text(fix) if fix is not None else None)


@dataclass(frozen=True)
class Report:
    config: str  # where the config came from
    results: list[Result]
    config_error: bool = False  # the config could not be loaded: nothing else ran

    @property
    def failed(self) -> bool:
        return any(r.status is Status.FAIL for r in self.results)

    def counts(self) -> dict[str, int]:
        return {s.value: sum(1 for r in self.results if r.status is s) for s in Status}

    def groups(self) -> list[tuple[str, list[Result]]]:
        """Results grouped in first-seen order (agent, cameras in config order, relay)."""
        order: dict[str, list[Result]] = {}
        for r in self.results:
            order.setdefault(r.group, []).append(r)
        return list(order.items())
