"""A Python client for dkv's KV and Admin APIs that finds the leader itself.

``Client(endpoints)`` tries endpoints in order and follows NOT_LEADER answers: to the
``dkv-leader-address`` they carry when the node knows it, else to the endpoint it learned for
the ``dkv-leader-id`` (from the ``header.member_id`` of earlier answers). Errors surface as
:mod:`dkv.errors` types, translated here from gRPC statuses. ``watch`` resumes on another
endpoint after a failure without gaps or duplicates.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TypeVar

import grpc
import grpc.aio
from google.protobuf.message import Message as ProtoMessage

from dkv.errors import (
    ConfChangeRejected,
    DeadlineExceeded,
    DkvError,
    InvalidArgument,
    NotLeader,
    ProposalDropped,
    Unimplemented,
)
from dkv.security.tls_reload import ChannelPool
from dkv.v1 import admin_pb2, cluster_pb2, kv_pb2

__all__ = ["Client", "ClientTls"]

R = TypeVar("R", bound=ProtoMessage)
_ADMIN = "dkv.v1.Admin"


@dataclass(frozen=True)
class ClientTls:
    cert_file: str
    key_file: str
    trusted_ca_file: str


def _serialize(m: ProtoMessage) -> bytes:
    return m.SerializeToString()


class Client:
    def __init__(
        self,
        endpoints: list[str],
        tls: ClientTls | None = None,
        timeout_s: float = 5.0,
        rng: random.Random | None = None,
    ) -> None:
        if not endpoints:
            raise InvalidArgument("at least one endpoint is needed")
        self.endpoints = endpoints
        self.timeout_s = timeout_s
        self.rng = rng or random.Random()
        self._by_member: dict[int, str] = {}  # member id -> endpoint, learned from answers
        self._tls = tls
        # One channel per endpoint; new ones when the certificate files change, the old ones
        # closed once their calls ended (dkv.security.tls_reload). Bad files: refused here.
        self._channels = ChannelPool(tls)

    def _channel(self, endpoint: str) -> grpc.aio.Channel:
        return self._channels.get(endpoint)

    async def _call(
        self,
        method: str,
        req: ProtoMessage,
        resp_type: type[R],
        service: str = "dkv.v1.KV",
        at: str | None = None,
    ) -> R:
        """Call ``service/method``, following leader hints (unless ``at`` pins an endpoint)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        order = [at] if at is not None else list(self.endpoints)
        target = order[0]
        tried = 0
        last: Exception | None = None
        while loop.time() < deadline:
            stub: grpc.aio.UnaryUnaryMultiCallable[ProtoMessage, R] = self._channel(
                target
            ).unary_unary(
                f"/{service}/{method}",
                request_serializer=_serialize,
                response_deserializer=resp_type.FromString,
            )
            try:
                resp: R = await stub(req, timeout=max(0.05, deadline - loop.time()))
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code is grpc.StatusCode.INVALID_ARGUMENT:
                    raise InvalidArgument(exc.details() or "invalid argument") from exc
                if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise DeadlineExceeded(exc.details() or "deadline exceeded") from exc
                if code is grpc.StatusCode.FAILED_PRECONDITION:
                    raise ConfChangeRejected(exc.details() or "failed precondition") from exc
                if code is grpc.StatusCode.UNIMPLEMENTED:
                    raise Unimplemented(
                        exc.details() or f"{service}/{method} is not served here"
                    ) from exc
                # CANCELLED: the node shut down with our call in flight. Like UNAVAILABLE it
                # is retried elsewhere (a write carries its request id, so it applies once).
                if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    raise DkvError(f"{code.name}: {exc.details()}") from exc
                last = exc
                trailers = dict(exc.trailing_metadata() or ())
                hint, address = trailers.get("dkv-leader-id"), trailers.get("dkv-leader-address")
                if at is None and isinstance(address, str) and address and address != target:
                    target = address
                    if isinstance(hint, str):
                        self._by_member[int(hint)] = address
                    continue
                known = self._by_member.get(int(hint)) if isinstance(hint, str) else None
                if at is None and known is not None and known != target:
                    target = known
                    continue
                tried += 1
                target = order[tried % len(order)]
                if tried % len(order) == 0:
                    # Every endpoint said no: an election is under way. Back off a little.
                    await asyncio.sleep(
                        min(0.5, 0.02 * 2 ** min(tried // len(order), 5))
                        * (0.5 + self.rng.random())
                    )
                continue
            header = getattr(resp, "header", None)
            if header is not None and header.member_id:
                self._by_member[header.member_id] = target
            return resp
        if isinstance(last, grpc.aio.AioRpcError):
            hint = dict(last.trailing_metadata() or ()).get("dkv-leader-id")
            if hint:
                raise NotLeader(
                    int(str(hint)),
                    f"no endpoint reached the leader (id {hint}): {last.details()}",
                )
            raise ProposalDropped(f"no endpoint answered: {last.details()}")
        raise DeadlineExceeded(f"no answer within {self.timeout_s} s")

    async def put(self, key: bytes, value: bytes, request_id: str = "") -> kv_pb2.PutResponse:
        """Write ``key``. Retries carry one request id (a fresh one unless given), so the
        write applies once however often it is retried."""
        req = kv_pb2.PutRequest(
            key=key, value=value, request_id=request_id or uuid.uuid4().hex, prev_kv=True
        )
        return await self._call("Put", req, kv_pb2.PutResponse)

    async def get(self, key: bytes, serializable: bool = False) -> kv_pb2.RangeResponse:
        c = (
            kv_pb2.READ_CONSISTENCY_SERIALIZABLE
            if serializable
            else kv_pb2.READ_CONSISTENCY_LINEARIZABLE
        )
        return await self._call(
            "Range", kv_pb2.RangeRequest(key=key, consistency=c), kv_pb2.RangeResponse
        )

    async def range(self, req: kv_pb2.RangeRequest) -> kv_pb2.RangeResponse:
        return await self._call("Range", req, kv_pb2.RangeResponse)

    async def delete(
        self, key: bytes, request_id: str = "", range_end: bytes = b""
    ) -> kv_pb2.DeleteResponse:
        """Delete ``key``, or every key in ``[key, range_end)`` (``b"\\x00"``: to the end)."""
        req = kv_pb2.DeleteRequest(
            key=key,
            range_end=range_end,
            request_id=request_id or uuid.uuid4().hex,
            prev_kv=not range_end,
        )
        return await self._call("Delete", req, kv_pb2.DeleteResponse)

    async def watch(
        self, req: kv_pb2.WatchRequest, *, resume: bool = True
    ) -> AsyncIterator[kv_pb2.WatchResponse]:
        """Stream the changes ``req`` asks for. When the node serving the stream fails, go on
        at another endpoint from the revision after the last one delivered (per shard: a
        prefix watch spans every shard's revision space), dropping what was already seen, so
        the caller sees every change once and in order per shard. A COMPACTED answer ends the
        stream (the caller must re-read and watch from a newer revision). Exact resumption
        of a prefix/range watch needs an explicit ``start_revision``; one started "from now"
        resumes after the lowest revision seen, which can miss events of a shard that had sent
        nothing yet (requests carry one start revision for every shard)."""
        seen: dict[int, int] = {}  # shard id -> last revision delivered
        order = list(self.endpoints)
        attempt = 0
        while True:
            target = order[attempt % len(order)]
            sub = kv_pb2.WatchRequest()
            sub.CopyFrom(req)
            if seen:
                # Revisions are per shard. One shard: go on after the last event seen. Several
                # shards: a shard that sent nothing yet may still owe events below that, so go
                # back to the requested start (what was seen is dropped below). A multi-shard
                # watch "from now" cannot be resumed exactly: see the docstring.
                multi = bool(req.prefix or req.range_end)
                sub.start_revision = (
                    req.start_revision
                    if multi and req.start_revision > 0
                    else min(seen.values()) + 1
                )
            call = self._channel(target).unary_stream(
                "/dkv.v1.KV/Watch",
                request_serializer=_serialize,
                response_deserializer=kv_pb2.WatchResponse.FromString,
            )(sub)
            try:
                async for resp in call:
                    attempt = 0
                    if resp.compacted:
                        yield resp
                        return
                    shard = resp.header.shard_id
                    last = seen.get(shard, 0)
                    fresh = [e for e in resp.events if e.kv.mod_revision > last]
                    if not fresh:
                        continue
                    out = kv_pb2.WatchResponse()
                    out.header.CopyFrom(resp.header)
                    out.events.extend(fresh)
                    seen[shard] = max(e.kv.mod_revision for e in fresh)
                    yield out
                return  # the server ended the stream (it is shutting down)
            except grpc.aio.AioRpcError as exc:
                if exc.code() is grpc.StatusCode.INVALID_ARGUMENT:
                    raise InvalidArgument(exc.details() or "invalid argument") from exc
                if not resume or exc.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.CANCELLED,
                    grpc.StatusCode.INTERNAL,
                ):
                    raise DkvError(f"watch failed: {exc.code().name}: {exc.details()}") from exc
                attempt += 1
                if attempt % len(order) == 0:
                    await asyncio.sleep(min(1.0, 0.05 * attempt) * (0.5 + self.rng.random()))
            finally:
                call.cancel()

    # -- admin ----------------------------------------------------------------------------------

    async def status(self, endpoint: str) -> admin_pb2.StatusResponse:
        """One node's own status (no leader following)."""
        return await self._call(
            "Status", admin_pb2.StatusRequest(), admin_pb2.StatusResponse, _ADMIN, at=endpoint
        )

    async def cluster_status(self, endpoint: str) -> cluster_pb2.ClusterStatusResponse:
        """The whole cluster's health from a gateway (the front door); a node answers
        :class:`Unimplemented`."""
        return await self._call(
            "Status",
            cluster_pb2.ClusterStatusRequest(),
            cluster_pb2.ClusterStatusResponse,
            "dkv.v1.Cluster",
            at=endpoint,
        )

    async def member_list(self, serializable: bool = False) -> list[admin_pb2.Member]:
        resp = await self._call(
            "MemberList",
            admin_pb2.MemberListRequest(serializable=serializable),
            admin_pb2.MemberListResponse,
            _ADMIN,
        )
        return list(resp.members)

    async def member_add(self, name: str, peer_address: str) -> admin_pb2.MemberAddResponse:
        req = admin_pb2.MemberAddRequest(name=name, peer_address=peer_address)
        return await self._call("MemberAdd", req, admin_pb2.MemberAddResponse, _ADMIN)

    async def member_promote(self, member_id: int) -> list[admin_pb2.Member]:
        req = admin_pb2.MemberPromoteRequest(id=member_id)
        resp = await self._call("MemberPromote", req, admin_pb2.MemberPromoteResponse, _ADMIN)
        return list(resp.members)

    async def member_remove(self, member_id: int) -> list[admin_pb2.Member]:
        req = admin_pb2.MemberRemoveRequest(id=member_id)
        resp = await self._call("MemberRemove", req, admin_pb2.MemberRemoveResponse, _ADMIN)
        return list(resp.members)

    async def transfer_leadership(self, shard_id: int, target_id: int = 0) -> dict[int, int]:
        """Move shard ``shard_id``'s leadership (sent to its leader) to ``target_id`` (0: the
        most up-to-date other voter); returns {shard: new leader}."""
        if shard_id <= 0:
            raise InvalidArgument("transfer_leadership needs a shard id (1..shards)")
        req = admin_pb2.TransferLeadershipRequest(shard_id=shard_id, target_id=target_id)
        resp = await self._call(
            "TransferLeadership", req, admin_pb2.TransferLeadershipResponse, _ADMIN
        )
        return dict(resp.leaders)

    async def snapshot(self, endpoint: str, shard_id: int = 0) -> dict[int, int]:
        req = admin_pb2.SnapshotRequest(shard_id=shard_id)
        resp = await self._call("Snapshot", req, admin_pb2.SnapshotResponse, _ADMIN, at=endpoint)
        return dict(resp.snapshot_index)

    async def close(self) -> None:
        await self._channels.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
