"""The bytes of the peer transport (:mod:`dkv.host.peer_transport`): a preamble, then frames.

A connection opens with :data:`PREAMBLE` from the sender (so a receiver refuses anything
else, an HTTP/2 client included, in one line). Then each side writes frames::

    +----------------+--------+---------------------+
    | length: u32 BE | kind   | payload (length B)  |
    +----------------+--------+---------------------+

``kind`` says what protobuf of ``dkv/v1/raft.proto`` the payload is:

- sender to receiver: ``HELLO`` (PeerHello, first and once), ``BATCH`` (MessageBatch), ``END``
  (no payload: the sender will write nothing more, used when it rolls over onto new
  certificates; the receiver closes once it has read everything before it);
- receiver to sender: ``ACK`` (StreamAck, every :data:`ACK_EVERY` batches), ``REFUSAL``
  (PeerRefusal, then the receiver closes).

Encoding and decoding of Raft messages stay in :mod:`dkv.raft.codec`; this module only frames
and parses, so both sides and the tests share one definition.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from enum import IntEnum

from dkv.errors import InvalidArgument
from dkv.raft import Message, codec
from dkv.v1 import raft_pb2 as pb

__all__ = [
    "ACK_EVERY",
    "HEADER",
    "PREAMBLE",
    "FrameBuffer",
    "FrameTooLarge",
    "Kind",
    "decode_batch",
    "encode_batch",
    "frame",
]

PREAMBLE = b"dkv-raft/1\n"
"""What a sender writes first: the protocol and its version."""

HEADER = struct.Struct(">IB")

ACK_EVERY = 16
"""The receiver acks every this many batches (cumulative): cheap in the reverse direction,
and what the sender times its round trips on (dkv.telemetry.peer_metrics)."""


class FrameTooLarge(InvalidArgument):
    """A frame longer than the receiver's limit (answered RESOURCE_EXHAUSTED)."""


class Kind(IntEnum):
    HELLO = 1
    BATCH = 2
    END = 3
    ACK = 4
    REFUSAL = 5


def frame(kind: Kind, payload: bytes = b"") -> bytes:
    return HEADER.pack(len(payload), kind) + payload


def encode_batch(
    cluster_id: str, from_node: int, batch: Sequence[tuple[int, Message]]
) -> pb.MessageBatch:
    out = pb.MessageBatch(from_node=from_node, cluster_id=cluster_id)
    for group_id, m in batch:
        out.group_ids.append(group_id)
        out.messages.append(codec.message_to_proto(m))
    return out


def decode_batch(req: pb.MessageBatch) -> list[tuple[int, Message]]:
    if len(req.group_ids) != len(req.messages):
        raise InvalidArgument(
            f"batch has {len(req.messages)} messages but {len(req.group_ids)} group ids"
        )
    return [
        (g, codec.message_from_proto(m)) for g, m in zip(req.group_ids, req.messages, strict=True)
    ]


class FrameBuffer:
    """Bytes received so far, cut into whole frames. Refuses a frame longer than
    ``frame_bytes_max`` before buffering it (InvalidArgument), so a peer cannot make us hold
    more than that."""

    def __init__(self, frame_bytes_max: int, preamble: bytes = b"") -> None:
        self.frame_bytes_max = frame_bytes_max
        self._buf = bytearray()
        self._preamble = preamble  # still expected at the start

    def feed(self, data: bytes) -> Iterator[tuple[Kind, bytes]]:
        """Add ``data``; yield each frame now complete as ``(kind, payload)``."""
        self._buf += data
        buf = self._buf
        pos = 0
        if self._preamble:
            want = self._preamble
            have = bytes(buf[: len(want)])
            if have != want[: len(have)]:
                raise InvalidArgument(
                    f"not a dkv peer connection (it began {have[:16]!r}, not {want!r})"
                )
            if len(have) < len(want):
                return
            pos = len(want)
            self._preamble = b""
        try:
            while len(buf) - pos >= HEADER.size:
                length, kind = HEADER.unpack_from(buf, pos)
                if length > self.frame_bytes_max:
                    raise FrameTooLarge(
                        f"a frame of {length} bytes is over this port's limit of "
                        f"{self.frame_bytes_max}"
                    )
                end = pos + HEADER.size + length
                if len(buf) < end:
                    break
                try:
                    k = Kind(kind)
                except ValueError:
                    raise InvalidArgument(f"unknown frame kind {kind}") from None
                yield k, bytes(buf[pos + HEADER.size : end])
                pos = end
        finally:
            del buf[:pos]

    @property
    def buffered_bytes(self) -> int:
        return len(self._buf)
