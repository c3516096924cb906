"""``dkv-node``: run one storage node. Flags are etcd-style; each is also an env var DKV_*.

Exit codes: 0 after a graceful shutdown (SIGTERM/SIGINT), 2 for a usage error, 1 when the
node refuses to start (the reason is printed on one line).
"""

from __future__ import annotations

import os

# gRPC core logs connection churn (peers restarting) at INFO; keep the node's log readable.
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
from dkv.errors import DkvError
from dkv.host.rpc_server import finish_pending_tasks, with_port
from dkv_node.limits import Limits
from dkv_node.node import Node, NodeConfig

__all__ = ["main", "parse_args", "shards_banner"]

log = logging.getLogger("dkv.node")


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get("DKV_" + name.upper().replace("-", "_"), default)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dkv-node",
        description="Run a dkv storage node. Every flag can also be set as DKV_<FLAG> "
        "(e.g. DKV_DATA_DIR).",
    )

    def add(flag: str, help_: str, default: str | None = None, **kw: object) -> None:
        p.add_argument(f"--{flag}", default=_env(flag, default), help=help_, **kw)  # type: ignore[arg-type]

    add("name", "this member's name (must appear in --initial-cluster)")
    add("data-dir", "directory for this member's RocksDB (default: <name>.dkv)")
    add("listen-peer", "address for Raft traffic from peers", "127.0.0.1:2380")
    add("listen-client", "address for clients", "127.0.0.1:2379")
    add(
        "listen-metrics",
        "address for /metrics, /livez and /readyz (HTTP); 'off' serves none",
        "127.0.0.1:2381",
    )
    for flag, help_, default in shared_flags():
        add(flag, help_, default)
    add("advertise-peer", "peer address announced to others (default: --listen-peer)")
    add("advertise-client", "client address announced to others (default: --listen-client)")
    add(
        "initial-cluster",
        "name=peer-address,... of the initial members (static placement: every member hosts "
        "every shard); omit it with --membership to let the membership service place shards",
    )
    add("initial-cluster-state", "new (bootstrap) or existing (restart/join)", "new")
    add(
        "initial-cluster-token",
        "cluster identity; data of another cluster is refused",
        "dkv-cluster",
    )
    add("shards", "number of shards (Raft groups), fixed at creation", "1")
    add("max-value-bytes", "largest value accepted", str(1 << 20))
    add("tick-interval-ms", "Raft tick", "100")
    add("election-timeout-ticks", "Raft election timeout in ticks", "10")
    add("snapshot-count", "applied entries between snapshots (then the log is compacted)", "10000")
    add(
        "snapshot-catchup-entries",
        "entries kept behind a snapshot so slow followers catch up from the log",
        "1000",
    )
    add(
        "membership",
        "host:port,... of the membership service's client addresses (register and heartbeat)",
    )
    add("heartbeat-interval-ms", "interval between heartbeats to membership", "1000")
    for prefix, what in (("peer-", "peer"), ("", "client")):
        add(f"{prefix}cert-file", f"TLS certificate for {what} traffic")
        add(f"{prefix}key-file", f"TLS key for {what} traffic")
        add(f"{prefix}trusted-ca-file", f"CA that signs {what} certificates (enables mTLS)")
    add("log-level", "debug, info, warning", "info")
    return p


def parse_args(argv: Sequence[str] | None = None) -> NodeConfig:
    return _parse(argv)[0]


def _parse(argv: Sequence[str] | None) -> tuple[NodeConfig, str, str]:
    """The node's configuration, the log level and the event loop (exit 2 on misuse)."""
    p = _parser()
    args = p.parse_args(argv)
    level = str(args.log_level or "info")
    if level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        p.error(f"--log-level must be debug, info, warning or error, not {level!r}")
    if args.membership and not args.initial_cluster:
        # Managed: the membership service places shards on this node (dkv_node.hosting).
        if not args.name:
            p.error("--name is required")
        cluster: dict[str, str] = {}
    else:
        cluster = membership_flags(args, p)
    shards = int_flag(p, "shards", args.shards)
    if not 1 <= shards <= 1024:
        p.error("--shards must be between 1 and 1024")
    membership: list[str] = []
    for item in (args.membership or "").split(","):
        addr = item.strip()
        if not addr:
            continue
        host, sep, port = addr.rpartition(":")
        if not sep or not host or not port.isdigit():
            p.error(f"--membership entry {addr!r} is not host:port")
        membership.append(addr)
    cfg = NodeConfig(
        name=args.name,
        data_dir=Path(args.data_dir or f"{args.name}.dkv"),
        listen_peer=args.listen_peer,
        listen_client=args.listen_client,
        initial_cluster=cluster,
        initial_cluster_state=args.initial_cluster_state,
        advertise_peer=args.advertise_peer or "",
        advertise_client=args.advertise_client or "",
        cluster_token=args.initial_cluster_token,
        shards=shards,
        peer_tls=tls_files(args, "peer_", p),
        client_tls=tls_files(args, "", p),
        limits=Limits(value_bytes_max=int_flag(p, "max-value-bytes", args.max_value_bytes)),
        tick_interval_ms=int_flag(p, "tick-interval-ms", args.tick_interval_ms),
        election_timeout_ticks=int_flag(p, "election-timeout-ticks", args.election_timeout_ticks),
        snapshot_count=int_flag(p, "snapshot-count", args.snapshot_count),
        snapshot_catchup_entries=int_flag(
            p, "snapshot-catchup-entries", args.snapshot_catchup_entries
        ),
        membership=tuple(membership),
        heartbeat_interval_ms=int_flag(
            p, "heartbeat-interval-ms", args.heartbeat_interval_ms, minimum=1
        ),
        listen_metrics=metrics_address(p, args.listen_metrics),
        tracing=tracing_config(p, args.otlp_endpoint, args.trace_sample_ratio),
        auth_policy_dir=args.auth_policy_dir or "",
        trust_domain=args.trust_domain,
    )
    return cfg, level, check_event_loop(p, args.event_loop)


def metrics_banner(node: Node) -> str:
    if not node.cfg.listen_metrics:
        return ""
    return f"metrics on http://{with_port(node.cfg.listen_metrics, node.metrics_port)}/metrics, "


def shards_banner(node: Node) -> str:
    """What the start line says about shards: with --initial-cluster every member hosts all
    of them; under membership, what is hosted now (from disk on a restart) and of how many,
    or that membership has not placed any yet (a new node learns it from the cluster map)."""
    if not node.cfg.managed:
        return f"{node.cfg.shards} shard(s)"
    hosted, count = len(node.shards), node.shard_count()
    if count == 0:
        return "shards placed by membership (none yet: waiting for the cluster map)"
    return f"{hosted} of {count} shard(s) hosted, placed by membership"


async def _serve(cfg: NodeConfig) -> None:
    # Before anything is announced: a supervisor may signal as soon as it reads the start
    # line, and a signal during start stops the node right after it (not the default action,
    # which kills it without a graceful stop).
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    node = Node(cfg)
    await node.start()
    print(
        f"dkv-node {cfg.name} (id {node.id:x}) serving clients on "
        f"{with_port(cfg.listen_client, node.client_port)}, "
        f"peers on {with_port(cfg.listen_peer, node.peer_port)}, {metrics_banner(node)}"
        f"{shards_banner(node)}",
        flush=True,
    )
    await stop.wait()
    print(f"dkv-node {cfg.name}: shutting down", flush=True)
    await node.stop()
    # grpc's per-call tasks end a few loop iterations after the servers stopped; cancelled by
    # asyncio.run instead, each would log a CancelledError traceback (see the function).
    left = await finish_pending_tasks()
    if left:
        log.debug("%d task(s) still running at exit: %s", len(left), left)


def main(argv: Sequence[str] | None = None) -> int:
    limit_malloc_arenas()  # before any thread starts (dkv.cli.malloc)
    cfg, level, event_loop = _parse(argv)
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        run_event_loop(_serve(cfg), event_loop)
    except DkvError as exc:
        print(f"dkv-node: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
