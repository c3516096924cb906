"""One membership replica assembled from its configuration (DESIGN.md "membership").

The same parts as a storage node (``dkv_node.node``), with one Raft group:

- its own RocksDB (:class:`dkv.storage.Engine`; the data dir belongs to (cluster token, name)
  and a mismatch refuses to start);
- a :class:`~dkv.host.peer_transport.PeerTransport` to the other replicas (peer mTLS
  optional) and its listener on the peer port;
- a :class:`Host` with ONE group, :data:`~dkv_membership.service.MEMBERSHIP_GROUP_ID` (1),
  whose state machine is :class:`MembershipStateMachine` (in memory; the host rebuilds it from
  the latest snapshot plus the log after it at every start);
- the ``dkv.v1.Membership`` service and gRPC health on the client port;
- optionally the leader's down detector (``down_after_ms`` > 0).

Replica ids are derived from the cluster token and the replica's name, as for storage nodes
(:func:`dkv.host.members.member_id`), so every replica computes the same ids from the same
``initial_cluster``. Replicas learn each other's client addresses from the hello of the Raft
stream (:mod:`dkv.host.members`), which is what followers put into NOT_LEADER answers.

The first replicas come from ``initial_cluster``; more are added (and removed) at run time with
``AddReplica`` / ``RemoveReplica`` (:mod:`dkv_membership.replicas`): start the new replica with
``initial_cluster_state="existing"`` and an empty data dir, then add it.
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
from dkv.security.rules import membership_client_rules, membership_peer_rules
from dkv.sharding import SLOT_COUNT
from dkv.storage import Batch, Engine, Identity
from dkv.telemetry import ProcessMetrics
from dkv.telemetry.http import MetricsServer
from dkv.telemetry.peer_metrics import PeerMetrics
from dkv.telemetry.raft_metrics import DiskMetrics, RaftCollector
from dkv.telemetry.tracing import Tracing, TracingConfig
from dkv_membership.driver import DriverConfig, PlacementDriver
from dkv_membership.metrics import MembershipCollector
from dkv_membership.replicas import ReplicaAdmin, add_replica_admin
from dkv_membership.service import (
    MEMBERSHIP_GROUP_ID,
    Clock,
    MembershipService,
    add_membership_service,
    wall_clock_ms,
)
from dkv_membership.state import CHANGE_LOG_MAX, MembershipStateMachine

__all__ = ["MembershipConfig", "MembershipServer"]

log = logging.getLogger("dkv.membership")


@dataclass(frozen=True)
class MembershipConfig:
    name: str
    data_dir: Path
    listen_peer: str
    listen_client: str
    initial_cluster: dict[str, str]  # replica name -> advertised peer address
    # "new": bootstrap the group (ignored once the data dir holds it); "existing": restart.
    initial_cluster_state: str = "new"
    advertise_peer: str = ""  # default: the listen address (with the bound port)
    advertise_client: str = ""
    cluster_token: str = "dkv-membership"
    peer_tls: TlsFiles | None = None
    client_tls: TlsFiles | None = None
    tick_interval_ms: int = 100
    election_timeout_ticks: int = 10
    snapshot_count: int = 10_000  # applied entries between snapshots
    snapshot_catchup_entries: int = 1_000  # entries kept behind a snapshot for slow followers
    change_log_max: int = CHANGE_LOG_MAX  # versions a resumed watch can be served deltas for
    # The leader marks a node DOWN after this long without a heartbeat; 0 turns it off.
    down_after_ms: int = 0
    down_check_interval_ms: int = 1_000
    # The leader's placement driver (dkv_membership.driver): initializes the cluster with
    # ``shard_count`` shards once ``min_nodes`` nodes are UP and moves replicas; None: off.
    driver: DriverConfig | None = None
    # host:port of /metrics, /livez and /readyz; "" serves none (the CLI's default is on).
    listen_metrics: str = ""
    # OpenTelemetry traces (cluster operations; heartbeats never); off without an endpoint.
    tracing: TracingConfig = field(default_factory=TracingConfig)
    # model.conf and policy.csv (dkv.security.authz): which users are admins (cluster
    # operations). "": users are not checked; components always are (mTLS).
    auth_policy_dir: str = ""
    # The SPIFFE trust domain of every identity this process accepts (spiffe://DOMAIN/...).
    trust_domain: str = TRUST_DOMAIN

    def validate(self) -> None:
        self.tracing.validate()
        check_trust_domain(self.trust_domain)
        if self.name not in self.initial_cluster:
            raise InvalidArgument(
                f"--name {self.name!r} is not in --initial-cluster "
                f"({', '.join(sorted(self.initial_cluster)) or 'empty'})"
            )
        if self.initial_cluster_state not in ("new", "existing"):
            raise InvalidArgument("--initial-cluster-state must be 'new' or 'existing'")
        if self.tick_interval_ms < 1 or self.election_timeout_ticks < 2:
            raise InvalidArgument("--tick-interval-ms must be >= 1, --election-timeout-ticks >= 2")
        if self.snapshot_count < 1 or self.snapshot_catchup_entries < 0:
            raise InvalidArgument(
                "--snapshot-count must be >= 1 and --snapshot-catchup-entries >= 0"
            )
        if self.change_log_max < 1:
            raise InvalidArgument("--change-log-max must be >= 1")
        if self.down_after_ms < 0 or self.down_check_interval_ms < 1:
            raise InvalidArgument("--down-after-ms must be >= 0, --down-check-interval-ms >= 1")
        d = self.driver
        if d is not None:
            if not 1 <= d.shard_count <= SLOT_COUNT:
                raise InvalidArgument(f"--shards must be between 1 and {SLOT_COUNT}")
            if d.replication < 1 or d.min_nodes < 0:
                raise InvalidArgument("--replication-factor must be >= 1, --min-nodes >= 0")
            if d.interval_ms < 1 or d.moves_max < 1:
                raise InvalidArgument("--placement-interval-ms and --moves-max must be >= 1")


class MembershipServer:
    """See the module docstring. ``clock`` (unix ms) is the leader's proposal-time clock."""

    def __init__(
        self,
        cfg: MembershipConfig,
        clock: Clock = wall_clock_ms,
        tracing: Tracing | None = None,
    ) -> None:
        cfg.validate()
        self.cfg = cfg
        self.tracing = tracing or Tracing.create(cfg.tracing, "dkv-membership", cfg.name)
        self.clock = clock
        self.id = member_id(cfg.cluster_token, cfg.name)
        self.engine: Engine | None = None
        self.transport: PeerTransport | None = None
        self.registry: MemberRegistry | None = None
        self.host: Host | None = None
        self.sm: MembershipStateMachine | None = None
        self.service: MembershipService | None = None
        self.peer_listener: PeerListener | None = None
        self.client_server: grpc.aio.Server | None = None
        self.health: health.HealthServicer | None = None
        self._down_task: asyncio.Task[None] | None = None
        self.driver: PlacementDriver | None = None
        self._driver_task: asyncio.Task[None] | None = None
        # The driver's Admin calls to storage nodes, with this replica's client certificate
        # when clients use mTLS.
        self._node_channels = ChannelPool(cfg.client_tls)
        self.metrics = ProcessMetrics.create()  # one registry per replica instance
        self.access = ProcessAccess(cfg.auth_policy_dir, self.metrics.registry, cfg.trust_domain)
        self.metrics_server: MetricsServer | None = None
        self.peer_port = 0
        self.client_port = 0
        self.metrics_port = 0

    def member_id_of(self, name: str) -> int:
        return member_id(self.cfg.cluster_token, name)

    async def start(self) -> None:
        cfg = self.cfg
        # "existing" with an empty data dir: a replica joining a running group (added with
        # AddReplica); it learns the map from the leader's snapshot.
        joining = (
            cfg.initial_cluster_state == "existing" and not (cfg.data_dir / "CURRENT").is_file()
        )
        if joining:
            log.info("%s: joining the membership group with an empty data dir", cfg.name)
        self.engine = Engine.open(
            cfg.data_dir,
            Identity(cluster_id=cfg.cluster_token, node_name=cfg.name),
            create=cfg.initial_cluster_state == "new" or joining,
        )
        try:
            await self._assemble()
        except BaseException:
            await self.stop(grace_s=0)
            raise

    async def _assemble(self) -> None:
        cfg = self.cfg
        assert self.engine is not None
        # With --listen-metrics off nothing is recorded on the hot paths either.
        recording = bool(cfg.listen_metrics)
        grpc_metrics = self.metrics.grpc_server if recording else None
        # Bind first, so that port 0 works and what we advertise is where we listen.
        self.peer_listener = PeerListener(
            cfg.cluster_token,
            tls=cfg.peer_tls,
            access=self.access.access(
                "membership's peer port", membership_peer_rules(), tls=cfg.peer_tls is not None
            ),
            name="membership's peer port",
        )
        self.peer_port = await self.peer_listener.listen(cfg.listen_peer)
        self.client_server = new_server(
            metrics=grpc_metrics,
            tracer=self.tracing.tracer,
            access=self.access.access(
                "membership", membership_client_rules(), tls=cfg.client_tls is not None
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
        registry = MemberRegistry(
            self.engine,
            me,
            transport.set_peer,
        )
        self.registry = registry
        for n, addr in cfg.initial_cluster.items():
            registry.seed(Member(self.member_id_of(n), n, addr))
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
        self.sm = sm = MembershipStateMachine(cfg.change_log_max)
        MembershipCollector(
            lambda: sm.state,  # restore() replaces the state object: read it each scrape
            lambda: self.driver,
            (cfg.driver or DriverConfig()).replication,
            self.metrics.registry,
        )
        voters = ConfState.of([self.member_id_of(n) for n in cfg.initial_cluster])
        self.host.add_group(
            MEMBERSHIP_GROUP_ID, self.sm, voters if cfg.initial_cluster_state == "new" else None
        )

        def leader_info(mid: int) -> tuple[str, str]:
            return registry.name(mid), registry.client_address(mid)

        self.service = MembershipService(
            self.host, self.sm, MEMBERSHIP_GROUP_ID, leader_info, self.clock
        )
        add_membership_service(self.client_server, self.service)
        add_replica_admin(
            self.client_server,
            ReplicaAdmin(self.host, MEMBERSHIP_GROUP_ID, registry, self.member_id_of, leader_info),
        )
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.client_server)
        await self.host.start()
        await self.client_server.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        if cfg.down_after_ms > 0:
            self._down_task = asyncio.get_running_loop().create_task(
                self.service.run_down_detector(cfg.down_after_ms, cfg.down_check_interval_ms / 1000)
            )
        if cfg.driver is not None:
            self.driver = PlacementDriver(self.service, cfg.driver, self._node_channels.get)
            self._driver_task = asyncio.get_running_loop().create_task(
                self.driver.run(self.service.closing)
            )
        log.info("%s: membership replica %d serving on %s", cfg.name, self.id, advertise_client)

    def readiness(self) -> tuple[bool, str]:
        """``/readyz``: the replica can serve when its group has a leader (reads and writes
        reach it; a follower forwards or names it)."""
        host = self.host
        if host is None or not host.running:
            return False, "starting"
        leader = host.leader(MEMBERSHIP_GROUP_ID)
        if leader == 0:
            return False, "the membership group has no known leader"
        return True, f"ok: leader {leader:x}"

    def _on_conf_change(self, gid: int, cc: ConfChange, cs: ConfState, batch: Batch) -> None:
        """A replica added by AddReplica: remember where it is (the change carries it)."""
        m = decode_context(cc.node_id, cc.context)
        if m is not None and self.registry is not None:
            self.registry.learn(m, batch)
        if cc.type is ConfChangeType.REMOVE_NODE and cc.node_id == self.id:
            log.warning("%s: removed from the membership group", self.cfg.name)

    def _on_hello(self, hello: dict[str, str]) -> None:
        """A replica opened its Raft stream and said who it is (see dkv.host.members)."""
        member = member_from_hello(hello, self.cfg.cluster_token)
        if member is not None and self.registry is not None:
            self.registry.learn(member)

    async def stop(self, grace_s: float = 2.0) -> None:
        """Graceful: watches end (status OK; clients resume elsewhere), in-flight calls finish,
        then Raft stops."""
        if self.health is not None:
            self.health.enter_graceful_shutdown()
        if self.service is not None:
            self.service.close()
        for task in (self._down_task, self._driver_task):
            if task is not None:
                await asyncio.gather(task, return_exceptions=True)
        self._down_task = self._driver_task = None
        await self.access.stop()
        await self._node_channels.close()
        if self.client_server is not None:
            await self.client_server.stop(grace_s)
        if self.host is not None:
            await self.host.stop()
        if self.peer_listener is not None:
            await self.peer_listener.close()  # closed with the transport, unless start failed
        if self.metrics_server is not None:
            await self.metrics_server.stop()
            self.metrics_server = None
        await asyncio.to_thread(self.tracing.shutdown)  # export what is queued, off the loop
        if self.engine is not None:
            self.engine.close()
