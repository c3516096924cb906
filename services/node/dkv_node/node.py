"""A storage node assembled from its configuration: RocksDB, Raft host, peer and client servers.

Member ids are derived from the cluster token and the member's name (a stable 63-bit hash),
as etcd derives them from its cluster token and peer URLs: every member computes the same ids
from the same ``--initial-cluster`` without talking to anyone.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dkv.errors import InvalidArgument
from dkv.host import Host, HostConfig
from dkv.host.grpc_transport import GrpcTransport, TlsFiles, add_raft_peer_service
from dkv.raft import ConfState
from dkv.storage import Engine, Identity
from dkv_node.kv_service import KvService, add_kv_service
from dkv_node.limits import Limits
from dkv_node.shard import KvShard

__all__ = ["Node", "NodeConfig", "member_id"]


def member_id(cluster_token: str, name: str) -> int:
    digest = hashlib.blake2b(f"{cluster_token}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFF_FFFF_FFFF_FFFF or 1


@dataclass(frozen=True)
class NodeConfig:
    name: str
    data_dir: Path
    listen_peer: str
    listen_client: str
    initial_cluster: dict[str, str]  # name -> advertised peer address
    initial_cluster_state: str = "new"  # "new" or "existing"
    cluster_token: str = "dkv-cluster"
    shards: int = 1
    peer_tls: TlsFiles | None = None
    client_tls: TlsFiles | None = None
    limits: Limits = field(default_factory=Limits)
    tick_interval_ms: int = 100
    election_timeout_ticks: int = 10
    snapshot_count: int = 10_000  # applied entries between snapshots (etcd's --snapshot-count)
    snapshot_catchup_entries: int = 1_000  # entries kept behind a snapshot for slow followers

    def validate(self) -> None:
        if self.name not in self.initial_cluster:
            raise InvalidArgument(
                f"--name {self.name!r} is not in --initial-cluster "
                f"({', '.join(sorted(self.initial_cluster)) or 'empty'})"
            )
        if self.initial_cluster_state not in ("new", "existing"):
            raise InvalidArgument("--initial-cluster-state must be 'new' or 'existing'")
        if not 1 <= self.shards <= 1024:
            raise InvalidArgument("--shards must be between 1 and 1024")
        if self.snapshot_count < 1 or self.snapshot_catchup_entries < 0:
            raise InvalidArgument(
                "--snapshot-count must be >= 1 and --snapshot-catchup-entries >= 0"
            )


class Node:
    def __init__(self, cfg: NodeConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.id = member_id(cfg.cluster_token, cfg.name)
        self.members = {member_id(cfg.cluster_token, n): n for n in cfg.initial_cluster}
        self.engine: Engine | None = None
        self.host: Host | None = None
        self.shards: dict[int, KvShard] = {}
        self.peer_server: grpc.aio.Server | None = None
        self.client_server: grpc.aio.Server | None = None
        self.peer_port = 0
        self.client_port = 0

    async def start(self) -> None:
        cfg = self.cfg
        # The data dir belongs to (cluster token, name): a mismatch refuses to start.
        self.engine = Engine.open(
            cfg.data_dir,
            Identity(cluster_id=cfg.cluster_token, node_name=cfg.name),
            create=cfg.initial_cluster_state == "new",
        )
        peers = {member_id(cfg.cluster_token, n): a for n, a in cfg.initial_cluster.items()}
        transport = GrpcTransport(self.id, cfg.cluster_token, peers, tls=cfg.peer_tls)
        host_cfg = HostConfig(
            node_id=self.id,
            tick_interval_ms=cfg.tick_interval_ms,
            election_timeout_ticks=cfg.election_timeout_ticks,
            snapshot_every_entries=cfg.snapshot_count,
            compact_keep_entries=cfg.snapshot_catchup_entries,
        )
        self.host = Host(host_cfg, self.engine, transport, random.Random(self.id))
        voters = ConfState.of(list(peers))
        for gid in range(1, cfg.shards + 1):
            shard = KvShard(self.engine, gid, self.id)
            self.shards[gid] = shard
            self.host.add_group(gid, shard, voters if cfg.initial_cluster_state == "new" else None)

        self.peer_server = grpc.aio.server()
        add_raft_peer_service(self.peer_server, transport.service)
        self.peer_port = _bind(self.peer_server, cfg.listen_peer, cfg.peer_tls)
        self.client_server = grpc.aio.server()
        add_kv_service(
            self.client_server, KvService(self.host, self.shards, cfg.limits, self.members)
        )
        health_servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self.client_server)
        self.client_port = _bind(self.client_server, cfg.listen_client, cfg.client_tls)
        await self.peer_server.start()
        await self.host.start()
        await self.client_server.start()
        health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace_s: float = 2.0) -> None:
        """Graceful: stop accepting clients, let in-flight requests finish, then stop Raft."""
        if self.client_server is not None:
            await self.client_server.stop(grace_s)
        if self.host is not None:
            await self.host.stop()
        if self.peer_server is not None:
            await self.peer_server.stop(None)
        if self.engine is not None:
            self.engine.close()


def _bind(server: grpc.aio.Server, address: str, tls: TlsFiles | None) -> int:
    if tls is None:
        port = server.add_insecure_port(address)
    else:
        cert, key, ca = tls.read()
        creds = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=True
        )
        port = server.add_secure_port(address, creds)
    if port == 0:
        raise InvalidArgument(f"cannot listen on {address} (in use or not an address)")
    return port
