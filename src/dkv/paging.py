"""How a Range answer is cut into pages, at a node and at the gateway's merge.

A page holds at most ``limit`` keys (:func:`dkv.keys.range_limit`) *and* about
:data:`PAGE_BYTES_MAX` bytes, so that any range can be read over gRPC (whose messages are
bounded, 4 MiB by default at the receiver) and over HTTP/JSON (the transcoder holds an answer
whole): after nine 1-MiB values under one prefix a Range used to fail with
RESOURCE_EXHAUSTED "message larger than max" instead of paging. Rules:

- keys are taken in key order while the page stays within the byte budget;
- a page always holds at least one key, so a single key larger than the budget is still
  returned (within gRPC's hard message limit: keys and values are bounded by the node);
- when keys remain, the page says ``more`` and ``continuation`` (its last key + ``\\0``).

Merging pages of several shards (:func:`merge_pages`): each shard's page is exact up to its
last key; when a shard says ``more``, keys after its last one are not known yet, so the merged
page ends at the smallest such last key before the limit and the budget are applied.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence

from dkv.v1 import kv_pb2

__all__ = ["KV_OVERHEAD_BYTES", "PAGE_BYTES_MAX", "Page", "cut", "kv_bytes", "merge_pages"]

PAGE_BYTES_MAX = 2 << 20
"""Bytes of keys and values one Range page carries (beyond its first key). Half of gRPC's
default 4 MiB message limit, and ~2.7 MB as base64 JSON, within the transcoder's buffer."""
KV_OVERHEAD_BYTES = 32
"""What a KeyValue costs besides its key and value (revisions, version, field tags)."""


def kv_bytes(kv: kv_pb2.KeyValue) -> int:
    return len(kv.key) + len(kv.value) + KV_OVERHEAD_BYTES


class Page:
    """Keys of one page and whether the range goes on after them."""

    __slots__ = ("kvs", "more")

    def __init__(self, kvs: list[kv_pb2.KeyValue], more: bool) -> None:
        self.kvs = kvs
        self.more = more

    def fill(self, resp: kv_pb2.RangeResponse, count_only: bool) -> kv_pb2.RangeResponse:
        """Set ``kvs`` (unless ``count_only``), ``count``, ``more`` and ``continuation``."""
        resp.more = self.more
        resp.count = len(self.kvs)
        if not count_only:
            resp.kvs.extend(self.kvs)
        if self.more and self.kvs:
            resp.continuation = self.kvs[-1].key + b"\x00"
        return resp


def cut(
    kvs: Iterable[kv_pb2.KeyValue], limit: int, bytes_max: int = PAGE_BYTES_MAX, more: bool = False
) -> Page:
    """The first page of ``kvs`` (in key order) by ``limit`` and ``bytes_max``; ``more``: keys
    beyond ``kvs`` exist."""
    page: list[kv_pb2.KeyValue] = []
    size = 0
    for kv in kvs:
        cost = kv_bytes(kv)
        if len(page) >= limit or (page and size + cost > bytes_max):
            return Page(page, True)
        page.append(kv)
        size += cost
    return Page(page, more)


def merge_pages(
    parts: Sequence[kv_pb2.RangeResponse], limit: int, bytes_max: int = PAGE_BYTES_MAX
) -> Page:
    """One page from the first pages of several disjoint key sets (shards); module docstring."""
    ends = [p.kvs[-1].key for p in parts if p.more and p.kvs]
    known_until = min(ends) if ends else None
    more = any(p.more for p in parts)
    merged = heapq.merge(*(p.kvs for p in parts), key=lambda kv: kv.key)
    if known_until is not None:
        merged = (kv for kv in merged if kv.key <= known_until)
    return cut(merged, limit, bytes_max, more)
