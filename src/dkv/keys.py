"""Key-space helpers and API limits shared by the node, the gateway, the client and the CLI."""

from __future__ import annotations

__all__ = ["RANGE_LIMIT_DEFAULT", "RANGE_LIMIT_MAX", "prefix_end", "range_limit"]

RANGE_LIMIT_DEFAULT = 1000
"""Keys a Range returns when it sets no limit (the rest: ``more`` and a continuation)."""
RANGE_LIMIT_MAX = 10_000
"""The most keys one Range returns, whatever its limit (bounds a response's size)."""


def range_limit(requested: int) -> int:
    """The page size a Range asking for ``requested`` keys gets (0: the default)."""
    return min(requested, RANGE_LIMIT_MAX) if requested > 0 else RANGE_LIMIT_DEFAULT


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with ``prefix`` (b"" = no end)."""
    p = bytearray(prefix)
    while p and p[-1] == 0xFF:
        p.pop()
    if not p:
        return b""
    p[-1] += 1
    return bytes(p)
