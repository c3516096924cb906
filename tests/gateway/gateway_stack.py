"""A whole dkv stack in one process for the gateway tests: one membership replica, three
storage nodes (static ``--initial-cluster``, 3 shards, registered with membership), the shard
table initialized through membership, and a gateway pointed at membership.

Real gRPC on 127.0.0.1 and real RocksDB. Every wait is an event or a condition with a
deadline: ``Host.wait_for`` (re-checked after every host iteration), the gateway's
``initialized`` event, or :func:`eventually` for conditions nothing signals.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from dkv_gateway.router import Router
from dkv_gateway.server import GatewayConfig, GatewayServer
from dkv_membership.server import MembershipConfig, MembershipServer
from dkv_membership.service import MEMBERSHIP_GROUP_ID
from dkv_node.node import Node, NodeConfig
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from dkv.client import Client, ClientTls
from dkv.host import Host
from dkv.host.channels import TlsFiles
from dkv.security import PkiLayout, write_dev_pki
from dkv.sharding import shard_for_key
from dkv.telemetry.tracing import Tracing
from dkv.v1 import kv_pb2
from dkv.v1 import membership_pb2 as pb

NODE_NAMES = ("a", "b", "c")
SHARDS = 3
WAIT_S = 20.0


def free_port() -> int:
    """A port for addresses that must be known before anything binds (--initial-cluster)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], what: str, timeout_s: float = WAIT_S
) -> None:
    """Re-check ``check`` until it holds; fail naming ``what`` after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        ok = check()
        if not isinstance(ok, bool):
            ok = await ok
        if ok:
            return
        if loop.time() > deadline:
            raise AssertionError(f"not reached within {timeout_s} s: {what}")
        await asyncio.sleep(0.02)


def host_of(x: Node | MembershipServer) -> Host:
    assert x.host is not None
    return x.host


def keys_by_shard(prefix: bytes, count: int) -> dict[int, list[bytes]]:
    """``count`` keys ``prefix + NN``, grouped by the shard they belong to."""
    out: dict[int, list[bytes]] = {s: [] for s in range(1, SHARDS + 1)}
    for i in range(count):
        key = prefix + b"%02d" % i
        out[shard_for_key(key, SHARDS)].append(key)
    return out


def key_in_shard(shard: int, prefix: bytes = b"k/") -> bytes:
    i = 0
    while shard_for_key(prefix + b"%d" % i, SHARDS) != shard:
        i += 1
    return prefix + b"%d" % i


@dataclass
class Stack:
    root: Path
    membership: MembershipServer | None = None
    nodes: dict[str, Node] = field(default_factory=dict)
    gateway: GatewayServer | None = None
    client: Client | None = None
    channel: grpc.aio.Channel | None = None
    stopped: set[str] = field(default_factory=set)
    # mTLS on every internal hop (gateway/nodes -> membership, gateway -> nodes).
    tls: bool = False
    # Every process traces every request into this exporter (None: tracing off).
    spans: InMemorySpanExporter | None = None

    def tracing(self, service: str, name: str = "") -> Tracing | None:
        if self.spans is None:
            return None
        return Tracing.with_exporter(self.spans, service, name)

    def tls_files(self, name: str) -> TlsFiles | None:
        if not self.tls:
            return None
        pki = PkiLayout(self.root / "pki")
        kind = {"m1": "membership", "gateway": "gateway", "client": "user"}.get(name, "node")
        write_dev_pki(pki.directory, [(kind, name)])
        return TlsFiles(str(pki.cert(name)), str(pki.key(name)), str(pki.ca_cert))

    # -- parts ----------------------------------------------------------------------------------

    @property
    def membership_address(self) -> str:
        assert self.membership is not None
        return f"127.0.0.1:{self.membership.client_port}"

    @property
    def gateway_address(self) -> str:
        assert self.gateway is not None
        return f"127.0.0.1:{self.gateway.client_port}"

    @property
    def router(self) -> Router:
        assert self.gateway is not None and self.gateway.router is not None
        return self.gateway.router

    @property
    def kv(self) -> Client:
        assert self.client is not None
        return self.client

    def running(self) -> list[Node]:
        return [n for name, n in self.nodes.items() if name not in self.stopped]

    def node_by_id(self, node_id: int) -> Node:
        return next(n for n in self.nodes.values() if n.id == node_id)

    async def leader_of(self, shard: int) -> Node:
        """The node every running node agrees leads ``shard``."""
        found: list[Node] = []

        def agreed() -> bool:
            ids = {host_of(n).leader(shard) for n in self.running()}
            if len(ids) != 1 or 0 in ids:
                return False
            lid = ids.pop()
            ok = any(n.id == lid for n in self.running())
            if ok:
                found[:] = [self.node_by_id(lid)]
            return ok

        await eventually(agreed, f"the running nodes agree on a leader of shard {shard}")
        return found[0]

    async def stop_node(self, name: str) -> None:
        self.stopped.add(name)
        await self.nodes[name].stop(grace_s=0.5)

    # -- raw calls (to see statuses and trailers) -----------------------------------------------

    def _unary(self, method: str, resp_type: Any) -> Any:
        assert self.channel is not None
        return self.channel.unary_unary(
            f"/dkv.v1.KV/{method}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=resp_type.FromString,
        )

    async def put(
        self, req: kv_pb2.PutRequest, timeout_s: float = 10, metadata: Any = None
    ) -> kv_pb2.PutResponse:
        resp: kv_pb2.PutResponse = await self._unary("Put", kv_pb2.PutResponse)(
            req, timeout=timeout_s, metadata=metadata
        )
        return resp

    async def delete(
        self, req: kv_pb2.DeleteRequest, timeout_s: float = 10
    ) -> kv_pb2.DeleteResponse:
        resp: kv_pb2.DeleteResponse = await self._unary("Delete", kv_pb2.DeleteResponse)(
            req, timeout=timeout_s
        )
        return resp

    async def range(
        self, req: kv_pb2.RangeRequest, timeout_s: float = 10, metadata: Any = None
    ) -> kv_pb2.RangeResponse:
        resp: kv_pb2.RangeResponse = await self._unary("Range", kv_pb2.RangeResponse)(
            req, timeout=timeout_s, metadata=metadata
        )
        return resp

    def watch(self, req: kv_pb2.WatchRequest) -> Any:
        assert self.channel is not None
        return self.channel.unary_stream(
            "/dkv.v1.KV/Watch",
            request_serializer=kv_pb2.WatchRequest.SerializeToString,
            response_deserializer=kv_pb2.WatchResponse.FromString,
        )(req)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start_membership(self) -> None:
        self.membership = MembershipServer(
            MembershipConfig(
                name="m1",
                data_dir=self.root / "m1",
                listen_peer="127.0.0.1:0",
                listen_client="127.0.0.1:0",
                initial_cluster={"m1": "127.0.0.1:1"},  # one replica: never dialled
                tick_interval_ms=10,
                client_tls=self.tls_files("m1"),
                listen_metrics="127.0.0.1:0",  # recording is off without it
            ),
            tracing=self.tracing("dkv-membership", "m1"),
        )
        await self.membership.start()
        m = host_of(self.membership)
        await m.wait_for(lambda: m.leader(MEMBERSHIP_GROUP_ID) == self.membership_id, WAIT_S)

    @property
    def membership_id(self) -> int:
        assert self.membership is not None
        return self.membership.id

    async def start_nodes(self) -> None:
        peers = {n: f"127.0.0.1:{free_port()}" for n in NODE_NAMES}
        for name in NODE_NAMES:
            node = Node(
                NodeConfig(
                    name=name,
                    data_dir=self.root / name,
                    listen_peer=peers[name],
                    listen_client="127.0.0.1:0",
                    initial_cluster=peers,
                    shards=SHARDS,
                    tick_interval_ms=10,
                    membership=(self.membership_address,),
                    heartbeat_interval_ms=50,
                    client_tls=self.tls_files(name),
                    listen_metrics="127.0.0.1:0",  # recording is off without it
                ),
                tracing=self.tracing("dkv-node", name),
            )
            self.nodes[name] = node  # before start: stopped in the finally if start fails
            await node.start()

    async def init_cluster(self, with_replicas: bool = True) -> None:
        """What membership's automatic bootstrap will do: create the shards (with the three
        nodes as voters of each) once the nodes registered."""
        assert self.membership is not None and self.membership.sm is not None
        sm = self.membership.sm
        ids = [n.id for n in self.nodes.values()]
        await host_of(self.membership).wait_for(
            lambda: all(i in sm.state.nodes for i in ids), WAIT_S
        )
        shards = [pb.Shard(id=s, voters=ids) for s in range(1, SHARDS + 1)] if ids else []
        init = pb.InitClusterCommand(shard_count=SHARDS, shards=shards if with_replicas else [])
        service = self.membership.service
        assert service is not None
        out = await service.propose(pb.MembershipCommand(init_cluster=init), WAIT_S)
        assert out.accepted, out.reason

    async def start_gateway(
        self, default_timeout_ms: int = 10_000, watches_per_caller_max: int = 256
    ) -> None:
        self.gateway = GatewayServer(
            GatewayConfig(
                membership=(self.membership_address,),
                listen_client="127.0.0.1:0",
                listen_xds="127.0.0.1:0",
                envoy_port=free_port(),
                default_timeout_ms=default_timeout_ms,
                watches_per_caller_max=watches_per_caller_max,
                tls=self.tls_files("gateway"),
                listen_metrics="127.0.0.1:0",  # recording is off without it
            ),
            tracing=self.tracing("dkv-gateway"),
        )
        await self.gateway.start()
        client = self.tls_files("client")
        if client is None:
            self.client = Client([self.gateway_address], timeout_s=15.0)
            self.channel = grpc.aio.insecure_channel(self.gateway_address)
        else:  # the gateway's KV port requires a client certificate too
            tls = ClientTls(client.cert_file, client.key_file, client.trusted_ca_file)
            self.client = Client([self.gateway_address], tls, timeout_s=15.0)
            cert, key, ca = client.read()
            creds = grpc.ssl_channel_credentials(
                root_certificates=ca, private_key=key, certificate_chain=cert
            )
            self.channel = grpc.aio.secure_channel(self.gateway_address, creds)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self.channel is not None:
            await self.channel.close()
        if self.gateway is not None:
            await self.gateway.stop(grace_s=0)
        for name, node in self.nodes.items():
            if name not in self.stopped:
                await node.stop(grace_s=0)
        if self.membership is not None:
            await self.membership.stop(grace_s=0)


@asynccontextmanager
async def running_stack(
    root: Path,
    tls: bool = False,
    spans: InMemorySpanExporter | None = None,
    watches_per_caller_max: int = 256,
) -> AsyncIterator[Stack]:
    """Membership, three nodes, the initialized shard table and a gateway that knows it;
    every shard has a leader. ``spans``: every process traces into it."""
    st = Stack(root, tls=tls, spans=spans)
    try:
        await st.start_membership()
        await st.start_nodes()
        await st.init_cluster()
        await st.start_gateway(watches_per_caller_max=watches_per_caller_max)
        assert st.gateway is not None
        await asyncio.wait_for(st.gateway.initialized.wait(), WAIT_S)
        for shard in range(1, SHARDS + 1):
            await st.leader_of(shard)
        yield st
    finally:
        await st.close()
