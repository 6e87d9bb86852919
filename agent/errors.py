"""The agent's domain errors.

Misuse of an API raises builtins (``ValueError``, ``TypeError``). Failures a user can act on
raise an :class:`AgentError` subclass whose message is written for that user and never
contains a secret::

    AgentError
    ├── ConfigError        invalid or unreadable configuration / secret file
    │   └── SecretFileExposed  a secret file group or others may read (fix: chmod 600)
    ├── UsageError         a command was given a value it cannot use
    ├── StoreError         the state database cannot be opened, migrated or written
    ├── TokenError         a token operation was refused
    │   ├── TokenLimitError    creating would exceed tokens.max_active
    │   ├── TokenReadOnlyError a relay-issued token cannot be changed on the agent
    │   └── NotFoundError      no token with that id
    └── SourceError        a camera source failed
"""


class AgentError(Exception):
    """Base of every error whose message is meant for the user."""


class ConfigError(AgentError):
    """The configuration (or a secret it points at) is invalid."""


class SecretFileExposed(ConfigError):
    """A secret file others may read; ``fix`` is the command that makes it private."""

    def __init__(self, message: str, fix: str) -> None:
        super().__init__(message)
        self.fix = fix


class UsageError(AgentError):
    """A command-line value is unusable (a bad duration, time, protocol, missing option)."""


class StoreError(AgentError):
    """The state database cannot be used."""


class TokenError(AgentError):
    """A token operation was refused; the message says why and what to do."""


class TokenLimitError(TokenError):
    """Creating a token would exceed ``tokens.max_active``."""


class TokenReadOnlyError(TokenError):
    """The token is managed by TheRelay cloud: change it there (revoking stays possible)."""


class NotFoundError(TokenError):
    """No token has that id."""


class SourceError(AgentError):
    """A camera source failed."""
