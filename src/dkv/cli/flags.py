"""Flag parsing shared by the server processes (``dkv-node``, ``dkv-membership``).

Each helper reports a bad value through ``parser.error`` (usage error, exit code 2, naming the
flag), so every process refuses bad flags the same way.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dkv.cli.event_loop import EVENT_LOOP_HELP
from dkv.errors import InvalidArgument
from dkv.host.channels import TlsFiles
from dkv.telemetry.http import parse_listen
from dkv.telemetry.tracing import OTLP_ENDPOINT_ENV, SAMPLE_RATIO_ENV, TracingConfig

__all__ = [
    "OTLP_ENDPOINT_HELP",
    "SAMPLE_RATIO_HELP",
    "int_flag",
    "membership_flags",
    "shared_flags",
    "tls_files",
    "tracing_config",
]

OTLP_ENDPOINT_HELP = (
    "OTLP/gRPC receiver for traces (http://host:port, https:// for TLS); traces are off "
    f"without it (default: ${OTLP_ENDPOINT_ENV})"
)
SAMPLE_RATIO_HELP = (
    "share of requests without a sampled parent that are traced, 0..1 (sampler "
    f"parentbased_traceidratio; default: ${SAMPLE_RATIO_ENV}, else 1.0)"
)


def shared_flags(envoy: bool = False) -> list[tuple[str, str, str | None]]:
    """``(flag, help, default)`` of the tracing and access flags every server process takes
    (``envoy``: the gateway, whose Envoy follows its tracing flags)."""
    also = "; Envoy exports its spans there too" if envoy else ""
    same = "; Envoy samples at the same ratio" if envoy else ""
    return [
        ("otlp-endpoint", OTLP_ENDPOINT_HELP + also, None),
        ("trace-sample-ratio", SAMPLE_RATIO_HELP + same, None),
        (
            "trust-domain",
            "the SPIFFE trust domain of the identities in client certificates "
            "(spiffe://DOMAIN/...)",
            "dkv",
        ),
        ("event-loop", EVENT_LOOP_HELP, None),
        (
            "auth-policy-dir",
            "directory with model.conf and policy.csv (Casbin), reloaded when they change: "
            "who may read, write and administer which keys. Without it users are not checked "
            "(components always are, over mTLS)",
            None,
        ),
    ]


def tls_files(args: argparse.Namespace, prefix: str, p: argparse.ArgumentParser) -> TlsFiles | None:
    """``--<prefix>cert-file/key-file/trusted-ca-file``: all three or none, files must exist."""
    files = [getattr(args, f"{prefix}{k}") for k in ("cert_file", "key_file", "trusted_ca_file")]
    if not any(files):
        return None
    flag = prefix.replace("_", "-")
    if not all(files):
        p.error(f"--{flag}cert-file, --{flag}key-file and --{flag}trusted-ca-file go together")
    for k, f in zip(("cert-file", "key-file", "trusted-ca-file"), files, strict=True):
        if not Path(f).is_file():
            p.error(f"--{flag}{k}: TLS file {f} does not exist")
    return TlsFiles(files[0], files[1], files[2])


def int_flag(p: argparse.ArgumentParser, flag: str, value: str, minimum: int | None = None) -> int:
    try:
        n = int(value)
    except ValueError:
        p.error(f"--{flag} must be an integer, got {value!r}")
    if minimum is not None and n < minimum:
        p.error(f"--{flag} must be >= {minimum}, got {n}")
    return n


def membership_flags(args: argparse.Namespace, p: argparse.ArgumentParser) -> dict[str, str]:
    """Check ``--name``, ``--initial-cluster`` (name=host:port,...) and
    ``--initial-cluster-state``; return the initial cluster as {name: peer address}."""
    if not args.name:
        p.error("--name is required")
    if not args.initial_cluster:
        p.error("--initial-cluster is required (name=peer-address,...)")
    cluster: dict[str, str] = {}
    for item in args.initial_cluster.split(","):
        name, sep, addr = item.strip().partition("=")
        if not sep or not name or ":" not in addr:
            p.error(f"--initial-cluster entry {item!r} is not name=host:port")
        if name in cluster:
            p.error(f"--initial-cluster names {name!r} twice")
        cluster[name] = addr
    if args.name not in cluster:
        p.error(f"--name {args.name!r} is not in --initial-cluster ({', '.join(cluster)})")
    if args.initial_cluster_state not in ("new", "existing"):
        p.error("--initial-cluster-state must be 'new' or 'existing'")
    return cluster


def metrics_address(p: argparse.ArgumentParser, value: str | None) -> str:
    """``--listen-metrics`` checked (``host:port``, or ``off``); "" when off."""
    try:
        listen = parse_listen(value or "")
    except InvalidArgument as exc:
        p.error(str(exc))
    return "" if listen is None else str(value).strip()


def tracing_config(
    p: argparse.ArgumentParser, endpoint: str | None, ratio: str | None
) -> TracingConfig:
    """``--otlp-endpoint`` and ``--trace-sample-ratio`` checked (None: the OTEL_* variable)."""
    try:
        return TracingConfig.from_flags(endpoint, ratio)
    except InvalidArgument as exc:
        p.error(f"--otlp-endpoint/--trace-sample-ratio: {exc}")
