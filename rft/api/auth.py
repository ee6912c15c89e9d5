"""Who may call the server: bearer keys from `RFT_API_KEYS` (comma-separated) or a keys file.

With no key configured the server answers anyone who reaches it, so it then listens on loopback
only (`check_bind`); with keys, every request needs `Authorization: Bearer <key>` (the openai
SDK's `api_key`). Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from pathlib import Path

from fastapi import Request

from rft.api.errors import unauthorized

KEYS_ENV = "RFT_API_KEYS"


class AuthConfigError(ValueError):
    """A keys setting that cannot be used (file missing, empty, bind address not allowed)."""


def load_keys(keys_file: Path | None = None, environ: dict[str, str] | None = None) -> frozenset[str]:
    """The accepted keys: `RFT_API_KEYS` and the keys file (one per line, `#` comments), together."""
    environ = dict(os.environ) if environ is None else environ
    keys = {k.strip() for k in environ.get(KEYS_ENV, "").split(",") if k.strip()}
    if keys_file is not None:
        try:
            lines = Path(keys_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise AuthConfigError(f"--api-keys-file {keys_file}: cannot be read: {exc.strerror or exc}") from None
        from_file = {line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")}
        if not from_file:
            raise AuthConfigError(f"--api-keys-file {keys_file}: holds no key (one key per line)")
        keys |= from_file
    return frozenset(keys)


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or `localhost`) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, keys: frozenset[str]) -> str | None:
    """None when the server may listen on `host`; raises when it may not (no key, not loopback).
    Returns the line to say at start when it serves without keys."""
    if keys:
        return None
    if not is_loopback(host):
        raise AuthConfigError(
            f"--host {host} is not a loopback address and no API key is configured: set {KEYS_ENV} "
            "or --api-keys-file, or listen on 127.0.0.1"
        )
    return f"no API key configured ({KEYS_ENV} or --api-keys-file): serving without auth on loopback ({host}) only"


class BearerAuth:
    """A FastAPI dependency: 401 in OpenAI's shape unless the request carries an accepted key."""

    def __init__(self, keys: frozenset[str]) -> None:
        self.keys = keys

    def __call__(self, request: Request) -> None:
        if not self.keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthorized(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>' (the SDK's api_key)."
            )
        token = token.strip()
        if not any(hmac.compare_digest(token.encode(), key.encode()) for key in self.keys):
            raise unauthorized("Incorrect API key provided.")
