"""Real ``dkv-node`` processes on 127.0.0.1 for fault-injection tests, and clients that record
what they saw for the linearizability checker.

The pieces, from the bottom up:

* :class:`NodeProcess` -- one ``dkv-node`` subprocess. Its stderr and stdout go to a log file
  (stdout is drained by a thread, never left in a pipe nobody reads); readiness is the
  ``serving clients`` line the node prints once it serves (an event, not a sleep). Faults:
  :meth:`~NodeProcess.kill9`, :meth:`~NodeProcess.stop` (SIGTERM, returns the exit code),
  :meth:`~NodeProcess.pause` / :meth:`~NodeProcess.resume` (SIGSTOP / SIGCONT),
  :meth:`~NodeProcess.restart`. Every exit is reaped and every pipe closed.
* :class:`Cluster` -- N nodes with free ports, data under one directory, peer mTLS from a
  development PKI. A context manager: leaving it kills (by PID) every process it started, also
  when the test failed.
* :class:`ClusterClient` -- raw gRPC (``grpc.aio``) access to the cluster's nodes, created
  inside the running event loop: writes carry a request id and are retried with the SAME id
  on UNAVAILABLE / DEADLINE_EXCEEDED at any node (following the ``dkv-leader-id`` hint of
  NOT_LEADER answers) until an overall deadline; per-attempt timeouts keep a paused node from
  swallowing the whole budget. Also: each node's Admin ``Status``, the current leader of a
  shard, and waiting until every node holds the same data.
* :class:`History` and :class:`Workload` -- concurrent workers doing random put/get on a small
  key set with unique values, recording :class:`~dkv.testing.linearizability.Operation`\\ s in
  the shapes :func:`~dkv.testing.models.kv_model` expects, plus every acknowledged write
  (key, value, revision) so that a lost one can be named.
* :class:`WatchRecorder` -- a watch that, like a client, resumes at another node from the
  revision after the last one it saw when its node dies, and records what it was delivered.
* :func:`check` -- the linearizability verdict as an assertion (``UNKNOWN``, a checker timeout,
  is a failure too), and :func:`lost_writes` for acknowledged writes missing at the end.

Histories use ``time.monotonic`` for call and return times; a write whose outcome stayed
unknown is recorded with return time ``math.inf`` and
:data:`~dkv.testing.linearizability.UNKNOWN_OUTPUT`; a read that failed is dropped.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Final, Protocol, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import Message as ProtoMessage

from dkv.host.members import member_id
from dkv.security import PkiLayout, write_dev_pki
from dkv.sharding import shard_for_key
from dkv.testing.linearizability import (
    CheckResult,
    LinearizabilityResult,
    Operation,
    check_operations_verbose,
    render_result,
)
from dkv.testing.models import kv_model
from dkv.v1 import admin_pb2, kv_pb2

__all__ = [
    "READY_MARKER",
    "AckedWrite",
    "Cluster",
    "ClusterClient",
    "History",
    "KvClient",
    "NodeProcess",
    "NodeState",
    "ShardView",
    "WatchRecorder",
    "WatchedEvent",
    "Workload",
    "check",
    "collect_watch",
    "free_ports",
    "lost_writes",
    "poll_until",
    "read_back",
    "recorded_get",
    "recorded_put",
]

R = TypeVar("R", bound=ProtoMessage)
T = TypeVar("T")

READY_MARKER: Final = "serving clients"
"""What ``dkv-node`` prints on stdout once it serves clients."""

RETRYABLE: Final = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)
"""Statuses after which a request is retried (with the same request id for a write).
CANCELLED is what a call gets when its node shuts down (gracefully) before answering: the
outcome is unknown, as after DEADLINE_EXCEEDED."""

POLL_S: Final = 0.05
"""Interval between two looks at a condition that has no event to wait for."""

_CHANNEL_OPTIONS: Final = (
    # A node that was killed comes back on the same port: reconnect quickly, not after
    # gRPC's default backoff of up to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
)


# Below the kernel's ephemeral range (32768-60999 by default), where the port-0 servers of
# other tests and the source ports of every outgoing connection live: a port picked there and
# released could be taken again before our process binds it (seen: "address already in use"
# for a node of a test cluster under `pytest -n auto`). Above DevLayout.with_free_ports' range.
FREE_PORT_RANGE: Final = (30_000, 32_700)


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 now, picked at random in FREE_PORT_RANGE."""
    rng = random.SystemRandom()
    chosen: list[int] = []
    for _ in range(100 * count):
        if len(chosen) == count:
            return chosen
        port = rng.randrange(*FREE_PORT_RANGE)
        if port in chosen:
            continue
        # No SO_REUSEADDR: a port still in TIME_WAIT counts as taken.
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        chosen.append(port)
    if len(chosen) == count:
        return chosen
    raise RuntimeError(f"fewer than {count} free ports in {FREE_PORT_RANGE} on 127.0.0.1")


def _serialize(m: ProtoMessage) -> bytes:
    return m.SerializeToString()


# =========================================================================== processes


class NodeProcess:
    """One ``dkv-node`` process (see the module docstring). Not thread-safe: one controller."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        log_path: Path,
        *,
        initial_cluster_state: str = "new",
        env: Mapping[str, str] | None = None,
        ready_timeout_s: float = 60.0,
    ) -> None:
        self.name = name
        # Every flag but --initial-cluster-state, which becomes "existing" after a first start.
        self.args = list(args)
        self.log_path = log_path
        self.initial_cluster_state = initial_cluster_state
        self.env = dict(env) if env is not None else None
        self.ready_timeout_s = ready_timeout_s
        self.starts = 0
        self.last_exit_code: int | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._ready = threading.Event()
        self._wake = threading.Event()  # set when ready or when stdout ended
        self._paused = False

    def __repr__(self) -> str:
        state = "paused" if self._paused else ("running" if self.running else "stopped")
        return f"NodeProcess({self.name!r}, {state})"

    # -- state ----------------------------------------------------------------------------------

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "dkv_node.main",
            *self.args,
            "--initial-cluster-state",
            self.initial_cluster_state,
        ]

    @property
    def started(self) -> bool:
        """A process exists (running, paused, or exited but not reaped yet)."""
        return self._proc is not None

    @property
    def running(self) -> bool:
        """The process exists and has not exited (it may be paused)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def paused(self) -> bool:
        return self._paused and self.running

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError(f"node {self.name} is not running")
        return self._proc.pid

    def exit_code(self) -> int | None:
        """The exit code if the process exited (without being reaped), else None."""
        return None if self._proc is None else self._proc.poll()

    def metrics_url(self) -> str:
        """The /metrics URL of the current run (its banner names the port it got)."""
        text = self.log_path.read_text(errors="replace")
        found = re.findall(r"metrics on (http://\S+/metrics)", text)
        if not found:
            raise AssertionError(f"no metrics banner in {self.log_path}")
        return str(found[-1])

    def log_tail(self, chars: int = 4000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return text[-chars:]

    def rss_bytes(self) -> int:
        """Resident set size of the process (Linux: /proc/<pid>/status)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for pid {self.pid}")

    # -- lifecycle ------------------------------------------------------------------------------

    def spawn(self) -> None:
        """Start the process without waiting for it to serve (see :meth:`wait_ready`)."""
        if self._proc is not None:
            raise RuntimeError(f"node {self.name} is already started (pid {self._proc.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = self.argv()
        self.starts += 1
        ready = threading.Event()
        wake = threading.Event()
        with self.log_path.open("a") as log:
            log.write(f"=== harness: start #{self.starts} of {self.name}: {shlex.join(argv)}\n")
            log.flush()
            env = None if self.env is None else {**os.environ, **self.env}
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,  # the child has its own copy of the descriptor
                text=True,
                env=env,
            )
        self._proc = proc
        self._ready, self._wake = ready, wake
        self._paused = False
        self._reader = threading.Thread(
            target=self._drain,
            args=(proc, ready, wake),
            name=f"dkv-node-{self.name}-stdout",
            daemon=True,
        )
        self._reader.start()

    def _drain(
        self, proc: subprocess.Popen[str], ready: threading.Event, wake: threading.Event
    ) -> None:
        """Copy the node's stdout to its log; flag readiness. Ends when the process exits."""
        try:
            assert proc.stdout is not None
            with self.log_path.open("a") as log:
                for line in proc.stdout:
                    log.write(line)
                    log.flush()
                    if READY_MARKER in line:
                        ready.set()
                        wake.set()
        except (OSError, ValueError):
            pass  # the pipe was closed under us: the process is being reaped
        finally:
            wake.set()

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Wait for the ``serving clients`` line; raise (with the log's tail) if the process
        exits first or the line does not come in time (then the process is killed)."""
        if self._proc is None:
            raise RuntimeError(f"node {self.name} is not started")
        timeout = self.ready_timeout_s if timeout_s is None else timeout_s
        arrived = self._wake.wait(timeout)
        if self._ready.is_set():
            return
        if not arrived:
            self._kill_and_reap()
            raise RuntimeError(
                f"node {self.name} did not serve within {timeout} s; log tail:\n{self.log_tail()}"
            )
        code = self._reap(timeout_s=30)
        raise RuntimeError(
            f"node {self.name} exited with code {code} before serving; log tail:\n{self.log_tail()}"
        )

    def start(self) -> None:
        """Start the process and wait until it serves clients."""
        self.spawn()
        self.wait_ready()
        # Its data dir exists now: later starts are restarts.
        self.initial_cluster_state = "existing"

    def _reap(self, timeout_s: float) -> int:
        proc = self._proc
        assert proc is not None
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=10)
            self._reader = None
        if proc.stdout is not None:
            proc.stdout.close()
        self._proc = None
        self._paused = False
        self.last_exit_code = code
        return code

    def _kill_and_reap(self) -> int:
        assert self._proc is not None
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
        return self._reap(timeout_s=30)

    def kill9(self) -> int | None:
        """SIGKILL and reap. Returns the exit code (None if there was no process)."""
        if self._proc is None:
            return None
        return self._kill_and_reap()

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (after SIGCONT if paused), wait for the exit and reap. A process that does
        not exit within ``timeout_s`` is killed (its code is then -9). Returns the exit code
        (0 for a graceful shutdown; None if there was no process)."""
        if self._proc is None:
            return None
        self.terminate()
        return self.wait_exit(timeout_s)

    def terminate(self) -> None:
        """Send SIGTERM (resuming a paused process first) without waiting."""
        if self._proc is None or self._proc.poll() is not None:
            return
        if self._paused:
            self.resume()
        self._proc.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout_s: float = 30.0) -> int | None:
        """Wait for the process to exit (killing it after ``timeout_s``) and reap it."""
        if self._proc is None:
            return None
        return self._reap(timeout_s)

    def pause(self) -> None:
        """SIGSTOP; returns once the kernel reports the process stopped."""
        if not self.running:
            raise RuntimeError(f"node {self.name} is not running")
        os.kill(self.pid, signal.SIGSTOP)
        self._paused = True
        deadline = time.monotonic() + 10
        while _proc_state(self.pid) not in ("T", "t") and time.monotonic() < deadline:
            time.sleep(0.005)

    def resume(self) -> None:
        """SIGCONT."""
        if self._proc is not None and self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGCONT)
        self._paused = False

    def restart(self, graceful: bool = True) -> int | None:
        """Stop (SIGTERM, or SIGKILL when not ``graceful``) if running, then start with
        ``--initial-cluster-state existing``. Returns the exit code of the stop."""
        code = self.stop() if graceful else self.kill9()
        self.initial_cluster_state = "existing"
        self.start()
        return code


def _proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return "?"
    # "pid (comm) S ...": comm may contain spaces and parentheses; the state follows the last ')'.
    return stat[stat.rfind(")") + 2 : stat.rfind(")") + 3]


class Cluster:
    """N ``dkv-node`` processes on 127.0.0.1 (see the module docstring).

    Members are named ``n1``..``nN``; ``member_id(name)`` is what the nodes compute from the
    cluster token. Nodes are defined (ports, flags, certificates) at construction and started
    by :meth:`start`.
    """

    def __init__(
        self,
        directory: Path,
        size: int = 3,
        *,
        shards: int = 1,
        tick_interval_ms: int = 20,
        election_timeout_ticks: int = 10,
        snapshot_count: int | None = None,
        snapshot_catchup_entries: int | None = None,
        peer_tls: bool = True,
        extra_args: Sequence[str] = (),
        token: str = "dkv-cluster",
        log_level: str = "info",
        ready_timeout_s: float = 60.0,
    ) -> None:
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        self.directory = directory
        self.shards = shards
        self.token = token
        self.tick_interval_ms = tick_interval_ms
        self.election_timeout_ticks = election_timeout_ticks
        self.snapshot_count = snapshot_count
        self.snapshot_catchup_entries = snapshot_catchup_entries
        self.extra_args = list(extra_args)
        self.log_level = log_level
        self.ready_timeout_s = ready_timeout_s
        self.pki: PkiLayout | None = PkiLayout(directory / "pki") if peer_tls else None
        self.nodes: dict[str, NodeProcess] = {}
        self.peer_ports: dict[str, int] = {}
        self.client_ports: dict[str, int] = {}
        self._ids: dict[int, str] = {}
        directory.mkdir(parents=True, exist_ok=True)
        names = [f"n{i}" for i in range(1, size + 1)]
        if self.pki is not None:
            write_dev_pki(self.pki.directory, [("node", n) for n in names])
        ports = free_ports(2 * size)
        for i, n in enumerate(names):
            self.peer_ports[n], self.client_ports[n] = ports[2 * i], ports[2 * i + 1]
        founders = {n: self.peer_address(n) for n in names}
        for n in names:
            self._define(n, founders, "new")

    # -- naming ---------------------------------------------------------------------------------

    def peer_address(self, name: str) -> str:
        return f"127.0.0.1:{self.peer_ports[name]}"

    def endpoint(self, name: str) -> str:
        """The client address of ``name``."""
        return f"127.0.0.1:{self.client_ports[name]}"

    def endpoints(self, names: Iterable[str] | None = None) -> list[str]:
        """Client addresses of ``names`` (default: every node, running or not)."""
        return [self.endpoint(n) for n in (self.nodes if names is None else names)]

    def member_id(self, name: str) -> int:
        return member_id(self.token, name)

    def name_of(self, mid: int) -> str | None:
        """The name of the member with id ``mid`` (None if it is not one of ours)."""
        return self._ids.get(mid)

    def running(self) -> list[str]:
        """Names of the nodes whose process runs and is not paused."""
        return [n for n, p in self.nodes.items() if p.running and not p.paused]

    def others(self, *names: str) -> list[str]:
        """Every node but ``names``."""
        return [n for n in self.nodes if n not in names]

    # -- nodes ----------------------------------------------------------------------------------

    def _args(self, name: str, initial_cluster: Mapping[str, str]) -> list[str]:
        args = [
            "--name", name,
            "--data-dir", str(self.directory / name),
            "--listen-peer", self.peer_address(name),
            "--listen-client", self.endpoint(name),
            "--initial-cluster", ",".join(f"{n}={a}" for n, a in initial_cluster.items()),
            "--initial-cluster-token", self.token,
            "--shards", str(self.shards),
            "--tick-interval-ms", str(self.tick_interval_ms),
            "--election-timeout-ticks", str(self.election_timeout_ticks),
            "--log-level", self.log_level,
            "--listen-metrics", "127.0.0.1:0",  # many nodes on one host: any free port
        ]  # fmt: skip
        if self.snapshot_count is not None:
            args += ["--snapshot-count", str(self.snapshot_count)]
        if self.snapshot_catchup_entries is not None:
            args += ["--snapshot-catchup-entries", str(self.snapshot_catchup_entries)]
        if self.pki is not None:
            args += [
                "--peer-cert-file", str(self.pki.cert(name)),
                "--peer-key-file", str(self.pki.key(name)),
                "--peer-trusted-ca-file", str(self.pki.ca_cert),
            ]  # fmt: skip
        return [*args, *self.extra_args]

    def _define(self, name: str, initial_cluster: Mapping[str, str], state: str) -> NodeProcess:
        node = NodeProcess(
            name,
            self._args(name, initial_cluster),
            self.directory / f"{name}.log",
            initial_cluster_state=state,
            ready_timeout_s=self.ready_timeout_s,
        )
        self.nodes[name] = node
        self._ids[self.member_id(name)] = name
        return node

    def add_node_process(
        self, name: str, initial_cluster_state: str = "existing", start: bool = True
    ) -> NodeProcess:
        """Define (and by default start) an extra node whose ``--initial-cluster`` lists the
        current members plus itself. Adding it to the Raft groups is the Admin API's job."""
        if name in self.nodes:
            raise ValueError(f"node {name!r} exists already")
        if self.pki is not None:
            write_dev_pki(self.pki.directory, [("node", name)])  # the CA is reused
        self.peer_ports[name], self.client_ports[name] = free_ports(2)
        cluster = {n: self.peer_address(n) for n in self.nodes}
        cluster[name] = self.peer_address(name)
        node = self._define(name, cluster, initial_cluster_state)
        if start:
            node.start()
        return node

    def start(self, names: Iterable[str] | None = None) -> None:
        """Start ``names`` (default: every node not running) in parallel; wait until each
        serves. On failure every process is killed and the error re-raised."""
        todo = [n for n in (self.nodes if names is None else names) if not self.nodes[n].running]
        try:
            for n in todo:
                self.nodes[n].spawn()
            for n in todo:
                self.nodes[n].wait_ready()
                self.nodes[n].initial_cluster_state = "existing"
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Kill (SIGKILL, by PID) and reap every process this cluster started. Idempotent."""
        errors: list[BaseException] = []
        for node in self.nodes.values():
            try:
                node.kill9()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def stop_all(self, timeout_s: float = 30.0) -> dict[str, int | None]:
        """SIGTERM every running node at once and wait: {name: exit code}."""
        for node in self.nodes.values():
            node.terminate()
        return {n: node.wait_exit(timeout_s) for n, node in self.nodes.items() if node.started}

    def kill9_all(self) -> None:
        for node in self.nodes.values():
            if node.running:
                os.kill(node.pid, signal.SIGKILL)
        for node in self.nodes.values():
            node.kill9()

    def restart_all(self, graceful: bool = True) -> dict[str, int | None]:
        """Stop every node (SIGTERM, or SIGKILL unless ``graceful``) and start them all again.
        Returns the exit codes of the stop."""
        started = [n for n, p in self.nodes.items() if p.started]
        if graceful:
            codes = self.stop_all()
        else:
            self.kill9_all()
            codes = {n: self.nodes[n].last_exit_code for n in started}
        self.start(started)
        return codes

    def dead(self) -> dict[str, int]:
        """Nodes whose process exited by itself (not reaped by us): {name: exit code}."""
        out: dict[str, int] = {}
        for n, p in self.nodes.items():
            code = p.exit_code()
            if code is not None:
                out[n] = code
        return out

    def assert_alive(self) -> None:
        """Fail (with log tails) if a node exited that the test did not stop."""
        dead = self.dead()
        if dead:
            tails = "\n".join(f"--- {n} ---\n{self.nodes[n].log_tail()}" for n in dead)
            raise AssertionError(f"nodes exited on their own: {dead}\n{tails}")

    def log_tails(self, chars: int = 3000) -> str:
        return "\n".join(
            f"----- {n} ({p.log_path}) -----\n{p.log_tail(chars)}" for n, p in self.nodes.items()
        )

    async def leader(
        self, shard: int = 1, timeout_s: float = 30.0, exclude: Iterable[str] = ()
    ) -> str:
        """The name of ``shard``'s leader (opens its own channels; see ClusterClient.leader)."""
        async with ClusterClient(self) as client:
            return await client.leader(shard, timeout_s, exclude)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# =========================================================================== client


@dataclass(frozen=True)
class ShardView:
    """One node's view of one shard (from Admin Status)."""

    name: str
    role: int
    term: int
    leader_id: int
    applied_index: int
    revision: int
    first_index: int
    last_index: int
    snapshot_index: int
    voters: tuple[int, ...]


@dataclass(frozen=True)
class NodeState:
    """What a node holds: its keys (serializable range) and each shard's revision/applied."""

    kvs: tuple[tuple[bytes, bytes, int, int, int], ...]  # key, value, create, mod, version
    shards: tuple[tuple[int, int, int], ...]  # shard, revision, applied index

    def as_dict(self) -> dict[bytes, tuple[bytes, int, int, int]]:
        return {k: (v, c, m, ver) for k, v, c, m, ver in self.kvs}


class ClusterClient:
    """gRPC access to a :class:`Cluster`'s nodes; create (``async with``) inside the event loop
    that uses it. See the module docstring for the retry rules."""

    def __init__(
        self,
        cluster: Cluster,
        attempt_timeout_s: float = 1.0,
        rng: random.Random | None = None,
    ) -> None:
        self.cluster = cluster
        self.attempt_timeout_s = attempt_timeout_s
        self.rng = rng or random.Random()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._leaders: dict[int, str] = {}  # shard -> name of the node that last took a write
        self.failures: Counter[str] = Counter()  # status code name -> failed attempts

    async def __aenter__(self) -> ClusterClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for ch in channels.values():
            await ch.close()

    def channel(self, name: str) -> grpc.aio.Channel:
        ch = self._channels.get(name)
        if ch is None:
            ch = grpc.aio.insecure_channel(self.cluster.endpoint(name), options=_CHANNEL_OPTIONS)
            self._channels[name] = ch
        return ch

    def shard_of(self, key: bytes) -> int:
        return shard_for_key(key, self.cluster.shards)

    # -- single attempts ------------------------------------------------------------------------

    async def unary(
        self,
        name: str,
        method: str,
        req: ProtoMessage,
        resp_type: type[R],
        timeout_s: float,
        service: str = "dkv.v1.KV",
    ) -> R:
        """One call at node ``name`` (no retry)."""
        stub: grpc.aio.UnaryUnaryMultiCallable[ProtoMessage, R] = self.channel(name).unary_unary(
            f"/{service}/{method}",
            request_serializer=_serialize,
            response_deserializer=resp_type.FromString,
        )
        resp: R = await stub(req, timeout=timeout_s)
        return resp

    async def status(self, name: str, timeout_s: float = 1.0) -> admin_pb2.StatusResponse:
        return await self.unary(
            name,
            "Status",
            admin_pb2.StatusRequest(),
            admin_pb2.StatusResponse,
            timeout_s,
            "dkv.v1.Admin",
        )

    async def shard_views(
        self, shard: int, names: Iterable[str] | None = None, timeout_s: float = 0.5
    ) -> dict[str, ShardView]:
        """Each reachable node's view of ``shard`` (nodes that do not answer are left out)."""
        targets = list(self.cluster.running() if names is None else names)
        answers = await asyncio.gather(
            *(self.status(n, timeout_s) for n in targets), return_exceptions=True
        )
        views: dict[str, ShardView] = {}
        for n, st in zip(targets, answers, strict=True):
            if isinstance(st, BaseException):
                if isinstance(st, grpc.aio.AioRpcError):
                    continue
                raise st
            for s in st.shards:
                if s.shard_id == shard:
                    views[n] = ShardView(
                        n,
                        s.role,
                        s.term,
                        s.leader_id,
                        s.applied_index,
                        s.revision,
                        s.first_index,
                        s.last_index,
                        s.snapshot_index,
                        tuple(s.voters),
                    )
        return views

    async def leader(
        self, shard: int = 1, timeout_s: float = 30.0, exclude: Iterable[str] = ()
    ) -> str:
        """The node that leads ``shard``: one that says it leads, at a term in which a
        majority of the shard's voters (itself included) name it leader. Polls the nodes'
        Status until one qualifies or ``timeout_s`` passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        skip = set(exclude)
        views: dict[str, ShardView] = {}
        while True:
            names = [n for n in self.cluster.running() if n not in skip]
            views = await self.shard_views(shard, names)
            for n, v in views.items():
                if v.role != admin_pb2.ROLE_LEADER:
                    continue
                mid = self.cluster.member_id(n)
                backers = sum(
                    1
                    for o in views.values()
                    if o.term == v.term
                    and o.leader_id == mid
                    and self.cluster.member_id(o.name) in v.voters
                )
                if backers > len(v.voters) // 2:
                    self._leaders[shard] = n
                    return n
            if loop.time() > deadline:
                raise AssertionError(
                    f"no leader of shard {shard} within {timeout_s} s; views: {views}"
                )
            await asyncio.sleep(POLL_S)

    # -- retried calls --------------------------------------------------------------------------

    async def call(
        self,
        method: str,
        req: ProtoMessage,
        resp_type: type[R],
        shard: int,
        deadline: float,
        names: Sequence[str] | None = None,
        attempts: list[float] | None = None,
        anywhere: bool = False,
    ) -> R | None:
        """Call ``method`` until it succeeds or the loop time passes ``deadline`` (then None).
        Retries on the RETRYABLE statuses, following leader hints; other statuses raise. The
        request itself is re-sent unchanged (a write keeps its request id). The
        ``time.monotonic()`` at which each attempt starts is appended to ``attempts``. The
        first attempt goes to the shard's last known leader, or with ``anywhere`` (reads any
        node serves) to a random node."""
        loop = asyncio.get_running_loop()
        order = list(self.cluster.nodes if names is None else names)
        self.rng.shuffle(order)
        preferred = self._leaders.get(shard)
        target = preferred if preferred in order and not anywhere else order[0]
        failures = 0
        while (remaining := deadline - loop.time()) > 0:
            if attempts is not None:
                attempts.append(time.monotonic())
            try:
                return await self.unary(
                    target, method, req, resp_type, min(self.attempt_timeout_s, remaining)
                )
            except grpc.aio.AioRpcError as exc:
                self.failures[exc.code().name] += 1
                if exc.code() not in RETRYABLE:
                    raise
                failures += 1
                hinted = self.cluster.name_of(_leader_hint(exc))
                if hinted is not None and hinted != target and hinted in order:
                    target = hinted
                else:
                    target = order[(order.index(target) + 1) % len(order)]
                if failures % len(order) == 0:
                    # Every node said no (an election, or nodes down): back off a little.
                    backoff = min(0.2, 0.02 * (failures // len(order)))
                    await asyncio.sleep(backoff * (0.5 + self.rng.random()))
        return None

    async def put(
        self, key: bytes, value: bytes, request_id: str, deadline: float
    ) -> kv_pb2.PutResponse | None:
        """A put retried with the same request id until ``deadline`` (loop time). None: the
        outcome is unknown."""
        shard = self.shard_of(key)
        req = kv_pb2.PutRequest(key=key, value=value, request_id=request_id)
        resp = await self.call("Put", req, kv_pb2.PutResponse, shard, deadline)
        if resp is not None:
            who = self.cluster.name_of(resp.header.member_id)
            if who is not None:
                self._leaders[shard] = who
        return resp

    async def get(
        self,
        key: bytes,
        deadline: float,
        serializable: bool = False,
        attempts: list[float] | None = None,
    ) -> kv_pb2.RangeResponse | None:
        consistency = (
            kv_pb2.READ_CONSISTENCY_SERIALIZABLE
            if serializable
            else kv_pb2.READ_CONSISTENCY_LINEARIZABLE
        )
        req = kv_pb2.RangeRequest(key=key, consistency=consistency)
        return await self.call(
            "Range",
            req,
            kv_pb2.RangeResponse,
            self.shard_of(key),
            deadline,
            attempts=attempts,
            anywhere=True,  # followers serve linearizable reads too (ReadIndex at the leader)
        )

    async def read_prefix(self, prefix: bytes, timeout_s: float = 30.0) -> kv_pb2.RangeResponse:
        """Every key with ``prefix`` (linearizable; at most 10,000 keys), retried at any node."""
        loop = asyncio.get_running_loop()
        req = kv_pb2.RangeRequest(prefix=prefix, limit=10_000)
        resp = await self.call("Range", req, kv_pb2.RangeResponse, 1, loop.time() + timeout_s)
        if resp is None:
            raise AssertionError(f"no node answered a linearizable read within {timeout_s} s")
        assert not resp.more, "read_prefix reads at most 10,000 keys"
        return resp

    async def node_state(self, name: str, prefix: bytes, timeout_s: float = 2.0) -> NodeState:
        """``name``'s own data under ``prefix`` (a serializable read there) and, per shard, its
        revision and applied index (Admin Status)."""
        req = kv_pb2.RangeRequest(
            prefix=prefix, limit=10_000, consistency=kv_pb2.READ_CONSISTENCY_SERIALIZABLE
        )
        resp = await self.unary(name, "Range", req, kv_pb2.RangeResponse, timeout_s)
        assert not resp.more, "node_state reads at most 10,000 keys"
        st = await self.status(name, timeout_s)
        return NodeState(
            kvs=tuple(
                (kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version)
                for kv in resp.kvs
            ),
            shards=tuple(sorted((s.shard_id, s.revision, s.applied_index) for s in st.shards)),
        )

    async def wait_converged(
        self, prefix: bytes, names: Sequence[str] | None = None, timeout_s: float = 30.0
    ) -> NodeState:
        """Wait until every node of ``names`` (default: all running) holds the same keys under
        ``prefix`` with the same revisions, and has applied the same index in every shard.
        Returns that common state; fails with each node's state after ``timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        targets = list(self.cluster.running() if names is None else names)
        last: dict[str, NodeState | str] = {}
        while True:
            answers = await asyncio.gather(
                *(self.node_state(n, prefix) for n in targets), return_exceptions=True
            )
            last = {}
            for n, a in zip(targets, answers, strict=True):
                if isinstance(a, grpc.aio.AioRpcError):
                    last[n] = f"unreachable: {a.code().name}"
                elif isinstance(a, BaseException):
                    raise a
                else:
                    last[n] = a
            states = list(last.values())
            if all(isinstance(s, NodeState) for s in states) and all(
                s == states[0] for s in states
            ):
                first = states[0]
                assert isinstance(first, NodeState)
                return first
            if loop.time() > deadline:
                raise AssertionError(
                    f"nodes {targets} did not converge within {timeout_s} s:\n"
                    + _describe_states(last)
                )
            await asyncio.sleep(POLL_S)


async def poll_until(probe: Callable[[], Awaitable[T | None]], timeout_s: float, what: str) -> T:
    """Call ``probe`` every POLL_S until it returns something other than None; fail with
    ``what`` after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        got = await probe()
        if got is not None:
            return got
        if loop.time() > deadline:
            raise AssertionError(f"not reached within {timeout_s} s: {what}")
        await asyncio.sleep(POLL_S)


def _leader_hint(exc: grpc.aio.AioRpcError) -> int:
    trailers = exc.trailing_metadata()
    for k, v in trailers or ():
        if k == "dkv-leader-id":
            try:
                return int(v.decode() if isinstance(v, bytes) else v)
            except ValueError:
                return 0
    return 0


def _describe_states(states: Mapping[str, NodeState | str]) -> str:
    lines = []
    ref: dict[bytes, tuple[bytes, int, int, int]] | None = None
    for n, s in states.items():
        if isinstance(s, str):
            lines.append(f"  {n}: {s}")
            continue
        lines.append(f"  {n}: {len(s.kvs)} keys; shards (id, revision, applied): {s.shards}")
        d = s.as_dict()
        if ref is None:
            ref = d
            continue
        diff = sorted(k for k in ref.keys() | d.keys() if ref.get(k) != d.get(k))
        for k in diff[:10]:
            lines.append(f"    {k!r}: first node {ref.get(k)} vs {n} {d.get(k)}")
        if len(diff) > 10:
            lines.append(f"    ... {len(diff) - 10} more differing keys")
    return "\n".join(lines)


# =========================================================================== histories


@dataclass(frozen=True)
class AckedWrite:
    """A put the cluster acknowledged: it must survive every fault."""

    key: bytes
    value: bytes
    revision: int
    shard: int
    request_id: str


@dataclass
class History:
    """Operations in :func:`~dkv.testing.models.kv_model`'s shapes (keys and values as str):
    ``("get", key)`` -> value or None, ``("put", key, value)`` -> None; plus the acknowledged
    writes and any unexpected error a client met."""

    seed: int = 0
    ops: list[Operation] = field(default_factory=list)
    acked: list[AckedWrite] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _clients: int = 0

    @staticmethod
    def clock() -> float:
        return time.monotonic()

    def new_client(self) -> int:
        self._clients += 1
        return self._clients

    def add(self, op: Operation) -> None:
        self.ops.append(op)

    @property
    def unknown(self) -> list[Operation]:
        return [op for op in self.ops if not op.completed]

    def summary(self) -> str:
        puts = sum(1 for op in self.ops if op.input[0] == "put")
        return (
            f"{len(self.ops)} operations ({puts} puts, {len(self.ops) - puts} gets), "
            f"{len(self.unknown)} with unknown outcome, {len(self.acked)} acknowledged writes, "
            f"seed {self.seed}"
        )


def _s(b: bytes) -> str:
    return b.decode("utf-8", "backslashreplace")


async def recorded_put(
    client: KvClient,
    history: History,
    cid: int,
    key: bytes,
    value: bytes,
    request_id: str,
    deadline: float,
) -> kv_pb2.PutResponse | None:
    """A put recorded in ``history`` (unknown outcome if it never got an answer)."""
    inp = ("put", _s(key), _s(value))
    t0 = history.clock()
    try:
        resp = await client.put(key, value, request_id, deadline)
    except grpc.aio.AioRpcError as exc:
        history.errors.append(f"put {key!r} ({request_id}): {exc.code().name}: {exc.details()}")
        resp = None
    if resp is None:
        history.add(Operation.unknown(cid, inp, t0))
        return None
    history.add(Operation(cid, inp, t0, None, history.clock()))
    history.acked.append(
        AckedWrite(key, value, resp.header.revision, client.shard_of(key), request_id)
    )
    return resp


async def recorded_get(
    client: KvClient, history: History, cid: int, key: bytes, deadline: float
) -> tuple[bool, kv_pb2.KeyValue | None]:
    """A linearizable get recorded in ``history``: (answered, key-value or None if absent).
    Not answered in time: nothing is recorded (a read has no effect). The operation's call
    time is that of the attempt that answered: earlier attempts had no effect."""
    attempts: list[float] = []
    try:
        resp = await client.get(key, deadline, attempts=attempts)
    except grpc.aio.AioRpcError as exc:
        history.errors.append(f"get {key!r}: {exc.code().name}: {exc.details()}")
        return False, None
    if resp is None:
        return False, None
    kv = resp.kvs[0] if resp.kvs else None
    value = None if kv is None else _s(kv.value)
    history.add(Operation(cid, ("get", _s(key)), attempts[-1], value, history.clock()))
    return True, kv


class Workload:
    """``workers`` concurrent clients, each doing ``ops_per_worker`` operations (fewer if
    :meth:`stop` is called; ``None``: until :meth:`stop` is called or the task is cancelled),
    recorded in ``history``.

    A scenario that waits for "N more answers" after steps of unknown length (a restart, a
    promotion) must load until stopped: a fixed budget can run out on a slow machine before
    the last wait, which then fails although the cluster serves.

    Default: random put/get on ``keys`` keys ``<prefix>0``.. with unique values. With
    ``fresh_keys``, every operation is a put to a key of its own (``<prefix><client>/<n>``):
    each key is written once, so its version must end at 1 (a write applied twice shows).
    """

    def __init__(
        self,
        client: KvClient,
        history: History,
        *,
        workers: int = 5,
        ops_per_worker: int | None = 40,
        keys: int = 5,
        prefix: bytes = b"k/",
        read_fraction: float = 0.5,
        fresh_keys: bool = False,
        op_timeout_s: float = 30.0,
        seed: int = 0,
    ) -> None:
        self.client = client
        self.history = history
        self.workers = workers
        self.ops_per_worker = ops_per_worker
        self.keys = keys
        self.prefix = prefix
        self.read_fraction = 0.0 if fresh_keys else read_fraction
        self.fresh_keys = fresh_keys
        self.op_timeout_s = op_timeout_s
        self.seed = seed
        self.run_id = uuid.uuid4().hex[:8]
        self.written: list[bytes] = []  # every key a put was attempted on
        self.completed = 0  # operations finished (known or not)
        self.succeeded = 0  # operations answered
        self.finished = False
        self.stopping = False  # set by stop(): workers end after their current operation
        self._progress: asyncio.Condition | None = None

    @property
    def total(self) -> int:
        if self.ops_per_worker is None:
            raise ValueError("a workload that runs until stopped has no total")
        return self.workers * self.ops_per_worker

    def key_set(self) -> list[bytes]:
        """Every key the workload may have touched."""
        if self.fresh_keys:
            return list(self.written)
        return [self.prefix + str(i).encode() for i in range(self.keys)]

    def _cond(self) -> asyncio.Condition:
        if self._progress is None:
            self._progress = asyncio.Condition()
        return self._progress

    async def run(self) -> None:
        try:
            await asyncio.gather(*(self._worker(i) for i in range(self.workers)))
        finally:
            self.finished = True
            async with self._cond():
                self._cond().notify_all()

    async def _worker(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        cid = self.history.new_client()
        loop = asyncio.get_running_loop()
        numbers = itertools.count() if self.ops_per_worker is None else range(self.ops_per_worker)
        for n in numbers:
            if self.stopping:
                return
            deadline = loop.time() + self.op_timeout_s
            ok: bool
            if rng.random() < self.read_fraction:
                key = self.prefix + str(rng.randrange(self.keys)).encode()
                ok, _ = await recorded_get(self.client, self.history, cid, key, deadline)
            else:
                if self.fresh_keys:
                    key = self.prefix + f"{cid}/{n}".encode()
                else:
                    key = self.prefix + str(rng.randrange(self.keys)).encode()
                self.written.append(key)
                value = f"{cid}.{n}".encode()
                rid = f"{self.run_id}-{cid}-{n}"
                resp = await recorded_put(self.client, self.history, cid, key, value, rid, deadline)
                ok = resp is not None
            self.completed += 1
            self.succeeded += ok
            async with self._cond():
                self._cond().notify_all()

    def stop(self) -> None:
        """Let every worker finish its current operation and end (``ops_per_worker`` is then
        an upper bound)."""
        self.stopping = True

    async def wait_succeeded(self, count: int, timeout_s: float = 60.0) -> None:
        """Wait until ``count`` operations were answered; fail if the workload ends first or
        ``timeout_s`` passes (the cluster does not serve)."""
        cond = self._cond()
        try:
            async with cond:
                await asyncio.wait_for(
                    cond.wait_for(lambda: self.succeeded >= count or self.finished), timeout_s
                )
        except TimeoutError:
            raise AssertionError(
                f"only {self.succeeded} of {count} operations answered within {timeout_s} s "
                f"({self.completed} finished): the cluster does not serve"
            ) from None
        if self.succeeded < count:
            raise AssertionError(
                f"the workload ended with {self.succeeded} operations answered, "
                f"{count} expected: the cluster does not serve"
            )


async def read_back(
    client: KvClient, history: History, keys: Iterable[bytes], timeout_s: float = 30.0
) -> dict[bytes, kv_pb2.KeyValue | None]:
    """Read every key (linearizably, recorded in ``history``): {key: key-value or None}.
    Fails if some key cannot be read within ``timeout_s``."""
    loop = asyncio.get_running_loop()
    cid = history.new_client()
    out: dict[bytes, kv_pb2.KeyValue | None] = {}
    for key in sorted(set(keys)):
        ok, kv = await recorded_get(client, history, cid, key, loop.time() + timeout_s)
        if not ok:
            raise AssertionError(f"could not read {key!r} back within {timeout_s} s")
        out[key] = kv
    return out


def lost_writes(
    acked: Sequence[AckedWrite], final: Mapping[bytes, kv_pb2.KeyValue | None]
) -> list[str]:
    """What is wrong with the final state given the acknowledged writes (empty: nothing):
    two acknowledged writes at one revision of a shard, an acknowledged key absent, a final
    value older than the last acknowledged write of its key, or another value at the revision
    of an acknowledged write."""
    problems: list[str] = []
    at: dict[tuple[int, int], AckedWrite] = {}
    latest: dict[bytes, AckedWrite] = {}
    for w in acked:
        other = at.setdefault((w.shard, w.revision), w)
        if other is not w:
            problems.append(f"two acknowledged writes at shard {w.shard} revision {w.revision}: "
                            f"{other} and {w}")  # fmt: skip
        if w.key not in latest or w.revision > latest[w.key].revision:
            latest[w.key] = w
    for w in acked:
        kv = final.get(w.key)
        if kv is None:
            problems.append(f"{w.key!r} is absent; acknowledged: {w}")
        elif kv.mod_revision == w.revision and kv.value != w.value:
            problems.append(f"{w.key!r} = {kv.value!r} at revision {kv.mod_revision}, "
                            f"but the acknowledged write at that revision is {w}")  # fmt: skip
    for key, w in latest.items():
        kv = final.get(key)
        if kv is not None and kv.mod_revision < w.revision:
            problems.append(
                f"{key!r} = {kv.value!r} at revision {kv.mod_revision}: the later acknowledged "
                f"write {w} is lost"
            )
    return problems


def check(
    history: History | Sequence[Operation], *, timeout_s: float = 20.0, context: str = ""
) -> LinearizabilityResult:
    """Check ``history`` against :func:`~dkv.testing.models.kv_model`; raise AssertionError
    with the rendered result unless it is linearizable. A checker timeout (UNKNOWN) fails
    too: the workload is too big for the budget, which proves nothing."""
    ops = history.ops if isinstance(history, History) else list(history)
    about = history.summary() if isinstance(history, History) else f"{len(ops)} operations"
    if context:
        about = f"{context}: {about}"
    result = check_operations_verbose(kv_model(), ops, timeout_s)
    if result.result is CheckResult.UNKNOWN:
        raise AssertionError(
            f"{about}\nthe linearizability checker did not finish within {timeout_s} s "
            "(UNKNOWN is not a pass: shrink the workload or raise the budget)\n"
            + render_result(result)
        )
    if result.result is not CheckResult.OK:
        raise AssertionError(f"{about}\nNOT LINEARIZABLE\n{render_result(result)}")
    return result


# =========================================================================== watch


@dataclass(frozen=True)
class WatchedEvent:
    revision: int
    type: int
    key: bytes
    value: bytes
    node: str  # the node whose stream delivered it


class KvClient(Protocol):
    """What :class:`Workload`, :func:`recorded_put`, :func:`recorded_get` and
    :func:`read_back` need of a client: :class:`ClusterClient` (nodes directly, retrying
    itself) or :class:`dkv.testing.frontdoor.FrontDoorClient` (one call through Envoy; the
    gateway retries)."""

    async def put(
        self, key: bytes, value: bytes, request_id: str, deadline: float
    ) -> kv_pb2.PutResponse | None: ...

    async def get(
        self,
        key: bytes,
        deadline: float,
        serializable: bool = False,
        attempts: list[float] | None = None,
    ) -> kv_pb2.RangeResponse | None: ...

    def shard_of(self, key: bytes) -> int: ...


class WatchRecorder:
    """Watch ``prefix`` from ``start_revision`` the way a client does: on a node failure (or
    the stream ending), resume at the next node of ``order`` from the revision after the last
    one delivered. Records every event delivered, and flags an event whose revision is not
    above the last one seen (a duplicate or a reordering) in ``violations``. Meant for
    single-key writes in a single shard (one event per revision)."""

    def __init__(
        self,
        client: ClusterClient,
        prefix: bytes,
        start_revision: int,
        order: Sequence[str],
        label: str = "watch",
    ) -> None:
        self.label = label
        self.client = client
        self.prefix = prefix
        self.start_revision = start_revision
        self.order = list(order)
        self.events: list[WatchedEvent] = []
        self.violations: list[str] = []
        self.streams: list[tuple[str, int]] = []  # (node, start revision) of each stream
        self.last_revision = start_revision - 1
        self._task: asyncio.Task[None] | None = None
        self._changed: asyncio.Condition | None = None

    def start(self) -> None:
        self._changed = asyncio.Condition()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    @property
    def reconnects(self) -> int:
        return max(0, len(self.streams) - 1)

    async def _run(self) -> None:
        assert self._changed is not None
        i = 0
        failures = 0
        while True:
            node = self.order[i % len(self.order)]
            start = self.last_revision + 1
            self.streams.append((node, start))
            req = kv_pb2.WatchRequest(prefix=self.prefix, start_revision=start)
            call = self.client.channel(node).unary_stream(
                "/dkv.v1.KV/Watch",
                request_serializer=_serialize,
                response_deserializer=kv_pb2.WatchResponse.FromString,
            )(req)
            try:
                async for resp in call:
                    failures = 0
                    if resp.compacted:
                        self.violations.append(
                            f"{node}: COMPACTED at {resp.compact_revision} (from {start})"
                        )
                        return
                    for ev in resp.events:
                        rev = ev.kv.mod_revision
                        if rev <= self.last_revision:
                            self.violations.append(
                                f"{node}: revision {rev} delivered after {self.last_revision} "
                                f"(stream from {start})"
                            )
                        self.events.append(WatchedEvent(rev, ev.type, ev.kv.key, ev.kv.value, node))
                        self.last_revision = max(self.last_revision, rev)
                    async with self._changed:
                        self._changed.notify_all()
                # The server ended the stream (it is shutting down): resume elsewhere.
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    self.violations.append(f"{node}: {exc.code().name}: {exc.details()}")
                    return
            finally:
                call.cancel()
            i += 1
            failures += 1
            if failures % len(self.order) == 0:
                await asyncio.sleep(POLL_S)

    async def wait_revision(self, revision: int, timeout_s: float = 30.0) -> None:
        """Wait until an event at ``revision`` or later was delivered."""
        assert self._changed is not None
        cond = self._changed
        try:
            async with cond:
                await asyncio.wait_for(
                    cond.wait_for(lambda: self.last_revision >= revision), timeout_s
                )
        except TimeoutError:
            pass
        else:
            return
        # Diagnose: does a NEW stream at the same node deliver what this one did not?
        node = self.streams[-1][0] if self.streams else self.order[0]
        try:
            fresh = await collect_watch(
                self.client, node, self.prefix, self.last_revision + 1, revision, timeout_s=5
            )
            probe = f"a new stream at {node} from {self.last_revision + 1} delivers " + (
                ", ".join(f"{e.revision}" for e in fresh[:10]) or "nothing"
            )
        except (grpc.aio.AioRpcError, AssertionError, TimeoutError) as exc:
            probe = f"a new stream at {node} from {self.last_revision + 1} failed: {exc!r}"
        raise AssertionError(
            f"{self.label} reached revision {self.last_revision}, not {revision}, within "
            f"{timeout_s} s; streams (node, from): {self.streams}; "
            f"violations: {self.violations}; {probe}"
        )


async def collect_watch(
    client: ClusterClient,
    name: str,
    prefix: bytes,
    start_revision: int,
    until_revision: int,
    timeout_s: float = 30.0,
) -> list[WatchedEvent]:
    """The events of ``prefix`` from ``start_revision`` through ``until_revision`` as one
    stream from node ``name`` delivers them."""
    out: list[WatchedEvent] = []
    req = kv_pb2.WatchRequest(prefix=prefix, start_revision=start_revision)
    call = client.channel(name).unary_stream(
        "/dkv.v1.KV/Watch",
        request_serializer=_serialize,
        response_deserializer=kv_pb2.WatchResponse.FromString,
    )(req, timeout=timeout_s, wait_for_ready=True)  # the node may have just restarted

    async def drain() -> None:
        async for resp in call:
            if resp.compacted:
                raise AssertionError(f"{name}: COMPACTED at {resp.compact_revision}")
            for ev in resp.events:
                out.append(WatchedEvent(ev.kv.mod_revision, ev.type, ev.kv.key, ev.kv.value, name))
            if out and out[-1].revision >= until_revision:
                return

    try:
        if until_revision >= start_revision:
            await drain()
    finally:
        call.cancel()
    return out
