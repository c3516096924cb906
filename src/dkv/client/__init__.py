"""A Python client for dkv's KV API that finds the leader itself.

``Client(endpoints)`` tries endpoints in order and follows the ``dkv-leader-id`` hint of
NOT_LEADER answers (nodes advertise each other by id; the client learns which endpoint is
which member from the ``header.member_id`` of successful answers). Errors surface as
:mod:`dkv.errors` types, translated here from gRPC statuses.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import TypeVar

import grpc
import grpc.aio
from google.protobuf.message import Message as ProtoMessage

from dkv.errors import DeadlineExceeded, DkvError, InvalidArgument, NotLeader, ProposalDropped
from dkv.v1 import kv_pb2

__all__ = ["Client", "ClientTls"]

R = TypeVar("R", bound=ProtoMessage)


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
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._by_member: dict[int, str] = {}  # member id -> endpoint, learned from answers
        self._tls = tls

    def _channel(self, endpoint: str) -> grpc.aio.Channel:
        ch = self._channels.get(endpoint)
        if ch is None:
            if self._tls is None:
                ch = grpc.aio.insecure_channel(endpoint)
            else:
                with open(self._tls.trusted_ca_file, "rb") as f:
                    ca = f.read()
                with open(self._tls.cert_file, "rb") as f:
                    cert = f.read()
                with open(self._tls.key_file, "rb") as f:
                    key = f.read()
                ch = grpc.aio.secure_channel(endpoint, grpc.ssl_channel_credentials(ca, key, cert))
            self._channels[endpoint] = ch
        return ch

    async def _call(self, method: str, req: ProtoMessage, resp_type: type[R]) -> R:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        order = list(self.endpoints)
        target = order[0]
        tried = 0
        last: Exception | None = None
        while loop.time() < deadline:
            stub: grpc.aio.UnaryUnaryMultiCallable[ProtoMessage, R] = self._channel(
                target
            ).unary_unary(
                f"/dkv.v1.KV/{method}",
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
                if code is not grpc.StatusCode.UNAVAILABLE:
                    raise DkvError(f"{code.name}: {exc.details()}") from exc
                last = exc
                hint = dict(exc.trailing_metadata() or ()).get("dkv-leader-id")
                if isinstance(hint, str) and int(hint) in self._by_member:
                    target = self._by_member[int(hint)]
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
                raise NotLeader(int(str(hint)), f"no endpoint reached the leader (id {hint})")
            raise ProposalDropped(f"no endpoint answered: {last.details()}")
        raise DeadlineExceeded(f"no answer within {self.timeout_s} s")

    async def put(self, key: bytes, value: bytes, request_id: str = "") -> kv_pb2.PutResponse:
        req = kv_pb2.PutRequest(key=key, value=value, request_id=request_id, prev_kv=True)
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

    async def delete(self, key: bytes, request_id: str = "") -> kv_pb2.DeleteResponse:
        req = kv_pb2.DeleteRequest(key=key, request_id=request_id, prev_kv=True)
        return await self._call("Delete", req, kv_pb2.DeleteResponse)

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
