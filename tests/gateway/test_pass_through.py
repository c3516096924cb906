"""The gateway passes bytes through (dkv_gateway.wire, docs/benchmarks.md "Lever 5").

A gateway (KvGateway + Router on a server made by ``dkv.host.rpc_server.new_server``, so the
decode guard and metrics are the real ones) in front of fake nodes: grpc.aio servers that
record the bytes they receive and answer with bytes a test chooses. The cluster map is
static: one shard, replicas 7 and 8, 7 the leader.

- what the caller sends reaches the node byte for byte (fields the gateway does not know
  too), and the node's answer reaches the caller byte for byte;
- a write without a request id gets one appended, and the node reads it;
- bytes that are no valid request are INVALID_ARGUMENT naming the type, and reach no node;
- a slow leader is waited for (one attempt: a write queued under overload is not sent
  again); UNAVAILABLE moves on; a leadership that moves away from the node holding an attempt
  cancels it and sends it to the new leader;
- access rules read the decoded fields of a received request;
- ``NodeChannels`` opens one connection per channel.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import pytest
from dkv_gateway.kv_gateway import KvGateway, add_kv_gateway
from dkv_gateway.metrics import GatewayMetrics
from dkv_gateway.router import NodeChannels, Router, _leader_of
from dkv_gateway.wire import REQUEST_ID_FIELD, Decoder, Received, string_field, with_request_id
from dkv_membership.state import slot_table
from google.protobuf.message import DecodeError

from dkv.client.cluster_map import ClusterMapView
from dkv.host.rpc_server import new_server
from dkv.security.authz import KeyRange
from dkv.security.rules import put_keys, reveals_values, span_keys
from dkv.telemetry import ProcessMetrics
from dkv.v1 import kv_pb2
from dkv.v1 import membership_pb2 as pb

LEADER, FOLLOWER = 7, 8
UNKNOWN_FIELD = b"\xf8\x06\x2a"  # field 111, varint 42: no kv.proto message has it


def _answer(member_id: int, extra: bytes = b"") -> bytes:
    resp = kv_pb2.PutResponse(succeeded=True)
    resp.header.member_id = member_id
    resp.header.raft_term = 3
    resp.header.revision = 11
    return resp.SerializeToString() + extra


Behaviour = Callable[[bytes, grpc.aio.ServicerContext[Any, Any]], Awaitable[bytes]]


@dataclass
class FakeNode:
    """A node's KV port that records every request's bytes and answers with ``behaviour``."""

    node_id: int
    behaviour: Behaviour
    received: list[bytes] = field(default_factory=list)
    peers: set[str] = field(default_factory=set)
    server: grpc.aio.Server | None = None
    address: str = ""

    async def start(self) -> None:
        async def handle(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            self.received.append(request)
            self.peers.add(context.peer())
            return await self.behaviour(request, context)

        handler = grpc.unary_unary_rpc_method_handler(handle)
        methods = {m: handler for m in ("Put", "Range", "Delete")}
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("dkv.v1.KV", methods),)
        )
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{port}"
        await self.server.start()


def answering(data: bytes, delay_s: float = 0.0) -> Behaviour:
    async def behaviour(_request: bytes, _context: Any) -> bytes:
        if delay_s:
            await asyncio.sleep(delay_s)
        return data

    return behaviour


def _map(nodes: list[FakeNode], leader: int, term: int) -> pb.WatchClusterMapResponse:
    return pb.WatchClusterMapResponse(
        version=term,
        full=True,
        map=pb.ClusterMap(
            version=term,
            nodes=[
                pb.Node(id=n.node_id, state=pb.NODE_STATE_UP, client_address=n.address)
                for n in nodes
            ],
            shards=[pb.Shard(id=1, voters=[n.node_id for n in nodes])],
            slot_ranges=slot_table(1),
            leaders=[pb.LeaderEntry(shard_id=1, leader_id=leader, term=term)],
        ),
    )


@dataclass
class Gateway:
    router: Router
    view: ClusterMapView
    nodes: list[FakeNode]
    channel: grpc.aio.Channel
    metrics: GatewayMetrics

    def raw(self, method: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
        return self.channel.unary_unary(
            f"/dkv.v1.KV/{method}", request_serializer=None, response_deserializer=None
        )

    def move_leader(self, leader: int, term: int) -> None:
        self.view.apply(_map(self.nodes, leader, term))
        self.router.on_map_change(self.view)


@asynccontextmanager
async def gateway(leader: Behaviour, follower: Behaviour) -> AsyncIterator[Gateway]:
    nodes = [FakeNode(LEADER, leader), FakeNode(FOLLOWER, follower)]
    for n in nodes:
        await n.start()
    view = ClusterMapView()
    view.apply(_map(nodes, LEADER, 1))
    process = ProcessMetrics.create(process=False)
    metrics = GatewayMetrics(process.registry, process.grpc_client)
    pool = NodeChannels(None)
    router = Router(view, pool, metrics=metrics)
    router.on_map_change(view)
    server = new_server(metrics=process.grpc_server)
    add_kv_gateway(server, KvGateway(router))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Gateway(router, view, nodes, channel, metrics)
    finally:
        await channel.close()
        await server.stop(None)
        await pool.close()
        for n in nodes:
            assert n.server is not None
            await n.server.stop(None)


def _put(**kw: Any) -> bytes:
    return kv_pb2.PutRequest(key=b"k", value=b"v", **kw).SerializeToString()


async def _code(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details() or ""


# -- bytes in, bytes out ---------------------------------------------------------------------


def test_requests_and_answers_pass_through_byte_for_byte() -> None:
    answer = _answer(LEADER, UNKNOWN_FIELD)
    rng = kv_pb2.RangeRequest(key=b"k", consistency=kv_pb2.READ_CONSISTENCY_SERIALIZABLE)

    async def scenario() -> None:
        async with gateway(answering(answer), answering(b"")) as gw:
            leader = gw.nodes[0]
            put = _put(request_id="r1") + UNKNOWN_FIELD  # a field this gateway does not know
            assert await gw.raw("Put")(put, timeout=5) == answer
            get = rng.SerializeToString() + UNKNOWN_FIELD
            assert await gw.raw("Range")(get, timeout=5) == answer
            delete = kv_pb2.DeleteRequest(key=b"k", request_id="d1").SerializeToString()
            assert await gw.raw("Delete")(delete, timeout=5) == answer
            assert leader.received == [put, get, delete]
            assert gw.nodes[1].received == []
            assert gw.router.hint(1) == LEADER  # learned from the answer's header

    asyncio.run(scenario())


def test_a_write_without_a_request_id_gets_one_appended() -> None:
    async def scenario() -> None:
        async with gateway(answering(_answer(LEADER)), answering(b"")) as gw:
            # An explicit empty request id (a hand-made body): the appended one wins.
            sent = _put() + string_field(REQUEST_ID_FIELD, "")
            await gw.raw("Put")(sent, timeout=5)
            await gw.raw("Delete")(kv_pb2.DeleteRequest(key=b"k").SerializeToString(), timeout=5)
            put, delete = gw.nodes[0].received
            assert put.startswith(sent)
            rid = kv_pb2.PutRequest.FromString(put).request_id
            assert len(rid) == 32 and int(rid, 16) >= 0
            assert put == with_request_id(sent, rid)
            assert len(kv_pb2.DeleteRequest.FromString(delete).request_id) == 32

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("method", "body", "type_name"),
    [
        ("Put", b"\xff", "dkv.v1.PutRequest"),
        ("Put", b"\x0a\x05ab", "dkv.v1.PutRequest"),  # a key of 5 bytes, 2 sent
        ("Put", b"\x08\x80", "dkv.v1.PutRequest"),  # a truncated varint
        ("Put", _put() + b"\x52\x02\xc3\x28", "dkv.v1.PutRequest"),  # request_id not UTF-8
        ("Range", b"\x00\x01", "dkv.v1.RangeRequest"),  # field number 0
        ("Delete", b"\x0b", "dkv.v1.DeleteRequest"),  # a group that never ends
    ],
)
def test_malformed_bytes_are_invalid_argument_and_reach_no_node(
    method: str, body: bytes, type_name: str
) -> None:
    async def scenario() -> None:
        async with gateway(answering(_answer(LEADER)), answering(b"")) as gw:
            code, details = await _code(gw.raw(method)(body, timeout=5))
            assert code is grpc.StatusCode.INVALID_ARGUMENT, details
            assert details.startswith(f"the request body is not a valid {type_name}"), details
            assert all(not n.received for n in gw.nodes)
            # ... and the gateway keeps serving.
            assert await gw.raw("Put")(_put(), timeout=5) == _answer(LEADER)

    asyncio.run(scenario())


def test_requests_that_make_no_sense_are_refused_before_routing() -> None:
    async def scenario() -> None:
        async with gateway(answering(_answer(LEADER)), answering(b"")) as gw:
            no_value = kv_pb2.PutRequest(key=b"k").SerializeToString()
            assert await _code(gw.raw("Put")(no_value, timeout=5)) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                'value is required (send "" for an empty value)',
            )
            bad = kv_pb2.RangeRequest(key=b"k", consistency=9).SerializeToString()
            code, details = await _code(gw.raw("Range")(bad, timeout=5))
            assert code is grpc.StatusCode.INVALID_ARGUMENT and "consistency" in details
            assert all(not n.received for n in gw.nodes)

    asyncio.run(scenario())


# -- attempts --------------------------------------------------------------------------------


def test_a_slow_leader_is_waited_for_and_a_write_is_sent_once() -> None:
    """Under overload a write waits at the leader behind others: sending it again elsewhere
    (as the half-deadline attempt timeout did) adds Raft entries and answers nothing sooner."""

    async def scenario() -> None:
        async with gateway(answering(_answer(LEADER), delay_s=1.5), answering(b"")) as gw:
            assert await gw.raw("Put")(_put(), timeout=2.5) == _answer(LEADER)
            assert len(gw.nodes[0].received) == 1
            assert gw.nodes[1].received == []
            assert gw.router.retries == 0

    asyncio.run(scenario())


def test_a_leader_slower_than_the_deadline_is_deadline_exceeded_naming_the_write() -> None:
    async def scenario() -> None:
        async with gateway(answering(_answer(LEADER), delay_s=5), answering(b"")) as gw:
            call = gw.raw("Put")(_put(request_id="w1"), timeout=1.0)
            code, details = await _code(call)
            assert code is grpc.StatusCode.DEADLINE_EXCEEDED, details
            assert ("dkv-request-id", "w1") in tuple(await call.trailing_metadata() or ())
            assert len(gw.nodes[0].received) == 1 and gw.nodes[1].received == []

    asyncio.run(scenario())


def test_not_leader_moves_to_the_named_leader() -> None:
    async def not_leader(_request: bytes, context: Any) -> bytes:
        context.set_trailing_metadata((("dkv-leader-id", str(FOLLOWER)),))
        await context.abort(grpc.StatusCode.UNAVAILABLE, "not the leader")
        raise AssertionError("unreachable")

    async def scenario() -> None:
        async with gateway(not_leader, answering(_answer(FOLLOWER))) as gw:
            assert await gw.raw("Put")(_put(), timeout=5) == _answer(FOLLOWER)
            assert len(gw.nodes[0].received) == 1
            # The same bytes, request id included, went to the leader the answer named.
            assert gw.nodes[1].received == gw.nodes[0].received
            assert gw.router.hint(1) == FOLLOWER

    asyncio.run(scenario())


def test_an_attempt_at_a_deposed_leader_moves_when_the_map_names_another() -> None:
    """A deposed leader may hold a write until the deadline: when the map reports a new
    leader, the attempt waiting at the old one is cancelled and sent to the new one."""

    async def scenario() -> None:
        at_old = asyncio.Event()
        hold = asyncio.Event()

        async def deposed(_request: bytes, _context: Any) -> bytes:
            at_old.set()
            await hold.wait()
            return _answer(LEADER)

        async with gateway(deposed, answering(_answer(FOLLOWER))) as gw:
            call = gw.raw("Put")(_put(), timeout=10)
            await asyncio.wait_for(at_old.wait(), 5)
            gw.move_leader(FOLLOWER, term=2)
            assert await asyncio.wait_for(call, 5) == _answer(FOLLOWER)
            assert gw.nodes[1].received == gw.nodes[0].received  # the same request id
            assert gw.router.retries == 1
            assert gw.metrics.retries["leader_moved"]._value.get() == 1
            # News of the same leader (a newer map, same node) cancels nothing.
            hold.set()
            gw.move_leader(FOLLOWER, term=3)
            assert await gw.raw("Put")(_put(), timeout=5) == _answer(FOLLOWER)

    asyncio.run(scenario())


# -- pieces ----------------------------------------------------------------------------------


def test_access_rules_read_a_received_request() -> None:
    put = Decoder(kv_pb2.PutRequest).decode(_put(prev_kv=True))
    assert put_keys(put) == KeyRange.key(b"k")
    assert reveals_values(put)
    plain = Decoder(kv_pb2.PutRequest).decode(_put())
    assert not reveals_values(plain)
    cas = kv_pb2.PutRequest(key=b"k", value=b"v", precondition=kv_pb2.Precondition(version=1))
    assert reveals_values(Decoder(kv_pb2.PutRequest).decode(cas.SerializeToString()))
    rng = Decoder(kv_pb2.RangeRequest).decode(kv_pb2.RangeRequest(prefix=b"p/").SerializeToString())
    assert span_keys(rng) == KeyRange.prefix(b"p/")
    # The last occurrence of the key wins, for the checks as for the node.
    twice = kv_pb2.PutRequest(key=b"a").SerializeToString() + _put()
    got: Received[kv_pb2.PutRequest] = Decoder(kv_pb2.PutRequest).decode(twice)
    assert put_keys(got) == KeyRange.key(b"k") and got.data == twice
    with pytest.raises(DecodeError):
        Decoder(kv_pb2.PutRequest).decode(b"\xff")


def test_the_leader_named_by_a_write_answer() -> None:
    assert _leader_of("Put", _answer(LEADER, UNKNOWN_FIELD)) == (LEADER, 3)
    deleted = kv_pb2.DeleteResponse(deleted=1)
    deleted.header.member_id, deleted.header.raft_term = FOLLOWER, 4
    assert _leader_of("Delete", deleted.SerializeToString()) == (FOLLOWER, 4)
    assert _leader_of("Put", b"\xff") == (0, 0)  # learns nothing, breaks nothing
    assert _leader_of("Range", _answer(LEADER)) == (0, 0)  # reads teach nothing


def test_node_channels_open_one_connection_each() -> None:
    async def scenario() -> None:
        node = FakeNode(LEADER, answering(b""))
        await node.start()
        pool = NodeChannels(None, per_node=3)
        try:
            for _ in range(6):
                stub = pool.get(node.address).unary_unary(
                    "/dkv.v1.KV/Range", request_serializer=None, response_deserializer=None
                )
                await stub(b"", timeout=5)
            assert len(node.peers) == 3, node.peers
            assert pool.addresses == {node.address}
            pool.discard(node.address)
            assert pool.addresses == set()
        finally:
            await pool.close()
            assert node.server is not None
            await node.server.stop(None)

    asyncio.run(scenario())
    with pytest.raises(Exception, match="channels per node must be >= 1"):
        NodeChannels(None, per_node=0)
