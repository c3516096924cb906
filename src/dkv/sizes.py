"""How big a message to or from dkv may be: one derivation from the node's limits.

The node refuses keys, values and request ids over its limits (``dkv_node.limits.Limits``,
whose defaults are the constants here) and cuts answers into pages (:mod:`dkv.paging`). From
those follow the largest *valid* request and the largest answer, and every server bounds its
messages by them (:func:`dkv.host.rpc_server.new_server`), as Envoy bounds request bodies at
the front door (``dkv_gateway.envoy_config.FrontDoor``). Anything bigger is refused before it
is decoded, so an oversize request costs its sender an error and the server nothing more than
reading it:

- **request** (:func:`request_bytes_max`): the largest valid request is a compare-and-swap Put
  with a key of ``key_bytes_max``, a value and a ``precondition.value`` of ``value_bytes_max``
  each and a request id of ``request_id_bytes_max``, plus :data:`ENVELOPE_BYTES` for field tags,
  lengths and the small fields. With the defaults: 2,102,400 bytes (2 MiB + 5,248).
- **answer** (:func:`response_bytes_max`): the largest paged answer is a Range page (under
  :data:`dkv.paging.PAGE_BYTES_MAX` of keys and values, or one key-value alone), a Put or
  Delete answer (``prev_kv`` and ``current``: two key-values) or a Watch batch (under
  :data:`WATCH_BATCH_BYTES_MAX` of events, or one whole revision: a put's event carries the
  key-value and its ``prev_kv``). Never below gRPC's default receive limit of 4 MiB
  (:data:`GRPC_DEFAULT_MESSAGE_BYTES`), so that any gRPC client with default settings reads
  every answer; with the defaults that floor is the bound (4,194,304 bytes).

Not paged, so bounded only by the answer limit: a range Delete with ``prev_kv`` (every deleted
key-value in one answer) and, with ``prev_kv``, a Watch batch holding the revision of such a
delete (up to ``DELETE_RANGE_KEYS_MAX`` key-values). Past the limit the caller gets
RESOURCE_EXHAUSTED, after the delete was done; without ``prev_kv`` both stay small.

The peer ports (Raft between nodes, and between membership replicas) are not the edge: their
callers are cluster members. One message there is a batch of every group's Raft messages to
one peer from one iteration; Raft bounds each append (``max_msg_bytes``, or one entry) but not
the batch, so they get a generous bound (:data:`PEER_MESSAGE_LIMITS`: the largest frame
:mod:`dkv.host.peer_transport` reads), not gRPC's 4 MiB.

gRPC's own refusal names the sizes, not which limit: ``Received message larger than max
(2102500 vs. 2102400)`` for a request, ``Sent message larger than max (...)`` for an answer,
both RESOURCE_EXHAUSTED (docs/http.md lists them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dkv.paging import KV_OVERHEAD_BYTES, PAGE_BYTES_MAX

__all__ = [
    "ENVELOPE_BYTES",
    "GRPC_DEFAULT_MESSAGE_BYTES",
    "KEY_BYTES_MAX",
    "REQUEST_ID_BYTES_MAX",
    "VALUE_BYTES_MAX",
    "WATCH_BATCH_BYTES_MAX",
    "PEER_MESSAGE_LIMITS",
    "MessageLimits",
    "message_limits",
    "request_bytes_max",
    "response_bytes_max",
]

KEY_BYTES_MAX = 4096
"""The longest key a node accepts (``Limits.key_bytes_max``)."""
VALUE_BYTES_MAX = 1 << 20
"""The largest value a node accepts by default (``dkv-node --max-value-bytes``)."""
REQUEST_ID_BYTES_MAX = 128
"""The longest request id a node accepts (``Limits.request_id_bytes_max``)."""
ENVELOPE_BYTES = 1024
"""Everything in a message besides its keys, values and request id: field tags, lengths,
revisions, flags, a response header. A request or answer has a few dozen bytes of them."""
GRPC_DEFAULT_MESSAGE_BYTES = 4 << 20
"""gRPC's default limit on a received message (``grpc.max_receive_message_length``)."""
WATCH_BATCH_BYTES_MAX = PAGE_BYTES_MAX
"""A watch message carries about this many bytes of events, in whole revisions: under it, or
one revision alone when that is bigger (``dkv_node.kv_service.watch_stream``)."""


def request_bytes_max(
    key_bytes_max: int = KEY_BYTES_MAX,
    value_bytes_max: int = VALUE_BYTES_MAX,
    request_id_bytes_max: int = REQUEST_ID_BYTES_MAX,
) -> int:
    """The largest valid request: a CAS Put with the longest key, value, precondition value
    and request id (module docstring)."""
    return key_bytes_max + 2 * value_bytes_max + request_id_bytes_max + ENVELOPE_BYTES


def response_bytes_max(
    key_bytes_max: int = KEY_BYTES_MAX, value_bytes_max: int = VALUE_BYTES_MAX
) -> int:
    """The largest paged answer, never below gRPC's default receive limit (module docstring)."""
    kv = key_bytes_max + value_bytes_max + KV_OVERHEAD_BYTES
    return max(
        GRPC_DEFAULT_MESSAGE_BYTES,
        PAGE_BYTES_MAX + kv + ENVELOPE_BYTES,  # a page under the budget, or one key-value
        WATCH_BATCH_BYTES_MAX + ENVELOPE_BYTES,
        2 * kv + ENVELOPE_BYTES,  # a put revision (kv, prev_kv); a Put answer (prev_kv, current)
    )


@dataclass(frozen=True, slots=True)
class MessageLimits:
    """What one gRPC server receives and sends at most, in bytes of one message."""

    request_bytes_max: int
    response_bytes_max: int

    def grpc_options(self) -> tuple[tuple[str, Any], ...]:
        """The server's channel arguments. gRPC refuses a bigger message with
        RESOURCE_EXHAUSTED before any handler (or decoding) sees it."""
        return (
            ("grpc.max_receive_message_length", self.request_bytes_max),
            ("grpc.max_send_message_length", self.response_bytes_max),
        )


def message_limits(
    key_bytes_max: int = KEY_BYTES_MAX,
    value_bytes_max: int = VALUE_BYTES_MAX,
    request_id_bytes_max: int = REQUEST_ID_BYTES_MAX,
) -> MessageLimits:
    """The limits of a server in front of nodes with these limits (the defaults: dkv's)."""
    return MessageLimits(
        request_bytes_max(key_bytes_max, value_bytes_max, request_id_bytes_max),
        response_bytes_max(key_bytes_max, value_bytes_max),
    )


PEER_MESSAGE_LIMITS = MessageLimits(request_bytes_max=64 << 20, response_bytes_max=64 << 20)
"""The peer ports' limits (module docstring): a Raft batch of up to 64 MiB."""
