"""Strict input at every server (issue 11 item 6), on the real processes of gateway_stack:
membership, three nodes and a gateway. Envoy's part is in test_http_json.py (a node behind a
real Envoy) and tests/e2e/test_front_door_hardening.py (the whole front door).

- Required fields (docs/http.md, "Required fields"): a Put without ``value``, a Watch without
  ``start_revision`` and an empty ``precondition`` are INVALID_ARGUMENT naming the field, at
  the gateway (before anything is routed) and at a node reached directly, and change nothing.
- Message sizes (dkv.sizes): a request over the limit is RESOURCE_EXHAUSTED with gRPC's message
  naming both sizes at the gateway, a node and membership; each keeps serving. The largest
  valid request passes everywhere.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from gateway_stack import Stack, running_stack

from dkv.sizes import request_bytes_max, response_bytes_max
from dkv.v1 import kv_pb2

REQUEST_MAX = request_bytes_max()
VALUE_REQUIRED = 'value is required (send "" for an empty value)'
START_REQUIRED = "start_revision is required (0: changes from now on; N: from revision N on)"


def _unary(channel: grpc.aio.Channel, path: str) -> Any:
    """A call that sends bytes as they are (so a request may be anything, of any size)."""
    return channel.unary_unary(path, request_serializer=lambda b: b, response_deserializer=None)


async def _status(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details() or ""


async def _watch_status(channel: grpc.aio.Channel, req: kv_pb2.WatchRequest) -> tuple[Any, str]:
    stream = channel.unary_stream(
        "/dkv.v1.KV/Watch", request_serializer=kv_pb2.WatchRequest.SerializeToString
    )(req, timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stream:
            pass
    return info.value.code(), info.value.details() or ""


async def _read(st: Stack, key: bytes) -> kv_pb2.RangeResponse:
    return await st.range(kv_pb2.RangeRequest(key=key))


def test_required_fields_are_refused_at_the_gateway_and_at_a_node(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_stack(tmp_path) as st:
            key = b"strict/k"
            await st.put(kv_pb2.PutRequest(key=key, value=b"old"))
            before = await _read(st, key)
            node = next(iter(st.nodes.values()))
            async with grpc.aio.insecure_channel(f"127.0.0.1:{node.client_port}") as at_node:
                for where, channel in (("gateway", st.channel), ("node", at_node)):
                    assert channel is not None
                    put = _unary(channel, "/dkv.v1.KV/Put")
                    # What the transcoder makes of {"valu": "..."}: a Put without value.
                    no_value = kv_pb2.PutRequest(key=key, prev_kv=True).SerializeToString()
                    assert await _status(put(no_value, timeout=10)) == (
                        grpc.StatusCode.INVALID_ARGUMENT,
                        VALUE_REQUIRED,
                    ), where
                    # {"value": "x", "precondition": {"verison": "1"}}: a precondition of none.
                    empty = kv_pb2.PutRequest(
                        key=key, value=b"x", precondition=kv_pb2.Precondition()
                    )
                    code, details = await _status(put(empty.SerializeToString(), timeout=10))
                    assert code is grpc.StatusCode.INVALID_ARGUMENT, where
                    assert details.startswith("precondition must set one of version"), details
                    for req in (
                        kv_pb2.WatchRequest(key=key),
                        kv_pb2.WatchRequest(prefix=b"strict/", prev_kv=True),
                    ):
                        assert await _watch_status(channel, req) == (
                            grpc.StatusCode.INVALID_ARGUMENT,
                            START_REQUIRED,
                        ), where
            # Nothing was written: the key and its shard's revision are as they were.
            after = await _read(st, key)
            assert list(after.kvs) == list(before.kvs)
            assert after.header.revision == before.header.revision

            # An empty value is written by sending it.
            written = await st.put(kv_pb2.PutRequest(key=key, value=b""))
            assert written.succeeded
            [kv] = (await _read(st, key)).kvs
            assert kv.value == b"" and kv.version == 2
            # A watch that says where it starts is served (0, "from now on", is what the
            # watches of test_gateway_routing send).
            stream = st.watch(kv_pb2.WatchRequest(key=key, start_revision=kv.mod_revision))
            first = await anext(aiter(stream))
            assert [(e.kv.value, e.kv.version) for e in first.events] == [(b"", 2)]
            stream.cancel()

    asyncio.run(scenario())


def test_oversize_requests_are_resource_exhausted_at_every_server(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_stack(tmp_path) as st:
            key = b"size/k"
            await st.put(kv_pb2.PutRequest(key=key, value=b"old"))
            before = await _read(st, key)
            oversize = kv_pb2.PutRequest(key=key, value=b"x" * REQUEST_MAX).SerializeToString()
            refused = (
                f"SERVER: Received message larger than max ({len(oversize)} vs. {REQUEST_MAX})"
            )
            # The largest valid request: a CAS with the longest key, value, precondition
            # value and request id. It passes every message limit (the CAS just fails).
            largest = kv_pb2.PutRequest(
                key=b"L" * 4096,
                value=b"v" * (1 << 20),
                request_id="r" * 128,
                precondition=kv_pb2.Precondition(value=b"p" * (1 << 20)),
            )
            assert largest.ByteSize() <= REQUEST_MAX
            node = next(iter(st.nodes.values()))
            async with (
                grpc.aio.insecure_channel(f"127.0.0.1:{node.client_port}") as at_node,
                grpc.aio.insecure_channel(st.membership_address) as at_membership,
            ):
                for where, channel in (("gateway", st.channel), ("node", at_node)):
                    assert channel is not None
                    put = _unary(channel, "/dkv.v1.KV/Put")
                    assert await _status(put(oversize, timeout=10)) == (
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        refused,
                    ), where
                    # Within the limits, the largest valid request reaches the handler.
                    answer = kv_pb2.PutResponse.FromString(
                        await put(largest.SerializeToString(), timeout=30)
                    )
                    assert not answer.succeeded, where  # the key does not exist: no match
                join = _unary(at_membership, "/dkv.v1.Membership/JoinNode")
                code, details = await _status(join(b"\x0a" + b"x" * REQUEST_MAX, timeout=10))
                assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
                assert details.startswith("SERVER: Received message larger than max (")
                assert details.endswith(f" vs. {REQUEST_MAX})")
                # Membership keeps serving.
                listed = _unary(at_membership, "/dkv.v1.Membership/ListNodes")
                assert await listed(b"", timeout=10) is not None
            # Nothing was written, and the gateway and the nodes keep serving.
            after = await _read(st, key)
            assert list(after.kvs) == list(before.kvs)
            assert (await st.put(kv_pb2.PutRequest(key=key, value=b"new"))).succeeded

    asyncio.run(scenario())


def test_an_answer_over_the_limit_is_resource_exhausted(tmp_path: Path) -> None:
    """Answers are paged under the limit, except a range Delete's ``prev_kvs`` (dkv.sizes):
    past the limit the caller gets RESOURCE_EXHAUSTED naming both sizes, after the delete
    was done. This pins that documented exception."""

    async def scenario() -> None:
        async with running_stack(tmp_path) as st:
            for i in range(5):
                await st.put(kv_pb2.PutRequest(key=b"big/%d" % i, value=b"v" * (1 << 20)))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await st.delete(
                    kv_pb2.DeleteRequest(key=b"big/", range_end=b"big0", prev_kv=True), 30
                )
            assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            details = info.value.details() or ""
            assert "larger than max (" in details, details
            assert details.endswith(f" vs. {response_bytes_max()})"), details
            got = await st.range(kv_pb2.RangeRequest(prefix=b"big/", count_only=True))
            assert got.count == 0  # deleted all the same
            # Without prev_kv the same delete answers a count.
            await st.put(kv_pb2.PutRequest(key=b"big/0", value=b"v" * (1 << 20)))
            done = await st.delete(kv_pb2.DeleteRequest(key=b"big/", range_end=b"big0"), 30)
            assert done.deleted == 1

    asyncio.run(scenario())
