"""The one place that says which public ``dkv.v1.KV`` requests make sense.

The gateway checks every request here before routing it and the node checks it again before
serving it (a node is also reachable directly), so a request is refused the same way at
either. Every refusal is :class:`dkv.errors.InvalidArgument` naming the field, which both
answer as ``INVALID_ARGUMENT``. What is checked is the request's own sense (enum values it
defines, integer ranges, fields that exclude each other, a range whose end is before its
start); sizes are the node's configured limits (``dkv_node.limits``), and shards the cluster
does not have are the router's to refuse.

proto3 enums are open: a ``consistency`` of 2 or 99 arrives as that number and would
otherwise be served as some default. Unknown fields cannot be seen here (JSON drops them).
"""

from __future__ import annotations

from dkv.errors import InvalidArgument
from dkv.keys import prefix_end
from dkv.v1 import kv_pb2

__all__ = ["check_delete", "check_put", "check_range", "check_watch", "range_bounds"]

_CONSISTENCY = {
    value.number: value.name
    for value in kv_pb2.DESCRIPTOR.enum_types_by_name["ReadConsistency"].values
}
_RANGE_END_RULE = "range_end must be greater than key (or \\x00 for every key from key on)"


def _enum(field: str, value: int, names: dict[int, str]) -> None:
    if value not in names:
        allowed = ", ".join(f"{name} ({n})" for n, name in sorted(names.items()))
        raise InvalidArgument(f"{field} must be one of {allowed}; got {value}")


def _at_least_zero(field: str, value: int, meaning: str = "") -> None:
    if value < 0:
        raise InvalidArgument(f"{field} must be >= 0{meaning}; got {value}")


def _key_range(key: bytes, range_end: bytes, prefix: bytes) -> None:
    if prefix and (key or range_end):
        raise InvalidArgument("give either prefix, or key (with an optional range_end), not both")
    if not prefix and not key:
        raise InvalidArgument("key must not be empty (or give a prefix)")
    if range_end and range_end != b"\x00" and range_end <= key:
        raise InvalidArgument(_RANGE_END_RULE)


def _precondition(p: kv_pb2.Precondition) -> None:
    which = p.WhichOneof("condition")
    if which == "version":
        _at_least_zero("precondition.version", p.version, " (0: the key must not exist)")
    elif which == "mod_revision":
        _at_least_zero("precondition.mod_revision", p.mod_revision, " (0: the key must not exist)")


def range_bounds(req: kv_pb2.RangeRequest) -> tuple[bytes, bytes]:
    """``[lo, hi)`` a range or prefix Range covers (``hi`` empty: to the end of the keys)."""
    if req.prefix:
        return req.prefix, prefix_end(req.prefix)
    return req.key, (b"" if req.range_end == b"\x00" else req.range_end)


def check_range(req: kv_pb2.RangeRequest) -> None:
    _key_range(req.key, req.range_end, req.prefix)
    _enum("consistency", req.consistency, _CONSISTENCY)
    _at_least_zero("limit", req.limit, " (0: the server's default page size)")
    if req.continuation:
        if not req.prefix and not req.range_end:
            raise InvalidArgument("continuation applies to a range or prefix, not to one key")
        lo, hi = range_bounds(req)
        if req.continuation < lo or (hi and req.continuation >= hi):
            raise InvalidArgument("continuation does not belong to this range")


def check_put(req: kv_pb2.PutRequest) -> None:
    if not req.key:
        raise InvalidArgument("key must not be empty")
    if req.HasField("precondition"):
        _precondition(req.precondition)


def check_delete(req: kv_pb2.DeleteRequest) -> None:
    _key_range(req.key, req.range_end, b"")
    if req.HasField("precondition"):
        if req.range_end:
            raise InvalidArgument("a precondition applies to one key; drop range_end or it")
        _precondition(req.precondition)
    if req.shard_id and not req.range_end:
        raise InvalidArgument("shard_id applies to range deletes (with range_end) only")


def check_watch(req: kv_pb2.WatchRequest) -> None:
    _key_range(req.key, req.range_end, req.prefix)
    _at_least_zero("start_revision", req.start_revision, " (0: changes from now on)")
