"""Open the agent's state database and the modules on it, from its config: shared by the
daemon and the CLI.

Kept apart from ``agent.app`` so that CLI commands other than ``run`` open the store without
importing the daemon (aiohttp, aiortc, PyAV): ``therelay-agent token list`` must start fast.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from agent.access.policy import Site
from agent.access.store import TokenStore
from agent.config import Config
from agent.discovery.adopted import AdoptedCameras
from agent.state.database import StateDB
from agent.state.db import db_path
from agent.state.outbox import RelayOutbox


@dataclass(frozen=True, slots=True)
class State:
    """The one open database and each module on it."""

    db: StateDB
    tokens: TokenStore
    adopted: AdoptedCameras
    outbox: RelayOutbox

    def close(self) -> None:
        self.db.close()


def open_state(
    config: Config, known_cameras: Callable[[], Collection[str]] | None = None
) -> State:
    """Open (and migrate) the state database of ``config``. ``known_cameras``: the ids a
    camera-scoped token may name; by default the configured and the adopted cameras (the
    CLI), the daemon passes its running camera set, which reloads change."""
    db = StateDB(db_path(config.state_dir))
    adopted = AdoptedCameras(db, config.state_dir)
    if known_cameras is None:
        configured = frozenset(config.camera_ids)

        def known_cameras() -> Collection[str]:
            return configured | {c.id for c in adopted.all()}

    site = Site(config.agent.id, config.agent.account_id)
    tokens = TokenStore(db, site, config.tokens.max_active, known_cameras)
    return State(db, tokens, adopted, RelayOutbox(db))

