"""Hosts over the real gRPC peer transport on 127.0.0.1, with mTLS from the dev PKI."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import grpc
import grpc.aio
import pytest
from dkv_node.shard import KvShard

from dkv.host import Host, HostConfig
from dkv.host.grpc_transport import GrpcTransport, TlsFiles, add_raft_peer_service, encode
from dkv.raft import ConfState, Message, MessageType, Role
from dkv.security import PkiLayout, write_dev_pki
from dkv.storage import Engine, Identity
from dkv.v1 import kv_pb2
from dkv.v1 import raft_pb2 as pb

NODES = (1, 2, 3)


def _server_creds(pki: PkiLayout, name: str) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(pki.key(name).read_bytes(), pki.cert(name).read_bytes())],
        root_certificates=pki.ca_cert.read_bytes(),
        require_client_auth=True,
    )


def test_three_hosts_replicate_over_grpc_with_mtls(tmp_path: Path) -> None:
    pki = PkiLayout(tmp_path / "pki")
    write_dev_pki(pki.directory, [("node", f"n{n}") for n in NODES])

    async def scenario() -> None:
        servers: dict[int, grpc.aio.Server] = {}
        ports: dict[int, int] = {}
        for n in NODES:
            servers[n] = grpc.aio.server()
            ports[n] = servers[n].add_secure_port("127.0.0.1:0", _server_creds(pki, f"n{n}"))
        addrs = {n: f"localhost:{ports[n]}" for n in NODES}
        hosts: dict[int, Host] = {}
        engines: dict[int, Engine] = {}
        shards: dict[int, KvShard] = {}
        for n in NODES:
            tls = TlsFiles(str(pki.cert(f"n{n}")), str(pki.key(f"n{n}")), str(pki.ca_cert))
            transport = GrpcTransport(n, "c1", addrs, tls=tls)
            add_raft_peer_service(servers[n], transport.service)
            engines[n] = Engine.open(tmp_path / f"n{n}", Identity("c1", f"n{n}"), create=True)
            hosts[n] = Host(
                HostConfig(node_id=n, tick_interval_ms=10), engines[n], transport, random.Random(n)
            )
            shards[n] = KvShard(engines[n], 1, n)
            hosts[n].add_group(1, shards[n], ConfState.of(NODES))
            await servers[n].start()
        for h in hosts.values():
            await h.start()
        try:

            def leader() -> int:
                ls = [n for n, h in hosts.items() if h.groups[1].node.status().role is Role.LEADER]
                return ls[0] if len(ls) == 1 else 0

            await hosts[1].wait_for(lambda: leader() != 0, 20)
            lead = hosts[leader()]
            cmds = [
                kv_pb2.KvCommand(
                    request_id=f"r{i}", put=kv_pb2.PutRequest(key=b"k%d" % i, value=b"v")
                )
                for i in range(50)
            ]
            res = await asyncio.gather(*(lead.propose(1, c.SerializeToString(), 10) for c in cmds))
            assert all(r.succeeded for r in res)
            # Every replica applies everything: wait for it as an event, then compare.
            last = lead.groups[1].storage.applied_index
            for n in NODES:
                await hosts[n].wait_for(
                    lambda n=n: hosts[n].groups[1].storage.applied_index >= last, 20
                )
                got = shards[n].kv.range(kv_pb2.RangeRequest(prefix=b"k", count_only=True))
                assert got.count == 50

            # A peer without a client certificate cannot open a stream (handshake refused).
            async with grpc.aio.insecure_channel(addrs[1]) as plain:
                call = plain.stream_stream(
                    "/dkv.v1.RaftPeer/Stream",
                    request_serializer=pb.MessageBatch.SerializeToString,
                    response_deserializer=pb.StreamAck.FromString,
                )()
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await call.write(pb.MessageBatch())
                    await call.read()
                assert exc.value.code() is grpc.StatusCode.UNAVAILABLE

            # A peer of another cluster (right CA, wrong cluster id) is refused, never stepped.
            tls = TlsFiles(str(pki.cert("n2")), str(pki.key("n2")), str(pki.ca_cert))
            cert, key, ca = tls.read()
            creds = grpc.ssl_channel_credentials(ca, key, cert)
            async with grpc.aio.secure_channel(addrs[1], creds) as ch:
                call = ch.stream_stream(
                    "/dkv.v1.RaftPeer/Stream",
                    request_serializer=pb.MessageBatch.SerializeToString,
                    response_deserializer=pb.StreamAck.FromString,
                )()
                bogus = encode(
                    "other", 2, [(1, Message(MessageType.HEARTBEAT, to=1, frm=2, term=99))]
                )
                await call.write(bogus)
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await call.read()
                assert exc.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert hosts[1].groups[1].node.status().term < 99
        finally:
            for h in hosts.values():
                await h.stop()
            for s in servers.values():
                await s.stop(None)
            for e in engines.values():
                e.close()

    asyncio.run(scenario())
