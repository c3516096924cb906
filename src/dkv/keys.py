"""Key-space helpers shared by the node, the client and the CLI."""

from __future__ import annotations

__all__ = ["prefix_end"]


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with ``prefix`` (b"" = no end)."""
    p = bytearray(prefix)
    while p and p[-1] == 0xFF:
        p.pop()
    if not p:
        return b""
    p[-1] += 1
    return bytes(p)
