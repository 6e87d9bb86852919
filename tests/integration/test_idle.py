"""An idle agent (one camera nobody watches) sleeps: its threads block and wake only for
what is due, which is what its CPU is made of (docs/field-notes.md, "What the idle agent
spends CPU on").

Wake-ups are read from ``/proc/<pid>/task/*/status``: a thread that blocks (in epoll_wait, on
a lock) and is woken again counts one voluntary context switch.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from tests.support.agent import AgentProcess

SMALL = "testsrc://?size=320x240&fps=15"
#: What the idle daemon is still woken for, per second: the event-loop lag probe (2), the
#: token watcher's full look at the store every 5 s with its worker-thread reads, and the
#: database file check: 3.7-4.5 measured. 17.5 when the token store was polled.
MOST_WAKEUPS = 7.0


def wakeups(pid: int) -> dict[str, int]:
    """Voluntary context switches of each thread of ``pid``."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except FileNotFoundError:  # a thread that just ended
            continue
        found = re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.MULTILINE)
        assert found is not None
        out[task.name] = int(found.group(1))
    return out


async def test_an_idle_agent_wakes_only_for_what_is_due(tmp_path: Path) -> None:
    # the default audit flush interval: an idle writer must not wake for it either
    agent = await AgentProcess.start(tmp_path, [{"id": "cam1", "source": SMALL}],
                                     audit={"flush_interval": 1.0})
    try:
        await agent.token("--camera", "cam1")  # a write by another process, then quiet
        await asyncio.sleep(2)
        before = wakeups(agent.proc.pid)
        seconds = 6.0
        await asyncio.sleep(seconds)
        after = wakeups(agent.proc.pid)
        per_thread = {t: (n - before.get(t, 0)) / seconds for t, n in after.items()}
        assert sum(per_thread.values()) <= MOST_WAKEUPS, per_thread
    finally:
        await agent.stop()
