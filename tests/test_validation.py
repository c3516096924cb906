"""Every field of every public KV request is checked in one place (dkv.validation)."""

from __future__ import annotations

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
    (kv_pb2.PutRequest(key=b"k", precondition=P(version=-5)), "precondition.version"),
    (kv_pb2.PutRequest(key=b"k", precondition=P(mod_revision=-1)), "precondition.mod_revision"),
    (kv_pb2.DeleteRequest(key=b"b", range_end=b"a"), "range_end must be greater than key"),
    (kv_pb2.DeleteRequest(key=b"k", precondition=P(version=-1)), "precondition.version"),
    (kv_pb2.DeleteRequest(key=b"a", range_end=b"b", precondition=P(version=1)), "one key"),
    (kv_pb2.DeleteRequest(key=b"a", shard_id=1), "shard_id applies to range deletes"),
    (kv_pb2.DeleteRequest(), "key must not be empty"),
    (kv_pb2.WatchRequest(key=b"a", prefix=b"a"), "either prefix"),
    (kv_pb2.WatchRequest(key=b"a", start_revision=-1), "start_revision must be >= 0"),
    (kv_pb2.WatchRequest(key=b"b", range_end=b"a"), "range_end must be greater than key"),
    (kv_pb2.WatchRequest(), "key must not be empty"),
]
GOOD = [
    kv_pb2.RangeRequest(key=b"a"),
    kv_pb2.RangeRequest(key=b"a", consistency=kv_pb2.READ_CONSISTENCY_SERIALIZABLE),
    kv_pb2.RangeRequest(key=b"a", range_end=b"\x00", continuation=b"q"),
    kv_pb2.RangeRequest(prefix=b"a/", limit=10, continuation=b"a/b\x00"),
    kv_pb2.RangeRequest(key=b"a", range_end=b"b", count_only=True, keys_only=True),
    kv_pb2.PutRequest(key=b"k", precondition=P(version=0)),
    kv_pb2.PutRequest(key=b"k", precondition=P(value=b"")),
    kv_pb2.DeleteRequest(key=b"a", range_end=b"\x00", shard_id=2),
    kv_pb2.DeleteRequest(key=b"k", precondition=P(mod_revision=7)),
    kv_pb2.WatchRequest(prefix=b"a", start_revision=5),
    kv_pb2.WatchRequest(key=b"a", range_end=b"b"),
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
    with pytest.raises(InvalidArgument, match=words.replace("(", r"\(")):
        CHECKS[type(req)](req)  # type: ignore[index]


@pytest.mark.parametrize("req", GOOD, ids=[type(r).__name__ for r in GOOD])
def test_sensible_requests_pass(req: object) -> None:
    CHECKS[type(req)](req)  # type: ignore[index]
