"""The gateway's requests as the bytes that came in: decoded once, forwarded unchanged.

The unary single-key calls (Put, Delete and Range of one key or one caller-named shard) go
to the node as the very bytes the caller sent, and the node's answer comes back as the very
bytes the node sent: nothing is re-encoded on the way, and a field this gateway does not
know (a newer client's) reaches the node as it was sent.

The gateway still decodes every request once, with the same protobuf runtime the node uses
(:class:`Decoder`): validation (:mod:`dkv.validation`) and access control
(:mod:`dkv.security.access`) need the key, the range, ``prev_kv``, the precondition and the
request id, and reading them from the runtime's decoding is what guarantees that the gateway
checks exactly the key the node will serve (protobuf's rules -- the last occurrence of a
scalar field wins, embedded messages merge -- are the runtime's, not a second reader's).
Measured (2026-12, Python 3.11, upb): decoding a 290-byte PutRequest takes 0.3 us, a
hand-rolled reader of its fields in Python 0.8 us; what the pass-through saves is the
re-encoding of requests and the decoding and re-encoding of answers (1-2 us a call, far
less than one grpc.aio call; docs/benchmarks.md, "Lever 5").

A write without a ``request_id`` gets one before its first attempt: :func:`with_request_id`
appends the field to the bytes. Appending a field is valid protobuf and the last occurrence
of a singular field wins, so the node reads the appended id even if the caller sent an empty
one explicitly.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from google.protobuf.message import Message

__all__ = ["REQUEST_ID_FIELD", "Decoder", "Received", "string_field", "with_request_id"]

REQUEST_ID_FIELD = 10
"""``request_id``'s field number in PutRequest and DeleteRequest (kv.proto)."""

_WIRE_LEN = 2  # protobuf wire type of bytes, strings and embedded messages


M = TypeVar("M", bound=Message)


class Received(Generic[M]):
    """A request as decoded (``msg``) and as received (``data``).

    Access rules read the request's fields by name (``req.key``, ``req.HasField(...)``):
    attributes other than ``msg`` and ``data`` are the decoded message's."""

    __slots__ = ("data", "msg")

    def __init__(self, msg: M, data: bytes) -> None:
        self.msg = msg
        self.data = data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.msg, name)

    def __repr__(self) -> str:
        return f"Received({type(self.msg).__name__}, {len(self.data)} bytes)"


class Decoder(Generic[M]):
    """The request deserializer of a pass-through method: ``decode(data)`` is the message
    and the bytes. ``DESCRIPTOR`` is the message's, so that the server's decode guard names
    the request type (``not a valid dkv.v1.PutRequest: ...``) when the bytes do not decode."""

    def __init__(self, message_type: type[M]) -> None:
        self.message_type = message_type
        self.DESCRIPTOR = message_type.DESCRIPTOR
        self._from_string = message_type.FromString

    def decode(self, data: bytes) -> Received[M]:
        """Raises the runtime's DecodeError on bytes that are not a valid message."""
        return Received(self._from_string(data), data)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def string_field(number: int, text: str) -> bytes:
    """One length-delimited field ``number`` holding ``text`` (UTF-8), as protobuf encodes it."""
    raw = text.encode()
    return _varint(number << 3 | _WIRE_LEN) + _varint(len(raw)) + raw


def with_request_id(data: bytes, request_id: str) -> bytes:
    """``data`` (a PutRequest or DeleteRequest) whose ``request_id`` is ``request_id``."""
    return data + string_field(REQUEST_ID_FIELD, request_id)
