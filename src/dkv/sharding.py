"""Keys to slots to shards (DESIGN.md "Keys, shards, placement").

A key's slot is CRC-32 of the key modulo ``SLOT_COUNT``: fixed forever for a cluster, so the
mapping can be computed by any client, gateway or node without asking anyone. Slots map to
shards; until the membership service owns that table, a cluster created with N shards gives
shard i (1-based) the contiguous slot range ``[(i-1)*SLOT_COUNT/N, i*SLOT_COUNT/N)``.
"""

from __future__ import annotations

import zlib

from dkv.errors import InvalidArgument

__all__ = ["SLOT_COUNT", "shard_for_key", "slot_for_key", "static_shard_for_slot"]

SLOT_COUNT = 1024


def slot_for_key(key: bytes) -> int:
    return zlib.crc32(key) % SLOT_COUNT


def static_shard_for_slot(slot: int, shards: int) -> int:
    if shards <= 0 or shards > SLOT_COUNT:
        raise InvalidArgument(f"shard count must be in [1, {SLOT_COUNT}], got {shards}")
    return slot * shards // SLOT_COUNT + 1


def shard_for_key(key: bytes, shards: int) -> int:
    return static_shard_for_slot(slot_for_key(key), shards)
