"""The KV state machine of one shard: applies committed writes, serves reads.

Rules (the same on every replica, so every replica reaches the same state):

- ``apply(index, command)`` is deterministic: it depends only on the store's contents and the
  command. The shard's revision is the Raft index of the last write that changed something; a
  write whose precondition fails changes nothing (no revision, no event), as in etcd.
- Per key: ``create_revision`` (revision of the put that created it), ``mod_revision`` (of the
  last change), ``version`` (puts since creation; a delete resets it).
- A write carrying a ``request_id`` seen recently returns the stored first response instead of
  applying again: a client retrying after a timeout cannot apply a write twice (Jepsen's lost
  updates). The table is bounded (``max_request_ids``, oldest forgotten first).
- Every change appends an event to a bounded watch history (``watch_history_max_events``);
  watchers asking for revisions older than what is kept get COMPACTED.

Input validation (sizes, empty keys) happens before proposing (:mod:`dkv_node.limits`); a
command in the log is trusted to be well-formed, since rejecting it here would be too late.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from dkv.errors import InvariantViolation

# Defined in dkv.keys (the gateway pages the same way); re-exported for the node's modules.
from dkv.keys import RANGE_LIMIT_DEFAULT, RANGE_LIMIT_MAX, prefix_end, range_limit
from dkv.paging import PAGE_BYTES_MAX, cut
from dkv.v1 import kv_pb2
from dkv.validation import range_bounds

__all__ = [
    "RANGE_LIMIT_DEFAULT",
    "RANGE_LIMIT_MAX",
    "KeyRecord",
    "KvStateMachine",
    "KvStore",
    "MemoryKvStore",
    "prefix_end",
]

# One range-delete command removes at most this many keys (its entry, events and response
# stay small); the API layer repeats the command until the range is empty.
DELETE_RANGE_KEYS_MAX = 1000


@dataclass(frozen=True, slots=True)
class KeyRecord:
    create_revision: int
    mod_revision: int
    version: int
    value: bytes

    def to_proto(self, key: bytes, keys_only: bool = False) -> kv_pb2.KeyValue:
        return kv_pb2.KeyValue(
            key=key,
            create_revision=self.create_revision,
            mod_revision=self.mod_revision,
            version=self.version,
            value=b"" if keys_only else self.value,
        )


class KvStore(Protocol):
    """Where a shard's state lives. Reads must see the writes made earlier in the same apply
    batch. ``hi == b""`` means "no upper bound"."""

    def get(self, key: bytes) -> KeyRecord | None: ...

    def scan(self, lo: bytes, hi: bytes, limit: int) -> list[tuple[bytes, KeyRecord]]: ...

    def scan_page(
        self, lo: bytes, hi: bytes, limit: int, bytes_max: int = 0, count_values: bool = True
    ) -> tuple[list[tuple[bytes, KeyRecord]], bool]:
        """At most ``limit`` keys of ``[lo, hi)``, reading stops after ``bytes_max`` bytes
        (0: no bound); (keys, whether the range ended within them)."""
        ...

    def put(self, key: bytes, rec: KeyRecord) -> None: ...

    def delete(self, key: bytes) -> None: ...

    def revision(self) -> int: ...

    def set_revision(self, revision: int) -> None: ...

    def append_events(self, revision: int, events: Sequence[kv_pb2.Event]) -> None: ...

    def events_since(
        self, revision: int, limit: int, bytes_max: int = 0
    ) -> tuple[list[tuple[int, kv_pb2.Event]], int]:
        """Events with revision >= ``revision`` (at most ``limit``; reading stops once
        ``bytes_max`` bytes of events were read, 0: no bound), and the compact revision:
        events at or below it are gone."""
        ...

    def recall_request(self, request_id: str) -> bytes | None: ...

    def remember_request(self, request_id: str, revision: int, response: bytes) -> None: ...


class KvStateMachine:
    """See the module docstring."""

    def __init__(self, store: KvStore, shard_id: int, member_id: int) -> None:
        self.store = store
        self.shard_id = shard_id
        self.member_id = member_id

    def header(self, raft_term: int = 0) -> kv_pb2.ResponseHeader:
        return kv_pb2.ResponseHeader(
            shard_id=self.shard_id,
            member_id=self.member_id,
            revision=self.store.revision(),
            raft_term=raft_term,
        )

    # -- writes ---------------------------------------------------------------------------------

    def apply(self, index: int, command: bytes) -> kv_pb2.PutResponse | kv_pb2.DeleteResponse:
        """Apply the committed command at Raft ``index``; returns the client's response."""
        cmd = kv_pb2.KvCommand.FromString(command)
        if cmd.request_id:
            seen = self.store.recall_request(cmd.request_id)
            if seen is not None:
                return _decode_response(cmd, seen)
        if index <= self.store.revision():
            raise InvariantViolation(
                f"shard {self.shard_id}: applying index {index} at revision {self.store.revision()}"
            )
        op = cmd.WhichOneof("op")
        resp: kv_pb2.PutResponse | kv_pb2.DeleteResponse
        if op == "put":
            resp = self._put(index, cmd.put)
        elif op == "delete":
            resp = self._delete(index, cmd.delete)
        else:
            raise InvariantViolation(f"shard {self.shard_id}: empty command at {index}")
        if cmd.request_id:
            self.store.remember_request(cmd.request_id, index, resp.SerializeToString())
        return resp

    def _check(self, pre: kv_pb2.Precondition, rec: KeyRecord | None) -> bool:
        which = pre.WhichOneof("condition")
        if which is None:
            return True
        if which == "version":
            return (rec.version if rec else 0) == pre.version
        if which == "mod_revision":
            return (rec.mod_revision if rec else 0) == pre.mod_revision
        return rec is not None and rec.value == pre.value

    def _put(self, rev: int, req: kv_pb2.PutRequest) -> kv_pb2.PutResponse:
        old = self.store.get(req.key)
        if req.HasField("precondition") and not self._check(req.precondition, old):
            resp = kv_pb2.PutResponse(header=self.header(), succeeded=False)
            if old is not None:
                resp.current.CopyFrom(old.to_proto(req.key))
            return resp
        new = KeyRecord(
            create_revision=old.create_revision if old else rev,
            mod_revision=rev,
            version=old.version + 1 if old else 1,
            value=req.value,
        )
        self.store.put(req.key, new)
        self.store.set_revision(rev)
        event = kv_pb2.Event(type=kv_pb2.Event.EVENT_TYPE_PUT, kv=new.to_proto(req.key))
        if old is not None:
            event.prev_kv.CopyFrom(old.to_proto(req.key))
        self.store.append_events(rev, [event])
        resp = kv_pb2.PutResponse(header=self.header(), succeeded=True)
        if req.prev_kv and old is not None:
            resp.prev_kv.CopyFrom(old.to_proto(req.key))
        return resp

    def _delete(self, rev: int, req: kv_pb2.DeleteRequest) -> kv_pb2.DeleteResponse:
        if req.range_end:
            hi = b"" if req.range_end == b"\x00" else req.range_end
            # Bounded per command; the API layer repeats it until nothing is left.
            victims = self.store.scan(req.key, hi, DELETE_RANGE_KEYS_MAX)
        else:
            rec = self.store.get(req.key)
            if req.HasField("precondition") and not self._check(req.precondition, rec):
                resp = kv_pb2.DeleteResponse(header=self.header(), succeeded=False)
                if rec is not None:
                    resp.current.CopyFrom(rec.to_proto(req.key))
                return resp
            victims = [(req.key, rec)] if rec is not None else []
        if not victims:
            return kv_pb2.DeleteResponse(header=self.header(), succeeded=True, deleted=0)
        events = []
        for key, rec in victims:
            self.store.delete(key)
            tomb = kv_pb2.KeyValue(key=key, mod_revision=rev)
            events.append(
                kv_pb2.Event(
                    type=kv_pb2.Event.EVENT_TYPE_DELETE, kv=tomb, prev_kv=rec.to_proto(key)
                )
            )
        self.store.set_revision(rev)
        self.store.append_events(rev, events)
        resp = kv_pb2.DeleteResponse(header=self.header(), succeeded=True, deleted=len(victims))
        if req.prev_kv:
            resp.prev_kvs.extend(rec.to_proto(key) for key, rec in victims)
        return resp

    # -- reads ----------------------------------------------------------------------------------

    def range(self, req: kv_pb2.RangeRequest) -> kv_pb2.RangeResponse:
        """Serve a read from the local state (the caller decided it is fresh enough and the
        request makes sense: :func:`dkv.validation.check_range`). A range is one page by
        count and bytes (:mod:`dkv.paging`)."""
        if not req.prefix and not req.range_end:
            rec = self.store.get(req.key)
            kvs = [rec.to_proto(req.key, req.keys_only)] if rec is not None else []
            resp = kv_pb2.RangeResponse(header=self.header(), count=len(kvs))
            if not req.count_only:
                resp.kvs.extend(kvs)
            return resp
        lo, hi = range_bounds(req)
        if req.continuation:
            lo = req.continuation
        limit = range_limit(req.limit)
        # One extra key tells whether more remain.
        found, complete = self.store.scan_page(
            lo, hi, limit + 1, bytes_max=PAGE_BYTES_MAX, count_values=not req.keys_only
        )
        kvs = [rec.to_proto(k, req.keys_only) for k, rec in found]
        page = cut(kvs, limit, PAGE_BYTES_MAX, more=not complete)
        return page.fill(kv_pb2.RangeResponse(header=self.header()), req.count_only)

    def watch_events(
        self, start_revision: int, lo: bytes, hi: bytes, limit: int, bytes_max: int = 0
    ) -> tuple[list[kv_pb2.Event], int, bool]:
        """Events at or after ``start_revision`` on keys in ``[lo, hi)``: (events, the last
        revision looked at, compacted?). About ``limit`` events and (``bytes_max`` > 0) about
        ``bytes_max`` bytes of them, in whole revisions only (the caller goes on from the
        revision after the last one): fewer when a bound would cut a revision, more when a
        single revision holds more. Compacted means the history no longer reaches back to
        ``start_revision``; the watcher must restart from a snapshot of the range."""
        events, compact_rev = self.store.events_since(start_revision, limit, bytes_max)
        if start_revision <= compact_rev:
            return [], compact_rev, True
        read_bytes = sum(ev.ByteSize() for _, ev in events) if bytes_max else 0
        if len(events) >= limit or (bytes_max and read_bytes >= bytes_max):
            # A bound may have cut the last revision (a range delete has many events at one
            # revision), and the watcher goes on from the revision after ``last``: keep whole
            # revisions only. A single revision that fills the batch is read whole.
            last_rev = events[-1][0]
            whole = [e for e in events if e[0] != last_rev]
            if whole:
                events = whole
            else:
                n = 2 * limit
                while True:
                    more, _ = self.store.events_since(last_rev, n)
                    if len(more) < n or more[-1][0] != last_rev:
                        break
                    n *= 2
                events = [e for e in more if e[0] == last_rev]
        out = []
        last = start_revision - 1
        for rev, ev in events:
            last = rev
            k = ev.kv.key
            if k >= lo and (not hi or k < hi):
                out.append(ev)
        return out, last, False


def _decode_response(
    cmd: kv_pb2.KvCommand, blob: bytes
) -> kv_pb2.PutResponse | kv_pb2.DeleteResponse:
    if cmd.WhichOneof("op") == "put":
        return kv_pb2.PutResponse.FromString(blob)
    return kv_pb2.DeleteResponse.FromString(blob)


class MemoryKvStore:
    """In-memory :class:`KvStore` (sorted keys with bisect): the twin used by unit tests."""

    def __init__(self, max_request_ids: int = 10_000, watch_history_max_events: int = 10_000):
        self._keys: list[bytes] = []
        self._data: dict[bytes, KeyRecord] = {}
        self._rev = 0
        self._events: deque[tuple[int, kv_pb2.Event]] = deque()
        self._compact_rev = 0
        self.watch_history_max_events = watch_history_max_events
        self.max_request_ids = max_request_ids
        self._requests: dict[str, bytes] = {}  # insertion-ordered: oldest first

    def get(self, key: bytes) -> KeyRecord | None:
        return self._data.get(key)

    def scan(self, lo: bytes, hi: bytes, limit: int) -> list[tuple[bytes, KeyRecord]]:
        i = bisect.bisect_left(self._keys, lo)
        j = bisect.bisect_left(self._keys, hi) if hi else len(self._keys)
        return [(k, self._data[k]) for k in self._keys[i : min(j, i + limit)]]

    def scan_page(
        self, lo: bytes, hi: bytes, limit: int, bytes_max: int = 0, count_values: bool = True
    ) -> tuple[list[tuple[bytes, KeyRecord]], bool]:
        i = bisect.bisect_left(self._keys, lo)
        j = bisect.bisect_left(self._keys, hi) if hi else len(self._keys)
        out: list[tuple[bytes, KeyRecord]] = []
        size = 0
        for k in self._keys[i:j]:
            if len(out) >= limit or (bytes_max and out and size >= bytes_max):
                return out, False
            rec = self._data[k]
            out.append((k, rec))
            size += len(k) + (len(rec.value) if count_values else 0)
        return out, True

    def put(self, key: bytes, rec: KeyRecord) -> None:
        if key not in self._data:
            bisect.insort(self._keys, key)
        self._data[key] = rec

    def delete(self, key: bytes) -> None:
        if self._data.pop(key, None) is not None:
            del self._keys[bisect.bisect_left(self._keys, key)]

    def revision(self) -> int:
        return self._rev

    def set_revision(self, revision: int) -> None:
        self._rev = revision

    def append_events(self, revision: int, events: Sequence[kv_pb2.Event]) -> None:
        for ev in events:
            self._events.append((revision, ev))
        while len(self._events) > self.watch_history_max_events:
            rev, _ = self._events.popleft()
            # Keep revisions whole: a watcher must never see half of one revision's events.
            while self._events and self._events[0][0] == rev:
                self._events.popleft()
            self._compact_rev = rev

    def events_since(
        self, revision: int, limit: int, bytes_max: int = 0
    ) -> tuple[list[tuple[int, kv_pb2.Event]], int]:
        out: list[tuple[int, kv_pb2.Event]] = []
        size = 0
        for r, e in self._events:
            if r < revision:
                continue
            if len(out) >= limit or (bytes_max and size >= bytes_max):
                break
            out.append((r, e))
            size += e.ByteSize()
        return out, self._compact_rev

    def recall_request(self, request_id: str) -> bytes | None:
        return self._requests.get(request_id)

    def remember_request(self, request_id: str, revision: int, response: bytes) -> None:
        self._requests[request_id] = response
        while len(self._requests) > self.max_request_ids:
            del self._requests[next(iter(self._requests))]
