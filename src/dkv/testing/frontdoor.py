"""A test client that talks to the front door only, the way an application does.

One ``grpc.aio`` channel to Envoy; every operation is ONE call whose deadline is the
operation's deadline, so any retrying is the platform's (Envoy's route policies, the
gateway's leader-following) and every failure the platform lets through is a failure the
application would have seen. It fits :class:`dkv.testing.cluster.KvClient`, so
:class:`~dkv.testing.cluster.Workload` and the linearizability checks run through it.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Final

import grpc
import grpc.aio

from dkv.client import ClientTls
from dkv.security.tls_reload import ChannelPool
from dkv.sharding import shard_for_key
from dkv.v1 import kv_pb2

__all__ = ["FrontDoorClient"]

_CHANNEL_OPTIONS: Final = (
    # Envoy restarted or the gateway came back: reconnect quickly.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
)


class FrontDoorClient:
    """See the module docstring. Create it inside the event loop that uses it."""

    def __init__(self, address: str, shard_count: int, tls: ClientTls | None = None) -> None:
        self.address = address
        self.shard_count = shard_count
        # A pool of one: a new channel when the certificate files change (the old one ends
        # its calls first), as an application using dkv.client gets.
        self._pool = ChannelPool(tls, _CHANNEL_OPTIONS)
        self.failures: Counter[str] = Counter()  # status code name -> failed calls

    @property
    def channel(self) -> grpc.aio.Channel:
        """The channel for a new call (with the current certificate files)."""
        return self._pool.get(self.address)

    async def __aenter__(self) -> FrontDoorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._pool.close()

    def shard_of(self, key: bytes) -> int:
        return shard_for_key(key, self.shard_count)

    def _remaining_s(self, deadline: float) -> float:
        return max(0.001, deadline - asyncio.get_running_loop().time())

    async def put(
        self, key: bytes, value: bytes, request_id: str, deadline: float
    ) -> kv_pb2.PutResponse | None:
        """One Put; None when the outcome is unknown (deadline passed). Other failures
        raise (the caller records them as errors the application saw)."""
        stub = self.channel.unary_unary(
            "/dkv.v1.KV/Put",
            request_serializer=kv_pb2.PutRequest.SerializeToString,
            response_deserializer=kv_pb2.PutResponse.FromString,
        )
        req = kv_pb2.PutRequest(key=key, value=value, request_id=request_id)
        try:
            resp: kv_pb2.PutResponse = await stub(req, timeout=self._remaining_s(deadline))
        except grpc.aio.AioRpcError as exc:
            self.failures[exc.code().name] += 1
            if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                return None
            raise
        return resp

    async def get(
        self,
        key: bytes,
        deadline: float,
        serializable: bool = False,
        attempts: list[float] | None = None,
    ) -> kv_pb2.RangeResponse | None:
        stub = self.channel.unary_unary(
            "/dkv.v1.KV/Range",
            request_serializer=kv_pb2.RangeRequest.SerializeToString,
            response_deserializer=kv_pb2.RangeResponse.FromString,
        )
        consistency = (
            kv_pb2.READ_CONSISTENCY_SERIALIZABLE
            if serializable
            else kv_pb2.READ_CONSISTENCY_LINEARIZABLE
        )
        if attempts is not None:
            attempts.append(time.monotonic())
        try:
            resp: kv_pb2.RangeResponse = await stub(
                kv_pb2.RangeRequest(key=key, consistency=consistency),
                timeout=self._remaining_s(deadline),
            )
        except grpc.aio.AioRpcError as exc:
            self.failures[exc.code().name] += 1
            if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                return None
            raise
        return resp
