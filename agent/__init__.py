"""TheRelay Agent: the on-premise daemon behind "Your Cameras. Anywhere. Instantly."."""

from __future__ import annotations

import functools


@functools.cache
def _version() -> str:
    # importlib.metadata costs ~25 ms to import: looked up on first use, not at every start
    # of a CLI command (``therelay-agent token list`` must start fast).
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version("therelay-agent")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0+source"


def __getattr__(name: str) -> str:
    """``agent.__version__``, computed when first asked for (PEP 562)."""
    if name == "__version__":
        return _version()
    raise AttributeError(f"module 'agent' has no attribute {name!r}")
