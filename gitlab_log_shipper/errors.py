"""One exception tree for the whole shipper.

Library code raises these (``raise ... from e`` at the boundary where a foreign error is translated);
exactly one place, the CLI, turns them into a message and an exit code. Messages never carry secrets.
"""

from __future__ import annotations


class ShipperError(Exception):
    """Root of every error the shipper raises on purpose."""

    exit_code = 1


class ConfigError(ShipperError):
    """A configuration value is missing or invalid. The message names the variable (never a secret value)."""

    exit_code = 2

    def __init__(self, variable: str, problem: str) -> None:
        self.variable = variable
        self.problem = problem
        super().__init__(f"{variable}: {problem}")


class GitLabSourceError(ShipperError):
    """GitLab could not be read (unreachable, auth, unexpected answer)."""

    def __init__(self, message: str, *, status: int | None = None, gone: bool = False) -> None:
        super().__init__(message)
        self.status = status
        # gone=True: the object was deleted in GitLab (404). That is final, not something to retry.
        self.gone = gone


class DeliveryError(ShipperError):
    """The receiving API or the file output did not take a document."""


class StateError(ShipperError):
    """The state store in STATE_DIR cannot be used: corrupt, unreadable, not writable, missing after it
    existed, or written by a newer version. A restart cannot fix that, so it exits 3, which the systemd
    unit does not restart on (``RestartPreventExitStatus=``); the message names the path and the way out."""

    exit_code = 3


class StateUnavailable(StateError):
    """The store is sound but cannot take a change right now (busy, or a full disk). Nothing was written
    (the transaction was rolled back): the daemon tries again on its next cycle; a command exits 1 and can
    simply be run again."""

    exit_code = 1


class StateBusy(StateUnavailable):
    """Another process held the store's write lock for longer than the busy timeout."""


class StateFull(StateUnavailable):
    """The file system of STATE_DIR is full (SQLITE_FULL, ENOSPC)."""
