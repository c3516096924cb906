"""Conversion between the Raft value types (:mod:`dkv.raft.types`) and their wire schema.

The schema is ``protos/dkv/v1/raft.proto``, compiled into :mod:`dkv.v1.raft_pb2`. The core
never sees protobuf: a host encodes the messages of a Ready with :func:`encode_batch`, one
batch per destination, and feeds what it receives through :func:`decode_batch` to ``step``.

This module is the boundary where wire-level failures become dkv errors: malformed bytes,
enum numbers this build does not know, and membership lists that break :class:`ConfState`'s
invariants all raise :class:`~dkv.errors.InvalidArgument`. So do numbers that do not fit the
schema's uint64 fields when encoding a batch.

Enums are matched by name (``MessageType.APP`` <-> ``MESSAGE_TYPE_APP``), so a member missing
from the schema fails at import rather than on the first message that uses it.
``tests/test_proto.py`` also checks that the numbers agree.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Final, TypeVar, cast

from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper
from google.protobuf.message import DecodeError

from dkv.errors import InvalidArgument
from dkv.raft.types import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    SnapshotChunk,
    SnapshotMetadata,
)
from dkv.v1 import raft_pb2 as pb

__all__ = [
    "conf_change_from_proto",
    "conf_change_to_proto",
    "conf_state_from_proto",
    "conf_state_to_proto",
    "decode_batch",
    "encode_batch",
    "entry_from_proto",
    "entry_to_proto",
    "hard_state_from_proto",
    "hard_state_to_proto",
    "message_from_proto",
    "message_to_proto",
    "snapshot_chunk_from_proto",
    "snapshot_chunk_to_proto",
    "snapshot_metadata_from_proto",
    "snapshot_metadata_to_proto",
]

_E = TypeVar("_E", bound=enum.IntEnum)


def _enum_numbers(py_enum: type[_E], pb_enum: EnumTypeWrapper, prefix: str) -> dict[_E, int]:
    """Map each member of ``py_enum`` to the number of its namesake ``prefix + name`` in the
    schema. Raises ValueError (at import) if the schema lacks a member."""
    return {member: pb_enum.Value(prefix + member.name) for member in py_enum}


# The generated stubs type enum fields as the generated enum classes, while EnumTypeWrapper
# hands out plain ints; the casts state that these ints are those enums' values.
_ENTRY_TYPE_TO_PB: Final = cast(
    "dict[EntryType, pb.EntryType]",
    _enum_numbers(EntryType, pb.EntryType, "ENTRY_TYPE_"),
)
_MESSAGE_TYPE_TO_PB: Final = cast(
    "dict[MessageType, pb.MessageType]",
    _enum_numbers(MessageType, pb.MessageType, "MESSAGE_TYPE_"),
)
_CONF_CHANGE_TYPE_TO_PB: Final = cast(
    "dict[ConfChangeType, pb.ConfChangeType]",
    _enum_numbers(ConfChangeType, pb.ConfChangeType, "CONF_CHANGE_TYPE_"),
)
# Reverse tables, keyed by wire number. proto3 enums are open, so a field may hold a number
# the schema (or this build) does not know: the lookup's KeyError becomes InvalidArgument.
_ENTRY_TYPE_FROM_PB: Final[dict[int, EntryType]] = {v: k for k, v in _ENTRY_TYPE_TO_PB.items()}
_MESSAGE_TYPE_FROM_PB: Final[dict[int, MessageType]] = {
    v: k for k, v in _MESSAGE_TYPE_TO_PB.items()
}
_CONF_CHANGE_TYPE_FROM_PB: Final[dict[int, ConfChangeType]] = {
    v: k for k, v in _CONF_CHANGE_TYPE_TO_PB.items()
}

# ``from`` is a Python keyword, so the generated class has no ``from`` attribute in its stubs
# and the field is reached with getattr/setattr.
_FROM: Final = "from"


def _unknown_enum(what: str, exc: KeyError) -> InvalidArgument:
    return InvalidArgument(f"unknown {what} number {exc.args[0]} on the wire")


# -- Entry ------------------------------------------------------------------------------------


def entry_to_proto(entry: Entry) -> pb.Entry:
    return pb.Entry(
        term=entry.term,
        index=entry.index,
        type=_ENTRY_TYPE_TO_PB[entry.type],
        data=entry.data,
    )


def entry_from_proto(p: pb.Entry) -> Entry:
    try:
        entry_type = _ENTRY_TYPE_FROM_PB[p.type]
    except KeyError as exc:
        raise _unknown_enum("entry type", exc) from exc
    return Entry(p.term, p.index, entry_type, p.data)


# -- HardState, ConfState, snapshots ------------------------------------------------------------


def hard_state_to_proto(hs: HardState) -> pb.HardState:
    return pb.HardState(term=hs.term, vote=hs.vote, commit=hs.commit)


def hard_state_from_proto(p: pb.HardState) -> HardState:
    return HardState(term=p.term, vote=p.vote, commit=p.commit)


def conf_state_to_proto(cs: ConfState) -> pb.ConfState:
    return pb.ConfState(voters=cs.voters, learners=cs.learners)


def conf_state_from_proto(p: pb.ConfState) -> ConfState:
    """Raises InvalidArgument if the lists are unsorted, repeat an id, or overlap."""
    return ConfState(tuple(p.voters), tuple(p.learners))


def snapshot_metadata_to_proto(meta: SnapshotMetadata) -> pb.SnapshotMetadata:
    return pb.SnapshotMetadata(
        index=meta.index, term=meta.term, conf_state=conf_state_to_proto(meta.conf_state)
    )


def snapshot_metadata_from_proto(p: pb.SnapshotMetadata) -> SnapshotMetadata:
    return SnapshotMetadata(
        index=p.index, term=p.term, conf_state=conf_state_from_proto(p.conf_state)
    )


def snapshot_chunk_to_proto(chunk: SnapshotChunk) -> pb.SnapshotChunk:
    return pb.SnapshotChunk(
        metadata=snapshot_metadata_to_proto(chunk.metadata),
        offset=chunk.offset,
        data=chunk.data,
        done=chunk.done,
        total_bytes=chunk.total_bytes,
    )


def snapshot_chunk_from_proto(p: pb.SnapshotChunk) -> SnapshotChunk:
    return SnapshotChunk(
        metadata=snapshot_metadata_from_proto(p.metadata),
        offset=p.offset,
        data=p.data,
        done=p.done,
        total_bytes=p.total_bytes,
    )


# -- ConfChange ---------------------------------------------------------------------------------
# Not used by encode_batch: a CONF_CHANGE entry's data is ConfChange.encode(), which is opaque
# to the wire. These serve APIs that carry a change as a message (e.g. an admin RPC).


def conf_change_to_proto(cc: ConfChange) -> pb.ConfChange:
    return pb.ConfChange(
        type=_CONF_CHANGE_TYPE_TO_PB[cc.type], node_id=cc.node_id, context=cc.context
    )


def conf_change_from_proto(p: pb.ConfChange) -> ConfChange:
    try:
        cc_type = _CONF_CHANGE_TYPE_FROM_PB[p.type]
    except KeyError as exc:
        raise _unknown_enum("conf change type", exc) from exc
    return ConfChange(cc_type, p.node_id, p.context)


# -- Message ------------------------------------------------------------------------------------


def message_to_proto(m: Message) -> pb.Message:
    p = pb.Message(
        type=_MESSAGE_TYPE_TO_PB[m.type],
        to=m.to,
        term=m.term,
        log_term=m.log_term,
        index=m.index,
        commit=m.commit,
        reject=m.reject,
        reject_hint=m.reject_hint,
        context=m.context,
    )
    setattr(p, _FROM, m.frm)
    if m.entries:
        # Appending through the container builds each Entry in place, rather than building a
        # detached pb.Entry per entry that the constructor would then copy.
        add = p.entries.add
        for e in m.entries:
            add(term=e.term, index=e.index, type=_ENTRY_TYPE_TO_PB[e.type], data=e.data)
    if m.snapshot is not None:
        p.snapshot.CopyFrom(snapshot_chunk_to_proto(m.snapshot))
    return p


def message_from_proto(p: pb.Message) -> Message:
    """Raises InvalidArgument for an unknown message or entry type, or a malformed ConfState."""
    try:
        msg_type = _MESSAGE_TYPE_FROM_PB[p.type]
    except KeyError as exc:
        raise _unknown_enum("message type", exc) from exc
    entries: tuple[Entry, ...] = ()
    if p.entries:
        types = _ENTRY_TYPE_FROM_PB
        try:
            entries = tuple([Entry(e.term, e.index, types[e.type], e.data) for e in p.entries])
        except KeyError as exc:
            raise _unknown_enum("entry type", exc) from exc
    return Message(
        type=msg_type,
        to=p.to,
        frm=getattr(p, _FROM),
        term=p.term,
        log_term=p.log_term,
        index=p.index,
        entries=entries,
        commit=p.commit,
        snapshot=snapshot_chunk_from_proto(p.snapshot) if p.HasField("snapshot") else None,
        reject=p.reject,
        reject_hint=p.reject_hint,
        context=p.context,
    )


# -- Batches: the unit the transport sends --------------------------------------------------------


def encode_batch(messages: Iterable[Message]) -> bytes:
    """Serialize ``messages`` (in order) as one MessageBatch.

    Raises InvalidArgument if a number does not fit its uint64 field (e.g. a negative term).
    """
    batch = pb.MessageBatch()
    append = batch.messages.append
    try:
        for m in messages:
            append(message_to_proto(m))
    except ValueError as exc:
        raise InvalidArgument(f"message does not fit the wire schema: {exc}") from exc
    return batch.SerializeToString()


def decode_batch(data: bytes) -> list[Message]:
    """Parse one MessageBatch into messages, in the order they were encoded.

    Raises InvalidArgument if ``data`` is not a well-formed MessageBatch or holds a value no
    :class:`Message` can carry.
    """
    try:
        batch = pb.MessageBatch.FromString(data)
    except DecodeError as exc:
        raise InvalidArgument(f"malformed MessageBatch ({len(data)} bytes): {exc}") from exc
    return [message_from_proto(p) for p in batch.messages]
