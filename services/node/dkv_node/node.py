"""A storage node assembled from its configuration: RocksDB, Raft host, peer and client servers.

Member ids are derived from the cluster token and the member's name (a stable 63-bit hash),
as etcd derives them from its cluster token and peer URLs: every member computes the same ids
from the same ``--initial-cluster`` without talking to anyone.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dkv.errors import InvalidArgument
from dkv.host import Host, HostConfig
from dkv.host.channels import ChannelPool, TlsFiles
from dkv.host.members import (
    Member,
    MemberRegistry,
    decode_context,
    hello_metadata,
    member_from_hello,
    member_id,
)
from dkv.host.peer_transport import PeerListener, PeerTransport
from dkv.host.rpc_server import bind, new_server, with_port
from dkv.host.tracing import RaftTracer
from dkv.raft import ConfChange, ConfChangeType, ConfState
from dkv.security.access import ProcessAccess
from dkv.security.identity import TRUST_DOMAIN, check_trust_domain
from dkv.security.rules import node_client_rules, node_peer_rules
from dkv.storage import Batch, Engine, Identity
from dkv.telemetry import ProcessMetrics
from dkv.telemetry.http import MetricsServer
from dkv.telemetry.peer_metrics import PeerMetrics
from dkv.telemetry.raft_metrics import DiskMetrics, RaftCollector
from dkv.telemetry.tracing import Tracing, TracingConfig
from dkv.v1 import membership_pb2
from dkv_node.admin_service import AdminService, add_admin_service
from dkv_node.hosting import ShardHosting, hosted_shards
from dkv_node.kv_service import KvService, add_kv_service
from dkv_node.leader_router import LeaderRouter
from dkv_node.limits import Limits
from dkv_node.metrics import NodeCollector, NodeStats
from dkv_node.registration import Registration
from dkv_node.shard import KvShard

__all__ = ["Node", "NodeConfig", "member_id"]

log = logging.getLogger("dkv.node")

# Overload answers RESOURCE_EXHAUSTED ("too many concurrent RPCs") beyond this many calls in
# progress. gRPC core's own queue of calls not yet picked up is raised above it: by default
# it drops calls at random past 1000 pending (the caller sees CANCELLED and cannot tell the
# call never ran; found by `make bench-node` at 1024 in flight).
CLIENT_RPCS_MAX = 4096
CLIENT_SERVER_OPTIONS = (
    ("grpc.server.max_pending_requests", 2 * CLIENT_RPCS_MAX),
    ("grpc.server.max_pending_requests_hard_limit", 4 * CLIENT_RPCS_MAX),
)


@dataclass(frozen=True)
class NodeConfig:
    name: str
    data_dir: Path
    listen_peer: str
    listen_client: str
    initial_cluster: dict[str, str]  # name -> advertised peer address
    initial_cluster_state: str = "new"  # "new" or "existing"
    # Addresses other members and clients use (default: the listen addresses).
    advertise_peer: str = ""
    advertise_client: str = ""
    cluster_token: str = "dkv-cluster"
    shards: int = 1
    peer_tls: TlsFiles | None = None
    client_tls: TlsFiles | None = None
    limits: Limits = field(default_factory=Limits)
    tick_interval_ms: int = 100
    election_timeout_ticks: int = 10
    snapshot_count: int = 10_000  # applied entries between snapshots (etcd's --snapshot-count)
    snapshot_catchup_entries: int = 1_000  # entries kept behind a snapshot for slow followers
    # Client addresses (host:port) of the membership service; empty: no registration.
    membership: tuple[str, ...] = ()
    heartbeat_interval_ms: int = 1000
    # host:port of /metrics, /livez and /readyz; "" serves none (the CLI's default is on).
    listen_metrics: str = ""
    # OpenTelemetry traces (requests and their way through Raft); off without an endpoint.
    tracing: TracingConfig = field(default_factory=TracingConfig)
    # model.conf and policy.csv (dkv.security.authz): which users are admins (the only users
    # a node's client port serves). "": users are not checked; components always are (mTLS).
    auth_policy_dir: str = ""
    # The SPIFFE trust domain of every identity this process accepts (spiffe://DOMAIN/...).
    trust_domain: str = TRUST_DOMAIN

    @property
    def managed(self) -> bool:
        """Shards come from the membership service's map (no ``--initial-cluster``)."""
        return not self.initial_cluster and bool(self.membership)

    def validate(self) -> None:
        self.tracing.validate()
        check_trust_domain(self.trust_domain)
        if not self.initial_cluster and not self.membership:
            raise InvalidArgument(
                "give --membership (shards placed by the membership service) or "
                "--initial-cluster (a fixed set of members hosting every shard)"
            )
        if not self.managed and self.name not in self.initial_cluster:
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
        if self.heartbeat_interval_ms < 1:
            raise InvalidArgument("--heartbeat-interval-ms must be >= 1")


class Node:
    def __init__(self, cfg: NodeConfig, tracing: Tracing | None = None) -> None:
        """``tracing``: the spans' destination (tests); by default what ``cfg.tracing`` says."""
        cfg.validate()
        self.cfg = cfg
        self.id = member_id(cfg.cluster_token, cfg.name)
        self.tracing = tracing or Tracing.create(cfg.tracing, "dkv-node", cfg.name)
        self.engine: Engine | None = None
        self.transport: PeerTransport | None = None
        self.registry: MemberRegistry | None = None
        self.admin: AdminService | None = None
        self.router: LeaderRouter | None = None
        self.host: Host | None = None
        self.shards: dict[int, KvShard] = {}
        self.peer_listener: PeerListener | None = None
        self.client_server: grpc.aio.Server | None = None
        self.registration: Registration | None = None
        self.hosting: ShardHosting | None = None
        self._membership_channels = ChannelPool(cfg.client_tls)
        self._forward_channels = ChannelPool(cfg.client_tls)
        # One registry per node instance (tests run many in one interpreter).
        self.metrics = ProcessMetrics.create()
        self.access = ProcessAccess(cfg.auth_policy_dir, self.metrics.registry, cfg.trust_domain)
        self.metrics_server: MetricsServer | None = None
        self.peer_port = 0
        self.client_port = 0
        self.metrics_port = 0
        self.advertise_peer = ""
        self.advertise_client = ""

    def member_id_of(self, name: str) -> int:
        return member_id(self.cfg.cluster_token, name)

    async def start(self) -> None:
        cfg = self.cfg
        data_exists = (cfg.data_dir / "CURRENT").is_file()
        joining = cfg.initial_cluster_state == "existing" and not data_exists and not cfg.managed
        if joining:
            # etcd's way of adding a member: `dkvctl member add`, then start the new member
            # with the current members in --initial-cluster and state "existing". It starts
            # empty and learns each shard's configuration and data from the leader's snapshot.
            log.info("%s: joining an existing cluster with an empty data dir", cfg.name)
        # The data dir belongs to (cluster token, name): a mismatch refuses to start.
        self.engine = Engine.open(
            cfg.data_dir,
            Identity(cluster_id=cfg.cluster_token, node_name=cfg.name),
            create=cfg.initial_cluster_state == "new" or joining or cfg.managed,
        )
        # With --listen-metrics off nothing is recorded on the hot paths either (what
        # `make bench-telemetry` compares against), only the scrape-time collectors stay.
        recording = bool(cfg.listen_metrics)
        grpc_metrics = self.metrics.grpc_server if recording else None
        # Bind first, so that port 0 works and what we advertise is where we listen.
        self.peer_listener = PeerListener(
            cfg.cluster_token,
            tls=cfg.peer_tls,
            access=self.access.access(
                "a node's peer port", node_peer_rules(), tls=cfg.peer_tls is not None
            ),
            name="a node's peer port",
        )
        self.peer_port = await self.peer_listener.listen(cfg.listen_peer)
        self.client_server = new_server(
            # Messages as big as this node's limits allow (dkv.sizes), no bigger.
            options=(*CLIENT_SERVER_OPTIONS, *cfg.limits.message_limits().grpc_options()),
            maximum_concurrent_rpcs=CLIENT_RPCS_MAX,
            metrics=grpc_metrics,
            tracer=self.tracing.tracer,
            access=self.access.access(
                "a node's client port", node_client_rules(), tls=cfg.client_tls is not None
            ),
        )
        self.client_port = bind(self.client_server, cfg.listen_client, cfg.client_tls)
        self.access.start()
        if cfg.listen_metrics:
            self.metrics_server = MetricsServer(
                self.metrics.registry, cfg.listen_metrics, self.readiness
            )
            self.metrics_port = await self.metrics_server.start()
        advertise_peer = cfg.advertise_peer or with_port(cfg.listen_peer, self.peer_port)
        advertise_client = cfg.advertise_client or with_port(cfg.listen_client, self.client_port)
        self.advertise_peer, self.advertise_client = advertise_peer, advertise_client

        me = Member(self.id, cfg.name, advertise_peer, advertise_client)
        hello = hello_metadata(me)
        transport = PeerTransport(
            self.id,
            cfg.cluster_token,
            {},
            tls=cfg.peer_tls,
            hello=hello,
            listener=self.peer_listener,
        )
        self.transport = transport
        self.registry = MemberRegistry(
            self.engine,
            me,
            transport.set_peer,
        )
        for n, addr in cfg.initial_cluster.items():
            self.registry.seed(Member(self.member_id_of(n), n, addr))
        self.peer_listener.on_hello = self._on_hello

        host_cfg = HostConfig(
            node_id=self.id,
            tick_interval_ms=cfg.tick_interval_ms,
            election_timeout_ticks=cfg.election_timeout_ticks,
            snapshot_every_entries=cfg.snapshot_count,
            compact_keep_entries=cfg.snapshot_catchup_entries,
        )
        self.host = Host(host_cfg, self.engine, transport, random.Random(self.id))
        self.host.on_conf_change = self._on_conf_change
        if self.tracing.tracer is not None:
            self.host.tracer = RaftTracer(self.tracing.tracer)
        if recording:
            self.host.disk_metrics = DiskMetrics(self.metrics.registry)
            transport.metrics = PeerMetrics(self.metrics.registry)
        RaftCollector(self.host, self.metrics.registry)
        self.stats = NodeStats(self.metrics.registry)
        NodeCollector(self.shards, self.stats, lambda: self.engine, self.metrics.registry)
        if cfg.managed:
            # The shards hosted when the node stopped; the map adds and removes others.
            hosted, shard_count = hosted_shards(self.engine)
            for gid in hosted:
                self.host_shard(gid, None)
            self.hosting = ShardHosting(
                self, list(cfg.membership), self._membership_channels.get, shard_count
            )
        else:
            voters = ConfState.of([self.member_id_of(n) for n in cfg.initial_cluster])
            for gid in range(1, cfg.shards + 1):
                self.host_shard(gid, voters if cfg.initial_cluster_state == "new" else None)
        for gid in self.shards:  # members that joined after --initial-cluster was written
            cs = self.host.groups[gid].storage.conf_state
            for mid in (*cs.voters, *cs.learners):
                m = self.registry.get(mid)
                if m is not None and mid != self.id:
                    transport.set_peer(mid, m.peer_address)

        registry = self.registry

        def leader_info(mid: int) -> tuple[str, str]:
            return registry.name(mid), registry.client_address(mid)

        self.router = LeaderRouter(self.host, registry, self.id, self.client_channel)
        add_kv_service(
            self.client_server,
            KvService(
                self.host,
                self.shards,
                cfg.limits,
                leader_info,
                self.router,
                shard_count=self.shard_count,
                stats=self.stats,
            ),
        )
        self.admin = AdminService(self)
        add_admin_service(self.client_server, self.admin)
        health_servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self.client_server)
        await self.host.start()
        await self.client_server.start()
        health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        if cfg.membership:
            self.registration = Registration(
                cfg.membership,
                membership_pb2.Node(
                    id=self.id,
                    name=cfg.name,
                    peer_address=advertise_peer,
                    client_address=advertise_client,
                ),
                self.led_shards,
                interval_s=cfg.heartbeat_interval_ms / 1000,
                tls=cfg.client_tls,
            )
            self.registration.start()
        if self.hosting is not None:
            self.hosting.start()

    def readiness(self) -> tuple[bool, str]:
        """``/readyz``: the node can serve when every shard it hosts knows its leader (a read
        or write reaches it, here or forwarded). A managed node that has not seen the
        cluster map yet cannot route anything."""
        host = self.host
        if host is None or not host.running:
            return False, "starting"
        if self.cfg.managed and self.shard_count() == 0:
            return False, "waiting for the cluster map"
        leaderless = sorted(gid for gid in self.shards if host.leader(gid) == 0)
        if leaderless:
            shown = ", ".join(str(g) for g in leaderless[:10])
            more = f" and {len(leaderless) - 10} more" if len(leaderless) > 10 else ""
            return False, f"no known leader for shard(s) {shown}{more}"
        return True, f"ok: {len(self.shards)} shard(s), each with a leader"

    def shard_count(self) -> int:
        """How many shards the cluster has (keys map to shards by it); 0: not known yet."""
        if self.hosting is not None:
            return self.hosting.shard_count
        return self.cfg.shards

    def host_shard(self, gid: int, bootstrap: ConfState | None) -> None:
        """Start hosting shard ``gid`` (``bootstrap``: as an initial member with that
        configuration; None: from disk, or empty until the leader's snapshot arrives)."""
        assert self.engine is not None and self.host is not None
        shard = KvShard(self.engine, gid, self.id)
        self.host.add_group(gid, shard, bootstrap)
        self.shards[gid] = shard

    def led_shards(self) -> list[tuple[int, int]]:
        """(shard id, term) of every shard this node leads now (what heartbeats report)."""
        host = self.host
        if host is None or not host.running:
            return []
        return [(gid, host.term(gid)) for gid in self.shards if host.leader(gid) == self.id]

    def _on_hello(self, hello: dict[str, str]) -> None:
        """A peer opened its Raft stream and said who it is (see dkv.host.members)."""
        member = member_from_hello(hello, self.cfg.cluster_token)
        if member is not None and self.registry is not None:
            self.registry.learn(member)

    def _on_conf_change(self, gid: int, cc: ConfChange, cs: ConfState, batch: Batch) -> None:
        assert self.registry is not None and self.host is not None and self.transport is not None
        m = decode_context(cc.node_id, cc.context)
        if m is not None:
            self.registry.learn(m, batch)
        if cc.type is ConfChangeType.REMOVE_NODE:
            if cc.node_id == self.id:
                # INFO: placement moves replicas as nodes join and drain (hosting then logs
                # that the shard moved away), and a member removed by an operator expects it.
                log.info("%s: removed from shard %d", self.cfg.name, gid)
                return
            others = [g.storage.conf_state for i, g in self.host.groups.items() if i != gid]
            if not any(cc.node_id in (*c.voters, *c.learners) for c in others):
                self.registry.forget(cc.node_id, batch)
                self.transport.remove_peer(cc.node_id)

    def client_channel(self, address: str) -> grpc.aio.Channel:
        """A channel to another member's client port (admin forwarding), with this node's
        client TLS files when clients must use mTLS; pooled, rebuilt when the files change."""
        return self._forward_channels.get(address)

    async def stop(self, grace_s: float = 2.0) -> None:
        """Graceful: stop heartbeating, stop accepting clients, let in-flight requests finish,
        then stop Raft."""
        if self.registration is not None:
            await self.registration.stop()
            self.registration = None
        if self.hosting is not None:
            await self.hosting.stop()
        await self._membership_channels.close()
        await self.access.stop()
        if self.client_server is not None:
            await self.client_server.stop(grace_s)
        if self.router is not None:
            await self.router.close()
        await self._forward_channels.close()
        if self.host is not None:
            await self.host.stop()
        if self.peer_listener is not None:
            # host.stop() closed the transport and its listener; this covers a start that
            # failed before the host existed (closing twice is harmless).
            await self.peer_listener.close()
        if self.metrics_server is not None:
            await self.metrics_server.stop()
            self.metrics_server = None
        # Export the spans still queued (bounded by the exporter's timeout), off the loop.
        await asyncio.to_thread(self.tracing.shutdown)
        if self.engine is not None:
            self.engine.close()
