"""Range pages bounded by count and bytes, merged across shards (dkv.paging)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dkv.paging import cut, kv_bytes, merge_pages
from dkv.v1 import kv_pb2


def _shard_page(
    keys: dict[bytes, int], after: bytes, limit: int, bytes_max: int
) -> kv_pb2.RangeResponse:
    """What one shard answers: its keys >= ``after``, one page (as KvState.range does)."""
    kvs = [kv_pb2.KeyValue(key=k, value=b"v" * keys[k]) for k in sorted(keys) if k >= after]
    resp = kv_pb2.RangeResponse()
    return cut(kvs, limit, bytes_max).fill(resp, count_only=False)


shards = st.lists(
    st.dictionaries(st.binary(min_size=1, max_size=4), st.integers(0, 300), max_size=25),
    min_size=1,
    max_size=5,
)


@settings(max_examples=300, deadline=None)
@given(shards=shards, limit=st.integers(1, 12), bytes_max=st.integers(1, 1200))
def test_paging_a_merged_range_returns_every_key_once_in_order(
    shards: list[dict[bytes, int]], limit: int, bytes_max: int
) -> None:
    # Shards hold disjoint keys.
    owner: dict[bytes, int] = {}
    for i, keys in enumerate(shards):
        for k in keys:
            owner.setdefault(k, i)
    disjoint = [{k: v for k, v in keys.items() if owner[k] == i} for i, keys in enumerate(shards)]
    expected = sorted(owner)
    seen: list[bytes] = []
    after = b""
    for _ in range(len(expected) + 2):
        parts = [_shard_page(keys, after, limit, bytes_max) for keys in disjoint]
        page = merge_pages(parts, limit, bytes_max)
        assert len(page.kvs) <= limit
        if len(page.kvs) > 1:
            assert sum(kv_bytes(kv) for kv in page.kvs) <= bytes_max
        seen.extend(kv.key for kv in page.kvs)
        if not page.more:
            break
        assert page.kvs, "a page that says more must make progress"
        after = page.kvs[-1].key + b"\x00"
    else:
        raise AssertionError("paging did not end")
    assert seen == expected


def test_a_key_larger_than_the_budget_is_still_returned_alone() -> None:
    kvs = [kv_pb2.KeyValue(key=b"a", value=b"x" * 100), kv_pb2.KeyValue(key=b"b", value=b"y")]
    page = cut(kvs, limit=10, bytes_max=10)
    assert [kv.key for kv in page.kvs] == [b"a"] and page.more
    resp = page.fill(kv_pb2.RangeResponse(), count_only=False)
    assert resp.continuation == b"a\x00" and resp.count == 1
