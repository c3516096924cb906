"""``dkv-membership``: run one membership replica. Flags are etcd-style, as for ``dkv-node``;
each is also an env var DKV_MEMBERSHIP_* (prefixed so that it does not clash with dkv-node's
DKV_* when both run in one environment).

Exit codes: 0 after a graceful shutdown (SIGTERM/SIGINT), 2 for a usage error (naming the
flag), 1 when the replica refuses to start (the reason is printed on one line).
"""

from __future__ import annotations

import os

# gRPC core logs connection churn (peers restarting) at INFO; keep the replica's log readable.
# Must be set before grpc initialises, i.e. before the imports below load it.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from dkv.cli.event_loop import check_event_loop
from dkv.cli.event_loop import run as run_event_loop
from dkv.cli.flags import (
    int_flag,
    membership_flags,
    metrics_address,
    shared_flags,
    tls_files,
    tracing_config,
)
from dkv.cli.malloc import limit_malloc_arenas
from dkv.errors import DkvError, InvalidArgument
from dkv.host.rpc_server import finish_pending_tasks, with_port
from dkv_membership.driver import DriverConfig
from dkv_membership.server import MembershipConfig, MembershipServer
from dkv_membership.state import CHANGE_LOG_MAX

__all__ = ["ENV_PREFIX", "main", "parse_args"]

PROG = "dkv-membership"
ENV_PREFIX = "DKV_MEMBERSHIP_"
LOG_LEVELS = ("debug", "info", "warning", "error")

# MembershipConfig's defaults, shown in --help (a placeholder config, never started).
_DRIVER = DriverConfig()
# The process turns down detection on (10 heartbeats of a node at the default 1 s interval);
# MembershipConfig keeps it off for embedders and tests that drive it themselves.
DOWN_AFTER_MS_DEFAULT = 10_000
_DEFAULTS = MembershipConfig(
    name="", data_dir=Path(), listen_peer="", listen_client="", initial_cluster={}
)


def _env(flag: str, default: str | None = None) -> str | None:
    return os.environ.get(ENV_PREFIX + flag.upper().replace("-", "_"), default)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Run a dkv membership replica. Every flag can also be set as "
        f"{ENV_PREFIX}<FLAG> (e.g. {ENV_PREFIX}DATA_DIR); the prefix keeps these apart from "
        "dkv-node's DKV_* variables. A flag on the command line wins over its variable.",
    )

    def add(flag: str, help_: str, default: object = None) -> None:
        d = None if default is None else str(default)
        p.add_argument(f"--{flag}", default=_env(flag, d), help=help_)

    add("name", "this replica's name (must appear in --initial-cluster)")
    add("data-dir", "directory for this replica's RocksDB (default: <name>.dkv-membership)")
    add("listen-peer", "address for Raft traffic from the other replicas", "127.0.0.1:2480")
    add("listen-client", "address for clients (nodes, gateways, dkvctl)", "127.0.0.1:2479")
    add(
        "listen-metrics",
        "address for /metrics, /livez and /readyz (HTTP); 'off' serves none",
        "127.0.0.1:2481",
    )
    for flag, help_, default in shared_flags():
        add(flag, help_, default)
    add("advertise-peer", "peer address announced to others (default: --listen-peer)")
    add("advertise-client", "client address announced to others (default: --listen-client)")
    add("initial-cluster", "name=peer-address,... of the membership replicas")
    add("initial-cluster-state", "new (bootstrap) or existing (restart)", "new")
    add(
        "initial-cluster-token",
        "cluster identity; data of another cluster is refused",
        _DEFAULTS.cluster_token,
    )
    add("tick-interval-ms", "Raft tick", _DEFAULTS.tick_interval_ms)
    add(
        "election-timeout-ticks", "Raft election timeout in ticks", _DEFAULTS.election_timeout_ticks
    )
    add(
        "snapshot-count",
        "applied entries between snapshots (then the log is compacted)",
        _DEFAULTS.snapshot_count,
    )
    add(
        "snapshot-catchup-entries",
        "entries kept behind a snapshot so slow followers catch up from the log",
        _DEFAULTS.snapshot_catchup_entries,
    )
    add(
        "change-log-max",
        "map versions a resumed watch can be served as deltas",
        CHANGE_LOG_MAX,
    )
    add(
        "down-after-ms",
        "the leader marks a node DOWN after this long without a heartbeat; 0 turns it off",
        DOWN_AFTER_MS_DEFAULT,
    )
    add(
        "down-check-interval-ms",
        "how often the leader looks for nodes to mark DOWN",
        _DEFAULTS.down_check_interval_ms,
    )
    add("shards", "shards created when the cluster is initialized (fixed)", _DRIVER.shard_count)
    add("replication-factor", "replicas per shard", _DRIVER.replication)
    add(
        "min-nodes",
        "nodes that must be UP before the cluster is initialized (0: --replication-factor)",
        _DRIVER.min_nodes,
    )
    add("placement-interval-ms", "how often the leader checks placement", _DRIVER.interval_ms)
    add("moves-max", "shards whose replicas move at the same time", _DRIVER.moves_max)
    add(
        "replace-down-after-ms",
        "a node DOWN this long gets its replicas re-created on other nodes; 0: never",
        _DRIVER.replace_down_after_ms,
    )
    add("placement", "on: initialize the cluster and move replicas; off: never", "on")
    for prefix, what in (("peer-", "peer"), ("", "client")):
        add(f"{prefix}cert-file", f"TLS certificate for {what} traffic")
        add(f"{prefix}key-file", f"TLS key for {what} traffic")
        add(f"{prefix}trusted-ca-file", f"CA that signs {what} certificates (enables mTLS)")
    add("log-level", ", ".join(LOG_LEVELS), "info")
    return p


def _driver(args: argparse.Namespace, p: argparse.ArgumentParser) -> DriverConfig | None:
    if args.placement not in ("on", "off"):
        p.error(f"--placement must be on or off, got {args.placement!r}")
    cfg = DriverConfig(
        shard_count=int_flag(p, "shards", args.shards, 1),
        replication=int_flag(p, "replication-factor", args.replication_factor, 1),
        min_nodes=int_flag(p, "min-nodes", args.min_nodes, 0),
        interval_ms=int_flag(p, "placement-interval-ms", args.placement_interval_ms, 1),
        moves_max=int_flag(p, "moves-max", args.moves_max, 1),
        replace_down_after_ms=int_flag(p, "replace-down-after-ms", args.replace_down_after_ms, 0),
    )
    return None if args.placement == "off" else cfg


def _parse(argv: Sequence[str] | None) -> tuple[MembershipConfig, str, str]:
    p = _parser()
    args = p.parse_args(argv)
    cluster = membership_flags(args, p)
    if not args.initial_cluster_token:
        p.error("--initial-cluster-token must not be empty")
    if args.log_level.lower() not in LOG_LEVELS:
        p.error(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {args.log_level!r}")
    cfg = MembershipConfig(
        name=args.name,
        data_dir=Path(args.data_dir or f"{args.name}.dkv-membership"),
        listen_peer=args.listen_peer,
        listen_client=args.listen_client,
        initial_cluster=cluster,
        initial_cluster_state=args.initial_cluster_state,
        advertise_peer=args.advertise_peer or "",
        advertise_client=args.advertise_client or "",
        cluster_token=args.initial_cluster_token,
        peer_tls=tls_files(args, "peer_", p),
        client_tls=tls_files(args, "", p),
        tick_interval_ms=int_flag(p, "tick-interval-ms", args.tick_interval_ms, 1),
        election_timeout_ticks=int_flag(
            p, "election-timeout-ticks", args.election_timeout_ticks, 2
        ),
        snapshot_count=int_flag(p, "snapshot-count", args.snapshot_count, 1),
        snapshot_catchup_entries=int_flag(
            p, "snapshot-catchup-entries", args.snapshot_catchup_entries, 0
        ),
        change_log_max=int_flag(p, "change-log-max", args.change_log_max, 1),
        down_after_ms=int_flag(p, "down-after-ms", args.down_after_ms, 0),
        down_check_interval_ms=int_flag(
            p, "down-check-interval-ms", args.down_check_interval_ms, 1
        ),
        driver=_driver(args, p),
        listen_metrics=metrics_address(p, args.listen_metrics),
        tracing=tracing_config(p, args.otlp_endpoint, args.trace_sample_ratio),
        auth_policy_dir=args.auth_policy_dir or "",
        trust_domain=args.trust_domain,
    )
    try:
        cfg.validate()  # a backstop: the checks above already name the flags
    except InvalidArgument as exc:
        p.error(str(exc))
    return cfg, args.log_level.lower(), check_event_loop(p, args.event_loop)


def parse_args(argv: Sequence[str] | None = None) -> MembershipConfig:
    """The replica's configuration from ``argv`` and DKV_MEMBERSHIP_* (exit 2 on misuse)."""
    return _parse(argv)[0]


async def _serve(cfg: MembershipConfig) -> None:
    server = MembershipServer(cfg)
    await server.start()  # a port in use is an InvalidArgument from dkv.host.rpc_server.bind
    print(
        f"{PROG} {cfg.name} (id {server.id:x}) serving clients on "
        f"{with_port(cfg.listen_client, server.client_port)}, "
        f"peers on {with_port(cfg.listen_peer, server.peer_port)}"
        + (
            f", metrics on http://{with_port(cfg.listen_metrics, server.metrics_port)}/metrics"
            if cfg.listen_metrics
            else ""
        ),
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print(f"{PROG} {cfg.name}: shutting down", flush=True)
    await server.stop()
    # As dkv-node: let grpc's per-call tasks (map watch, KV watch, xDS streams) end, or
    # asyncio.run cancels each with a CancelledError traceback in the log.
    await finish_pending_tasks()


def main(argv: Sequence[str] | None = None) -> int:
    limit_malloc_arenas()  # before any thread starts (dkv.cli.malloc)
    cfg, level, event_loop = _parse(argv)
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        run_event_loop(_serve(cfg), event_loop)
    except DkvError as exc:
        print(f"{PROG}: {' '.join(str(exc).splitlines())}", file=sys.stderr)  # one line
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
