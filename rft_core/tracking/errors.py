"""The errors of rft_core.tracking: callers catch `TrackingError` and print its message."""

from __future__ import annotations


class TrackingError(RuntimeError):
    """A tracking or registry operation that cannot be done; the message says why."""


class TrackingUnavailable(TrackingError):
    """The tracking store cannot be reached (a dead server, an unwritable path)."""

    def __init__(self, uri: str, reason: str) -> None:
        super().__init__(f"MLflow tracking store {uri} is unreachable: {reason}")
        self.uri = uri
        self.reason = reason


class TrackingStoreUnusable(TrackingUnavailable):
    """The tracking store is there but cannot be used (not an SQLite database, a directory, corrupt)."""

    def __init__(self, uri: str, reason: str) -> None:
        TrackingError.__init__(self, f"MLflow tracking store {uri} cannot be used: {reason}")
        self.uri = uri
        self.reason = reason


class RegistryError(TrackingError):
    """Unknown registered model or version, nothing to roll back to, a lock never acquired."""
