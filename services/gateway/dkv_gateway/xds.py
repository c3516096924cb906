"""An xDS control plane for Envoy: Aggregated Discovery Service, state of the world, on grpc.aio.

Envoy's bootstrap names only this server (``envoy_config.bootstrap``); listeners and clusters
arrive here over one bidirectional stream,
``envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources``.
Section names below are those of the xDS REST and gRPC protocol document
(https://www.envoyproxy.io/docs/envoy/latest/api-docs/xds_protocol).

The rules this server keeps:

1. *"ACK/NACK and resource type instance version"*: every response carries the version of its
   resource type and a fresh nonce. A request whose ``response_nonce`` is the last nonce sent for
   its type and which has no ``error_detail`` is an ACK; with ``error_detail`` it is a NACK: Envoy
   keeps its previous configuration. Neither gets an answer — answering an ACK makes a hot loop,
   resending a rejected config makes another. A NACK is logged with its detail and counted; the
   fix is a new snapshot, not a retry.
2. *"When to send an update"*: the server sends a type when a stream first subscribes to it (once
   resources of that type are known) and when that type's resources change — nothing else.
   Snapshots are compared per type, so changing only clusters pushes only CDS.
3. *Nonces*: a request carrying a nonce other than the last one sent for its type answers an
   older response and is ignored (counted in ``stale_requests``).
4. *"Eventual consistency considerations"*: when several types change, clusters (CDS) are sent
   before listeners (LDS), so a listener never routes to a cluster Envoy does not know yet.
5. State of the world: every response of a type lists all resources of that type; leaving a
   resource out deletes it.

Bounds: each stream's outbox is the set of type URLs it still owes (at most one entry per type,
later changes coalesce into the pending send), ``streams_max`` streams at a time, and
``set_resources`` calls within ``debounce_s`` of the first one are merged into one push (the
delay is counted from the first call, so a steady trickle of changes cannot starve Envoy).

Usage::

    ads = AdsServer(clusters=clusters, listeners=listeners)
    ads.add_to_server(server)          # a grpc.aio.Server
    ...
    ads.set_resources(clusters=new_clusters)   # pushed after debounce_s
    ...
    await ads.close()                  # ends every stream, then stop the grpc server
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

__all__ = [
    "CLUSTER_TYPE",
    "LISTENER_TYPE",
    "TYPE_ORDER",
    "AdsServer",
    "Nack",
    "State",
]

_log = logging.getLogger(__name__)

CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
TYPE_ORDER: tuple[str, ...] = (CLUSTER_TYPE, LISTENER_TYPE)
"""The types this server serves, in the order they must be pushed (CDS before LDS)."""


class State(enum.Enum):
    """Lifecycle of an :class:`AdsServer`."""

    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class Nack:
    """One rejected configuration, as Envoy reported it."""

    type_url: str
    version_rejected: str
    nonce: str
    code: int
    message: str
    node_id: str


@dataclass(frozen=True, slots=True)
class _TypeSnapshot:
    version: str
    resources: tuple[any_pb2.Any, ...]


@dataclass(slots=True)
class _Stream:
    """Per-stream protocol state (one Envoy connection)."""

    stream_id: int
    node_id: str = ""
    subscribed: set[str] = field(default_factory=set)
    last_nonce: dict[str, str] = field(default_factory=dict)
    sent_version: dict[str, str] = field(default_factory=dict)
    acked_version: dict[str, str] = field(default_factory=dict)
    resource_names: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # The outbox: type URLs owed to this stream, and whether each is a push (snapshot change) or
    # a subscription answer. At most one entry per type: it cannot grow without bound.
    outbox: dict[str, bool] = field(default_factory=dict)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    closing: bool = False


_LOGGED_DETAIL_CHARS_MAX = 2000


def _tail(text: str, chars_max: int) -> str:
    """The end of ``text``: Envoy puts the whole rejected resource first, the reason last."""
    return text if len(text) <= chars_max else "..." + text[-chars_max:]


def _version_of(resources: Sequence[any_pb2.Any]) -> str:
    """A content hash: equal configurations get equal versions on every gateway replica."""
    digest = hashlib.sha256()
    for resource in resources:
        digest.update(resource.type_url.encode())
        digest.update(resource.value)
    return digest.hexdigest()[:16]


def _pack_sorted(resources: Iterable[Message], type_url: str) -> tuple[any_pb2.Any, ...]:
    packed: list[tuple[str, any_pb2.Any]] = []
    names: set[str] = set()
    for resource in resources:
        name = str(getattr(resource, "name", ""))
        if not name:
            raise ValueError(f"every {type_url} resource needs a name")
        if name in names:
            raise ValueError(f"duplicate {type_url} resource name {name!r}")
        names.add(name)
        item = any_pb2.Any()
        item.Pack(resource, deterministic=True)
        if item.type_url != type_url:
            raise ValueError(f"expected {type_url}, got {item.type_url}")
        packed.append((name, item))
    packed.sort(key=lambda pair: pair[0])
    return tuple(item for _, item in packed)


class AdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """A state-of-the-world ADS server holding one versioned snapshot per resource type.

    Must be created, used and closed on the event loop that runs the grpc.aio server.
    Counters (read-only for callers): ``acks``, ``nacks``, ``pushes`` (responses sent because a
    snapshot changed), ``responses`` (all responses), ``requests`` (all requests processed),
    ``stale_requests``; ``last_nack`` holds the most recent NACK. :meth:`wait_for` awaits a
    condition on them without sleeping.
    """

    def __init__(
        self,
        *,
        clusters: Sequence[Message] | None = None,
        listeners: Sequence[Message] | None = None,
        debounce_s: float = 0.05,
        streams_max: int = 64,
    ) -> None:
        if debounce_s < 0:
            raise ValueError("debounce_s must be >= 0")
        if streams_max < 1:
            raise ValueError("streams_max must be >= 1")
        self._debounce_s = debounce_s
        self._streams_max = streams_max
        self._snapshot: dict[str, _TypeSnapshot] = {}
        self._pending: dict[str, tuple[any_pb2.Any, ...]] = {}
        self._flush_handle: asyncio.TimerHandle | None = None
        self._streams: dict[int, _Stream] = {}
        self._stream_ids = itertools.count(1)
        self._nonces = itertools.count(1)
        self._changed = asyncio.Event()
        self.state = State.RUNNING
        self.acks = 0
        self.nacks = 0
        self.pushes = 0
        self.responses = 0
        self.requests = 0
        self.stale_requests = 0
        self.last_nack: Nack | None = None
        self._stage(clusters=clusters, listeners=listeners)
        self._apply_pending()

    # -- public API ---------------------------------------------------------------------------

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register this servicer on a grpc.aio server."""
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, server)

    def set_resources(
        self,
        *,
        clusters: Sequence[Message] | None = None,
        listeners: Sequence[Message] | None = None,
    ) -> None:
        """Replace the clusters and/or listeners (``None`` leaves a type as it is).

        Each list is the complete state of its type (an empty list deletes everything of that
        type in Envoy). The change is pushed ``debounce_s`` after the first call of a burst, to
        every stream, and only for the types whose content changed. Call on the event loop.
        """
        if self.state is not State.RUNNING:
            raise RuntimeError(f"AdsServer is {self.state.value}")
        self._stage(clusters=clusters, listeners=listeners)
        if not self._pending:
            return
        if self._debounce_s == 0:
            self.flush()
        elif self._flush_handle is None:
            loop = asyncio.get_running_loop()
            self._flush_handle = loop.call_later(self._debounce_s, self.flush)

    def flush(self) -> None:
        """Apply staged changes now, without waiting for the debounce delay."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        changed = self._apply_pending()
        if not changed:
            return
        for stream in self._streams.values():
            for type_url in changed:
                if type_url in stream.subscribed:
                    stream.outbox[type_url] = True
            if stream.outbox:
                stream.wakeup.set()
        self._notify()

    def version(self, type_url: str) -> str:
        """The current version of ``type_url`` ("" when none was ever set)."""
        snapshot = self._snapshot.get(type_url)
        return snapshot.version if snapshot else ""

    @property
    def stream_count(self) -> int:
        """The number of open ADS streams."""
        return len(self._streams)

    def acked_versions(self) -> list[dict[str, str]]:
        """Per open stream, the last version ACKed for each type."""
        return [dict(stream.acked_version) for stream in self._streams.values()]

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
        """Wait until ``predicate()`` holds; it is re-checked whenever a counter changes."""
        async with asyncio.timeout(timeout_s):
            while not predicate():
                await self._changed.wait()

    async def close(self) -> None:
        """End every stream cleanly (status OK) and refuse new ones. Idempotent."""
        if self.state is State.STOPPED:
            return
        self.state = State.STOPPING
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        for stream in self._streams.values():
            stream.closing = True
            stream.wakeup.set()
        with contextlib.suppress(TimeoutError):
            await self.wait_for(lambda: not self._streams, timeout_s=5.0)
        self.state = State.STOPPED
        self._notify()

    # -- the RPC ------------------------------------------------------------------------------

    async def StreamAggregatedResources(  # noqa: N802 (the gRPC method name)
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        """One Envoy's ADS stream: read requests in a task, write owed types in order."""
        if self.state is not State.RUNNING:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "xDS server is shutting down")
        if len(self._streams) >= self._streams_max:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many xDS streams (max {self._streams_max})",
            )
        stream = _Stream(stream_id=next(self._stream_ids))
        self._streams[stream.stream_id] = stream
        reader = asyncio.create_task(self._read(stream, request_iterator))
        try:
            while True:
                await stream.wakeup.wait()
                stream.wakeup.clear()
                if stream.closing:
                    break
                for response in self._drain(stream):
                    yield response
                    self._notify()
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            del self._streams[stream.stream_id]
            _log.info("xds: stream %d (node %r) closed", stream.stream_id, stream.node_id)
            self._notify()

    async def _read(
        self, stream: _Stream, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest]
    ) -> None:
        try:
            async for request in request_iterator:
                self._on_request(stream, request)
                self.requests += 1
                self._notify()
        except grpc.RpcError:  # the peer went away; the writer ends with the stream
            pass
        finally:
            stream.closing = True
            stream.wakeup.set()

    def _on_request(self, stream: _Stream, request: discovery_pb2.DiscoveryRequest) -> None:
        """Classify one DiscoveryRequest: subscription, ACK, NACK or stale; queue any answer."""
        if request.node.id:
            stream.node_id = request.node.id
        type_url = request.type_url
        if not type_url:
            _log.warning("xds: stream %d sent a request without type_url", stream.stream_id)
            return
        names = tuple(sorted(request.resource_names))
        if not request.response_nonce:
            # A new subscription ("When to send an update"): answer with the current state, once
            # this type is known. On a reconnect Envoy sends the version it has; we answer anyway
            # since this stream has not told it anything yet.
            stream.subscribed.add(type_url)
            stream.resource_names[type_url] = names
            if type_url in self._snapshot:
                stream.outbox.setdefault(type_url, False)
                stream.wakeup.set()
            return
        if request.response_nonce != stream.last_nonce.get(type_url):
            # "ACK/NACK and resource type instance version": a stale nonce answers an older
            # response whose successor is in flight; it carries no information.
            self.stale_requests += 1
            _log.debug(
                "xds: stream %d: stale nonce %r for %s ignored",
                stream.stream_id,
                request.response_nonce,
                type_url,
            )
            return
        if request.HasField("error_detail"):
            nack = Nack(
                type_url=type_url,
                version_rejected=stream.sent_version.get(type_url, ""),
                nonce=request.response_nonce,
                code=request.error_detail.code,
                message=request.error_detail.message,
                node_id=stream.node_id,
            )
            self.nacks += 1
            self.last_nack = nack
            _log.warning(
                "xds: node %r rejected %s version %s (nonce %s): %s",
                nack.node_id,
                type_url,
                nack.version_rejected,
                nack.nonce,
                _tail(nack.message, _LOGGED_DETAIL_CHARS_MAX),
            )
            return
        self.acks += 1
        stream.acked_version[type_url] = request.version_info
        _log.debug("xds: stream %d ACKed %s %s", stream.stream_id, type_url, request.version_info)
        if names != stream.resource_names.get(type_url, ()):
            # The subscription itself changed: that needs an answer (not for wildcard LDS/CDS).
            stream.resource_names[type_url] = names
            if type_url in self._snapshot:
                stream.outbox.setdefault(type_url, False)
                stream.wakeup.set()

    def _drain(self, stream: _Stream) -> list[discovery_pb2.DiscoveryResponse]:
        """Build the responses this stream is owed, in TYPE_ORDER, and empty its outbox."""
        responses: list[discovery_pb2.DiscoveryResponse] = []
        for type_url in TYPE_ORDER:
            is_push = stream.outbox.pop(type_url, None)
            if is_push is None:
                continue
            snapshot = self._snapshot[type_url]
            nonce = str(next(self._nonces))
            stream.last_nonce[type_url] = nonce
            stream.sent_version[type_url] = snapshot.version
            responses.append(
                discovery_pb2.DiscoveryResponse(
                    version_info=snapshot.version,
                    type_url=type_url,
                    nonce=nonce,
                    resources=snapshot.resources,
                )
            )
            self.responses += 1
            if is_push:
                self.pushes += 1
        # Subscriptions to types we do not serve stay unanswered (Envoy would wait forever for
        # them only if it asked; our listeners use inline routes and STATIC clusters).
        stream.outbox.clear()
        return responses

    # -- snapshot bookkeeping -----------------------------------------------------------------

    def _stage(
        self, *, clusters: Sequence[Message] | None, listeners: Sequence[Message] | None
    ) -> None:
        for type_url, resources in ((CLUSTER_TYPE, clusters), (LISTENER_TYPE, listeners)):
            if resources is not None:
                self._pending[type_url] = _pack_sorted(resources, type_url)

    def _apply_pending(self) -> list[str]:
        """Move staged resources into the snapshot; return the types whose content changed."""
        changed: list[str] = []
        for type_url in TYPE_ORDER:
            resources = self._pending.pop(type_url, None)
            if resources is None:
                continue
            version = _version_of(resources)
            current = self._snapshot.get(type_url)
            if current is not None and current.version == version:
                continue
            self._snapshot[type_url] = _TypeSnapshot(version=version, resources=resources)
            changed.append(type_url)
            _log.info("xds: %s now at version %s (%d)", type_url, version, len(resources))
        return changed

    def _notify(self) -> None:
        """Wake :meth:`wait_for` callers: set this generation's event and start a new one."""
        self._changed.set()
        self._changed = asyncio.Event()
