"""TheRelay Agent: the on-premise daemon behind "Your Cameras. Anywhere. Instantly."."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("therelay-agent")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
