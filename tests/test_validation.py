"""Every field of every public KV request is checked in one place (dkv.validation)."""

from __future__ import annotations

import re

import pytest

from dkv.errors import InvalidArgument
from dkv.v1 import kv_pb2
from dkv.validation import check_delete, check_put, check_range, check_watch

P = kv_pb2.Precondition
BAD = [
    # (request, the words the refusal must contain)
    (kv_pb2.RangeRequest(key=b"a", consistency=2), "consistency must be one of"),  # type: ignore[arg-type]
    (kv_pb2.RangeRequest(key=b"a", consistency=99), "got 99"),  # type: ignore[arg-type]
    (kv_pb2.RangeRequest(key=b"a", consistency=-1), "got -1"),  # type: ignore[arg-type]
    (kv_pb2.RangeRequest(prefix=b"a", limit=-1), "limit must be >= 0"),
    (kv_pb2.RangeRequest(prefix=b"a", limit=-(2**63)), "limit must be >= 0"),
    (kv_pb2.RangeRequest(key=b"a", prefix=b"b"), "either prefix"),
    (kv_pb2.RangeRequest(range_end=b"z", prefix=b"b"), "either prefix"),
    (kv_pb2.RangeRequest(key=b"b", range_end=b"a"), "range_end must be greater than key"),
    (kv_pb2.RangeRequest(key=b"b", range_end=b"b"), "range_end must be greater than key"),
    (kv_pb2.RangeRequest(), "key must not be empty"),
    (kv_pb2.RangeRequest(key=b"a", continuation=b"a\x00"), "not to one key"),
    (kv_pb2.RangeRequest(prefix=b"a/", continuation=b"b"), "continuation does not belong"),
    (kv_pb2.RangeRequest(key=b"b", range_end=b"d", continuation=b"a"), "does not belong"),
    (kv_pb2.PutRequest(key=b"", value=b"v"), "key must not be empty"),
    (kv_pb2.PutRequest(key=b"k", value=b"", precondition=P(version=-5)), "precondition.version"),
    (
        kv_pb2.PutRequest(key=b"k", value=b"", precondition=P(mod_revision=-1)),
        "precondition.mod_revision",
    ),
    # Explicit presence (docs/http.md, "Required fields"): what a misspelt JSON field leaves.
    (kv_pb2.PutRequest(key=b"k"), 'value is required (send "" for an empty value)'),
    (kv_pb2.PutRequest(key=b"k", precondition=P(version=1)), "value is required"),
    (kv_pb2.PutRequest(key=b"k", value=b"v", precondition=P()), "set none"),
    (kv_pb2.DeleteRequest(key=b"k", precondition=P()), "must set one of version"),
    (kv_pb2.DeleteRequest(key=b"b", range_end=b"a"), "range_end must be greater than key"),
    (kv_pb2.DeleteRequest(key=b"k", precondition=P(version=-1)), "precondition.version"),
    (kv_pb2.DeleteRequest(key=b"a", range_end=b"b", precondition=P(version=1)), "one key"),
    (kv_pb2.DeleteRequest(key=b"a", shard_id=1), "shard_id applies to range deletes"),
    (kv_pb2.DeleteRequest(), "key must not be empty"),
    (kv_pb2.WatchRequest(key=b"a", prefix=b"a", start_revision=0), "either prefix"),
    (kv_pb2.WatchRequest(key=b"a"), "start_revision is required (0: changes from now on"),
    (kv_pb2.WatchRequest(prefix=b"a", prev_kv=True), "start_revision is required"),
    (kv_pb2.WatchRequest(key=b"a", start_revision=-1), "start_revision must be >= 0"),
    (
        kv_pb2.WatchRequest(key=b"b", range_end=b"a", start_revision=0),
        "range_end must be greater than key",
    ),
    (kv_pb2.WatchRequest(start_revision=0), "key must not be empty"),
]
GOOD = [
    kv_pb2.RangeRequest(key=b"a"),
    kv_pb2.RangeRequest(key=b"a", consistency=kv_pb2.READ_CONSISTENCY_SERIALIZABLE),
    kv_pb2.RangeRequest(key=b"a", range_end=b"\x00", continuation=b"q"),
    kv_pb2.RangeRequest(prefix=b"a/", limit=10, continuation=b"a/b\x00"),
    kv_pb2.RangeRequest(key=b"a", range_end=b"b", count_only=True, keys_only=True),
    kv_pb2.PutRequest(key=b"k", value=b""),  # an empty value, given: written
    kv_pb2.PutRequest(key=b"k", value=b"v", precondition=P(version=0)),
    kv_pb2.PutRequest(key=b"k", value=b"v", precondition=P(value=b"")),
    kv_pb2.DeleteRequest(key=b"a", range_end=b"\x00", shard_id=2),
    kv_pb2.DeleteRequest(key=b"k", precondition=P(mod_revision=7)),
    kv_pb2.WatchRequest(prefix=b"a", start_revision=5),
    kv_pb2.WatchRequest(key=b"a", range_end=b"b", start_revision=0),
]
CHECKS = {
    kv_pb2.RangeRequest: check_range,
    kv_pb2.PutRequest: check_put,
    kv_pb2.DeleteRequest: check_delete,
    kv_pb2.WatchRequest: check_watch,
}


@pytest.mark.parametrize(
    ("req", "words"), BAD, ids=[f"{type(r).__name__}-{i}" for i, (r, _) in enumerate(BAD)]
)
def test_a_request_that_makes_no_sense_is_refused_naming_the_field(req: object, words: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(words)):
        CHECKS[type(req)](req)  # type: ignore[index]


@pytest.mark.parametrize("req", GOOD, ids=[type(r).__name__ for r in GOOD])
def test_sensible_requests_pass(req: object) -> None:
    CHECKS[type(req)](req)  # type: ignore[index]


def test_presence_survives_the_wire() -> None:
    """An empty value that was sent is still "sent" after encoding (optional bytes are written
    even when empty), and one that was not sent is still absent: what the node sees from the
    gateway is what the caller sent."""
    given = kv_pb2.PutRequest.FromString(kv_pb2.PutRequest(key=b"k", value=b"").SerializeToString())
    assert given.HasField("value") and given.value == b""
    check_put(given)
    absent = kv_pb2.PutRequest.FromString(kv_pb2.PutRequest(key=b"k").SerializeToString())
    assert not absent.HasField("value")
    # The bytes etcd's benchmark bodies use (PutRequest key=1, value=2) decode unchanged.
    assert kv_pb2.PutRequest.FromString(b"\x0a\x01k\x12\x01v") == kv_pb2.PutRequest(
        key=b"k", value=b"v"
    )
