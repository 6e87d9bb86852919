"""Open the agent's token store from its config: shared by the daemon and the CLI.

Kept apart from ``agent.app`` so that CLI commands other than ``run`` open the store without
importing the daemon (aiohttp, aiortc, PyAV): ``therelay-agent token list`` must start fast.
"""

from __future__ import annotations

from agent.access.db import db_path
from agent.access.policy import Site
from agent.access.store import TokenStore
from agent.config import Config
from agent.discovery.adopted import AdoptedCameras


def open_store(config: Config) -> TokenStore:
    """The token store for ``config``: its site identity, limit and known cameras."""
    site = Site(config.agent.id, config.agent.account_id)
    configured = frozenset(config.camera_ids)
    store = TokenStore(db_path(config.state_dir), site, config.tokens.max_active,
                       lambda: configured)
    adopted = AdoptedCameras(store, config.state_dir)
    store.known_cameras = lambda: configured | {c.id for c in adopted.all()}
    return store
