"""``dkv-gateway``: run one gateway (stateless; run as many as you like behind Envoy).

Flags in the style of ``dkv-node``; each is also an env var DKV_GATEWAY_<FLAG> (prefixed so it
does not clash with dkv-node's DKV_* in one environment). A flag on the command line wins.

Exit codes: 0 after a graceful shutdown (SIGTERM/SIGINT), 2 for a usage error, 1 when the
gateway refuses to start (e.g. a port in use). Every refusal is one line on stderr.
"""

from __future__ import annotations

import os

# gRPC core logs connection churn (nodes restarting) at INFO; keep the gateway's log readable.
# Must be set before grpc initialises, i.e. before the imports below load it.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

from dkv.cli.event_loop import check_event_loop
from dkv.cli.event_loop import run as run_event_loop
from dkv.cli.flags import (
    int_flag,
    metrics_address,
    shared_flags,
    tls_files,
    tracing_config,
)
from dkv.errors import DkvError, InvalidArgument
from dkv.host.rpc_server import finish_pending_tasks, with_port
from dkv.security.tokens import AUDIENCE, ISSUER
from dkv_gateway.server import GatewayConfig, GatewayServer, split_host_port

__all__ = ["ENV_PREFIX", "main", "parse_args"]

PROG = "dkv-gateway"
ENV_PREFIX = "DKV_GATEWAY_"
LOG_LEVELS = ("debug", "info", "warning", "error")

_DEFAULTS = GatewayConfig(membership=())


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``dkv-gateway: <reason>``), exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{PROG}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _env(flag: str, default: str | None = None) -> str | None:
    return os.environ.get(ENV_PREFIX + flag.upper().replace("-", "_"), default)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Run a dkv gateway: the public KV API, routed to each shard's leader, "
        "and the xDS server that configures Envoy. Every flag can also be set as "
        f"{ENV_PREFIX}<FLAG> (e.g. {ENV_PREFIX}MEMBERSHIP).",
    )

    def add(flag: str, help_: str, default: object = None) -> None:
        d = None if default is None else str(default)
        p.add_argument(f"--{flag}", default=_env(flag, d), help=help_)

    add("listen-client", "address for KV clients (and Envoy)", _DEFAULTS.listen_client)
    add("advertise-client", "address Envoy dials (default: --listen-client)")
    add("listen-xds", "address of the xDS (ADS) server for Envoy", _DEFAULTS.listen_xds)
    add("envoy-port", "the port Envoy's front door listens on", _DEFAULTS.envoy_port)
    add(
        "envoy-listen-host",
        "the address Envoy's front door listens on (0.0.0.0 in a Kubernetes pod)",
        _DEFAULTS.envoy_listen_host,
    )
    add(
        "listen-metrics",
        "address for /metrics, /livez and /readyz (HTTP); 'off' serves none",
        "127.0.0.1:2375",
    )
    for flag, help_, default in shared_flags(envoy=True):
        add(flag, help_, default)
    add("membership", "host:port,... of the membership service's client addresses (required)")
    add(
        "default-timeout-ms",
        "deadline of a call that carries none",
        _DEFAULTS.default_timeout_ms,
    )
    add(
        "max-value-bytes",
        "the nodes' --max-value-bytes: the largest request the gateway and Envoy let through "
        "follows from it",
        _DEFAULTS.value_bytes_max,
    )
    add(
        "cert-file",
        "TLS certificate: the gateway's KV port serves mTLS with it and presents it to "
        "nodes and membership",
    )
    add("key-file", "TLS key for --cert-file")
    add("trusted-ca-file", "CA that signs the certificates of Envoy, nodes and membership")
    add("envoy-cert-file", "Envoy's certificate (a path Envoy reads): its front door serves TLS")
    add("envoy-key-file", "Envoy's key (a path Envoy reads)")
    add("envoy-trusted-ca-file", "CA whose client certificates Envoy's front door accepts")
    add(
        "envoy-sds-dir",
        "a directory Envoy reads, where the gateway writes Envoy's SDS files naming the "
        "--envoy-* files: Envoy then reloads them when they change (without it, once at start)",
    )
    add(
        "envoy-jwks-file",
        "a JWKS file (a path Envoy reads): Envoy also takes bearer tokens signed by its keys "
        "as the identity of clients without a certificate (`dkv token`; docs/security.md)",
    )
    add("envoy-jwt-issuer", "the issuer (iss) of the bearer tokens Envoy takes", ISSUER)
    add("envoy-jwt-audience", "the audience (aud) the bearer tokens must name", AUDIENCE)
    add(
        "watches-per-caller-max",
        "watch streams one caller (certificate identity) may hold open at this gateway",
        _DEFAULTS.watches_per_caller_max,
    )
    add(
        "channels-per-node",
        "HTTP/2 connections the gateway keeps to each node (calls take them in turn)",
        _DEFAULTS.channels_per_node,
    )
    add("log-level", ", ".join(LOG_LEVELS), "info")
    return p


def _parse(argv: Sequence[str] | None) -> tuple[GatewayConfig, str, str]:
    p = _parser()
    args = p.parse_args(argv)
    level = str(args.log_level or "info").lower()
    if level not in LOG_LEVELS:
        p.error(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {args.log_level!r}")
    membership = tuple(a.strip() for a in (args.membership or "").split(",") if a.strip())
    if not membership:
        p.error("--membership is required (host:port,... of the membership service)")
    addresses = [("membership", a) for a in membership]
    addresses += [("listen-client", args.listen_client), ("listen-xds", args.listen_xds)]
    if args.advertise_client:
        addresses.append(("advertise-client", args.advertise_client))
    for flag, address in addresses:
        try:
            split_host_port(address)
        except InvalidArgument:
            p.error(f"--{flag} entry {address!r} is not host:port")
    tls = tls_files(args, "", p)
    envoy_tls = tls_files(args, "envoy_", p)
    if tls is not None and envoy_tls is None:
        p.error(
            "--cert-file makes the gateway's KV port require client certificates: give Envoy "
            "one with --envoy-cert-file, --envoy-key-file and --envoy-trusted-ca-file"
        )
    cfg = GatewayConfig(
        membership=membership,
        listen_client=args.listen_client,
        advertise_client=args.advertise_client or "",
        listen_xds=args.listen_xds,
        envoy_port=int_flag(p, "envoy-port", args.envoy_port, 1),
        envoy_listen_host=args.envoy_listen_host,
        tls=tls,
        envoy_tls=envoy_tls,
        envoy_sds_dir=os.path.abspath(args.envoy_sds_dir) if args.envoy_sds_dir else "",
        default_timeout_ms=int_flag(p, "default-timeout-ms", args.default_timeout_ms, 1),
        value_bytes_max=int_flag(p, "max-value-bytes", args.max_value_bytes, 1),
        listen_metrics=metrics_address(p, args.listen_metrics),
        tracing=tracing_config(p, args.otlp_endpoint, args.trace_sample_ratio),
        auth_policy_dir=args.auth_policy_dir or "",
        trust_domain=args.trust_domain,
        watches_per_caller_max=int_flag(
            p, "watches-per-caller-max", args.watches_per_caller_max, 1
        ),
        channels_per_node=int_flag(p, "channels-per-node", args.channels_per_node, 1),
        envoy_jwks_file=os.path.abspath(args.envoy_jwks_file) if args.envoy_jwks_file else "",
        envoy_jwt_issuer=args.envoy_jwt_issuer,
        envoy_jwt_audience=args.envoy_jwt_audience,
    )
    try:
        cfg.validate()  # a backstop: the checks above already name the flags
    except InvalidArgument as exc:
        p.error(str(exc))
    return cfg, level, check_event_loop(p, args.event_loop)


def parse_args(argv: Sequence[str] | None = None) -> GatewayConfig:
    """The gateway's configuration from ``argv`` and DKV_GATEWAY_* (exit 2 on misuse)."""
    return _parse(argv)[0]


async def _serve(cfg: GatewayConfig) -> None:
    server = GatewayServer(cfg)
    await server.start()  # a port in use is an InvalidArgument from dkv.host.rpc_server.bind
    print(
        f"{PROG} serving clients on {server.advertise_client}, "
        f"xDS on {with_port(cfg.listen_xds, server.xds_port)} "
        f"(Envoy front door on port {cfg.envoy_port}), "
        f"membership {','.join(cfg.membership)}"
        + (
            f", metrics on http://{with_port(cfg.listen_metrics, server.metrics_port)}/metrics"
            if cfg.listen_metrics
            else ""
        )
        + (
            f", traces to {cfg.tracing.otlp_endpoint} (ratio {cfg.tracing.sample_ratio:g})"
            if cfg.tracing.enabled
            else ""
        ),
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print(f"{PROG}: shutting down", flush=True)
    await server.stop()
    # As dkv-node: let grpc's per-call tasks (map watch, KV watch, xDS streams) end, or
    # asyncio.run cancels each with a CancelledError traceback in the log.
    await finish_pending_tasks()


def main(argv: Sequence[str] | None = None) -> int:
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
