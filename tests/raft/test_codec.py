"""dkv.raft.codec: every Raft value survives a trip through the wire schema unchanged, and
anything that is not a valid batch is refused with InvalidArgument."""

from __future__ import annotations

import contextlib

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from dkv.errors import InvalidArgument
from dkv.raft import codec
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

U64_MAX = 2**64 - 1

# Small values are what a real cluster sends; the extremes check the uint64 encoding.
u64 = st.one_of(st.integers(0, 1_000), st.integers(0, U64_MAX), st.sampled_from([0, U64_MAX]))
node_ids = st.integers(1, 2**20)
blobs = st.binary(max_size=64)


@st.composite
def conf_states(draw: st.DrawFn) -> ConfState:
    members = draw(st.sets(node_ids, max_size=9))
    learners = draw(st.sets(st.sampled_from(sorted(members)))) if members else set()
    return ConfState.of(members - learners, learners)


entries = st.builds(Entry, term=u64, index=u64, type=st.sampled_from(EntryType), data=blobs)
conf_changes = st.builds(
    ConfChange, type=st.sampled_from(ConfChangeType), node_id=node_ids, context=blobs
)
# CONF_CHANGE entries as the core writes them: data is ConfChange.encode().
conf_change_entries = st.builds(
    lambda term, index, cc: Entry(term, index, EntryType.CONF_CHANGE, cc.encode()),
    u64,
    u64,
    conf_changes,
)
snapshot_metadata = st.builds(SnapshotMetadata, index=u64, term=u64, conf_state=conf_states())
snapshot_chunks = st.builds(
    SnapshotChunk,
    metadata=snapshot_metadata,
    offset=u64,
    data=st.binary(max_size=256),
    done=st.booleans(),
    total_bytes=u64,
)
messages = st.builds(
    Message,
    type=st.sampled_from(MessageType),
    to=u64,
    frm=u64,
    term=u64,
    log_term=u64,
    index=u64,
    entries=st.lists(st.one_of(entries, conf_change_entries), max_size=8).map(tuple),
    commit=u64,
    snapshot=st.none() | snapshot_chunks,
    reject=st.booleans(),
    reject_hint=u64,
    context=st.one_of(blobs, st.just(b"transfer")),
)


# -- round trips ----------------------------------------------------------------------------------


@given(st.lists(messages, max_size=6))
def test_batch_round_trip(batch: list[Message]) -> None:
    assert codec.decode_batch(codec.encode_batch(batch)) == batch


@given(messages)
def test_message_round_trip(m: Message) -> None:
    decoded = codec.message_from_proto(
        pb.Message.FromString(codec.message_to_proto(m).SerializeToString())
    )
    assert decoded == m
    assert type(decoded.type) is MessageType
    assert all(type(e.type) is EntryType for e in decoded.entries)


@given(entries)
def test_entry_round_trip(e: Entry) -> None:
    assert codec.entry_from_proto(codec.entry_to_proto(e)) == e


@given(st.builds(HardState, term=u64, vote=u64, commit=u64))
def test_hard_state_round_trip(hs: HardState) -> None:
    assert codec.hard_state_from_proto(codec.hard_state_to_proto(hs)) == hs


@given(conf_states())
def test_conf_state_round_trip(cs: ConfState) -> None:
    assert codec.conf_state_from_proto(codec.conf_state_to_proto(cs)) == cs


@given(snapshot_chunks)
def test_snapshot_chunk_round_trip(chunk: SnapshotChunk) -> None:
    p = pb.SnapshotChunk.FromString(codec.snapshot_chunk_to_proto(chunk).SerializeToString())
    assert codec.snapshot_chunk_from_proto(p) == chunk


@given(conf_changes)
def test_conf_change_round_trip(cc: ConfChange) -> None:
    p = pb.ConfChange.FromString(codec.conf_change_to_proto(cc).SerializeToString())
    assert codec.conf_change_from_proto(p) == cc


def test_wire_field_names() -> None:
    # The sender travels in the field named `from` (a Python keyword, hence getattr).
    p = codec.message_to_proto(Message(MessageType.APP, to=2, frm=1, term=3))
    assert getattr(p, "from") == 1
    assert p.to == 2
    assert p.type == pb.MESSAGE_TYPE_APP


def test_snapshot_presence_is_preserved() -> None:
    # A chunk whose every field is a default must still decode as a chunk, not as None.
    empty_chunk = SnapshotChunk(SnapshotMetadata(), 0, b"", False, 0)
    with_chunk = Message(MessageType.SNAP, snapshot=empty_chunk)
    without = Message(MessageType.SNAP)
    assert codec.decode_batch(codec.encode_batch([with_chunk, without])) == [with_chunk, without]


def test_empty_batch() -> None:
    assert codec.encode_batch([]) == b""
    assert codec.decode_batch(b"") == []


# -- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"\xff", id="truncated-varint-tag"),
        pytest.param(b"\x0a\x05ab", id="truncated-length-delimited"),
        pytest.param(b"\x0f", id="invalid-wire-type"),
        pytest.param(b"\x0a\x03\x0a\x01", id="truncated-nested-entry"),
        pytest.param(b"\x00\x01", id="field-number-zero"),
        pytest.param(b"\x08" + b"\xff" * 11, id="overlong-varint"),
    ],
)
def test_garbage_raises_invalid_argument(garbage: bytes) -> None:
    with pytest.raises(InvalidArgument, match="malformed MessageBatch") as info:
        codec.decode_batch(garbage)
    assert isinstance(info.value.__cause__, DecodeError)


@given(st.binary(max_size=128))
def test_arbitrary_bytes_decode_or_raise_invalid_argument(data: bytes) -> None:
    # Random bytes are sometimes a valid batch; either way nothing but InvalidArgument escapes.
    try:
        result = codec.decode_batch(data)
    except InvalidArgument:
        return
    assert all(isinstance(m, Message) for m in result)


@given(st.lists(messages, min_size=1, max_size=3), st.data())
def test_truncated_batch_never_raises_anything_else(
    batch: list[Message], data: st.DataObject
) -> None:
    encoded = codec.encode_batch(batch)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with contextlib.suppress(InvalidArgument):
        codec.decode_batch(encoded[:cut])


def _batch_of(p: pb.Message) -> bytes:
    return pb.MessageBatch(messages=[p]).SerializeToString()


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        pytest.param(
            pb.Message(type=99),  # type: ignore[arg-type]
            "unknown message type number 99",
            id="message-type",
        ),
        pytest.param(
            pb.Message(type=pb.MESSAGE_TYPE_APP, entries=[pb.Entry(type=7)]),  # type: ignore[arg-type]
            "unknown entry type number 7",
            id="entry-type",
        ),
        pytest.param(
            pb.Message(
                type=pb.MESSAGE_TYPE_SNAP,
                snapshot=pb.SnapshotChunk(
                    metadata=pb.SnapshotMetadata(conf_state=pb.ConfState(voters=[2, 1]))
                ),
            ),
            "sorted",
            id="unsorted-voters",
        ),
        pytest.param(
            pb.Message(
                type=pb.MESSAGE_TYPE_SNAP,
                snapshot=pb.SnapshotChunk(
                    metadata=pb.SnapshotMetadata(
                        conf_state=pb.ConfState(voters=[1, 2], learners=[2])
                    )
                ),
            ),
            "both voter and learner",
            id="voter-and-learner",
        ),
    ],
)
def test_values_no_message_can_carry_raise_invalid_argument(raw: pb.Message, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        codec.decode_batch(_batch_of(raw))


def test_unknown_conf_change_type_raises_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="unknown conf change type number 5"):
        codec.conf_change_from_proto(pb.ConfChange(type=5))  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-1, U64_MAX + 1])
def test_out_of_range_numbers_raise_invalid_argument(bad: int) -> None:
    with pytest.raises(InvalidArgument, match="does not fit"):
        codec.encode_batch([Message(MessageType.APP, term=bad)])
    with pytest.raises(InvalidArgument, match="does not fit"):
        codec.encode_batch([Message(MessageType.APP, entries=(Entry(term=1, index=bad),))])
