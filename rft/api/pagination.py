"""OpenAI's list envelope and cursor pagination: `{"object": "list", "data", "has_more", ...}`, the
page after the object whose id is `after`, at most `limit` objects."""

from __future__ import annotations

from typing import Any

from rft.api.errors import invalid

MAX_LIMIT = 100


def check_limit(limit: int | None, default: int = 20, max_limit: int = MAX_LIMIT) -> int:
    if limit is None:
        return default
    if not 1 <= limit <= max_limit:
        raise invalid(f"limit must be between 1 and {max_limit}, got {limit}", param="limit")
    return limit


def page(
    items: list[dict[str, Any]], after: str | None, limit: int | None, default: int = 20, max_limit: int = MAX_LIMIT
) -> dict[str, Any]:
    """The objects after the one with id `after` (all from the start when None), `limit` of them.
    An `after` that names no object in the list is a 400 naming the param."""
    limit = check_limit(limit, default, max_limit)
    start = 0
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise invalid(f"after: no object with id {after!r} in this list", param="after")
        start = ids.index(after) + 1
    data = items[start : start + limit]
    return {
        "object": "list",
        "data": data,
        "has_more": start + limit < len(items),
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }
