"""``make bench-node``: a dkv storage node cluster side by side with etcd, driven by h2load.

3-member clusters on 127.0.0.1, one after the other (never two at once, so they do not compete
for the CPUs): dkv (three ``dkv-node`` processes, one shard, fsync on as by default), etcd 3.6
(built from its Go modules by ``make etcd36``: :mod:`bench.etcd_build`; skipped with a
note when it has not been built) and Debian's etcd 3.4 (on PATH), each three ``etcd``
processes with the same flags: defaults, fsync on. h2load, a C HTTP/2 load generator, sends
the SAME pre-framed gRPC request bodies to each cluster's LEADER over plain HTTP/2 (h2c) with
the same number of requests in flight, so the client costs the same for all and is not the
bottleneck (a Python client would be: see ../shared/FIELD-NOTES.md). The ratios dkv/etcd are
given against each etcd; etcd 3.6 is the primary one.

Rows: put, linearizable get and serializable get of one 16-byte key with a 256-byte value, at
1 request in flight (``-c1 -m1``), 64 (``-c4 -m16``: 4 connections x 16 streams) and 1024
(``-c16 -m64``); gets at 1 and 1024. Each row starts with a short warm-up run whose rate sizes
the measured run to about ``--seconds`` seconds (``DKV_BENCH_SCALE`` multiplies it). Reported
per row: requests/s and h2load's mean and max "time for request".

h2load counts any HTTP 200 as a success, even when the gRPC status in the trailers is an error,
so every measured run is VERIFIED:

- puts: the key's ``version`` (puts since creation) and the store's revision, read with a
  linearizable Range before and after, must both move by exactly the number of requests;
- gets: one Python call with the same body must succeed (grpc-status 0) and return the value,
  and h2load's received DATA bytes must equal requests x that response's framed size (a failed
  gRPC call is a trailers-only response: no DATA), so even one failed read shows.

A row that fails verification is marked FAILED in the table, with the shortfall, and the
exit status is 1. The details table also gives, in cores, the CPU used during each row by the
leader, by all three members, and by processes that are not ours: the machine may be shared,
and a row with busy neighbours is pessimistic. After the run: each member's RSS (VmRSS).

``DKV_BENCH_PROFILE=1`` (or ``=gil``: only samples holding the GIL) records the dkv leader
with py-spy during the 64-in-flight put row and prints its hotspots; the raw profile (collapsed
stacks, one thread per first frame) is kept and its path printed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType

import grpc

from bench.etcd_build import EtcdBinaries, find_etcd34, find_etcd36
from dkv.v1 import kv_pb2

__all__ = ["H2loadResult", "RowResult", "main", "parse_h2load"]

KEY = b"bench-node/key01"  # 16 bytes
VALUE = b"v" * 256
CLUSTER_START_TIMEOUT_S = 60.0
RPC_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
OTHERS_CPU_WARN = 0.2  # cores used by processes not ours during a row: worth a note
# Which Debian package provides each tool we run (never installed by this script); etcd 3.6
# comes from `make etcd36` instead.
TOOLS = {"h2load": "nghttp2-client", "etcd": "etcd-server", "etcdctl": "etcd-client"}

# -- request bodies ---------------------------------------------------------------------------
#
# One body per operation serves BOTH systems, because the field numbers we use agree with
# etcd's etcdserverpb (api/etcdserverpb/rpc.proto, the same in etcd 3.4 and 3.6):
#   PutRequest   key = 1 (bytes), value = 2 (bytes)                  -- ours: the same;
#   RangeRequest key = 1 (bytes), serializable = 7 (bool)             -- ours: key = 1 and
#                consistency = 7, an enum with READ_CONSISTENCY_SERIALIZABLE = 1. A proto3 bool
#                `true` and an enum value 1 are both encoded as a varint 1 under tag 7 (0x38
#                0x01), so the bytes are identical;
#   RangeResponse header = 1 (ResponseHeader: cluster_id = 1, member_id = 2, revision = 3,
#                raft_term = 4), kvs = 2 (mvccpb.KeyValue: key = 1, create_revision = 2,
#                mod_revision = 3, version = 4, value = 5) -- ours: header = 1 (shard_id = 1,
#                member_id = 2, revision = 3, raft_term = 4), kvs = 2 with the same KeyValue
#                numbers, so kv_pb2.RangeResponse parses etcd's answers too (etcd's extra
#                KeyValue.lease = 6 is kept as an unknown field).
# _check_bodies() asserts these encodings byte for byte against a hand-made etcd encoding.


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _varint_field(number: int, value: int) -> bytes:
    return _varint(number << 3 | 0) + _varint(value)


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: not compressed, 4-byte big-endian length."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def _check_bodies(put: bytes, get: bytes, sget: bytes) -> None:
    """The claim above, checked: our serializations are exactly etcd's encodings of
    PutRequest{key, value}, RangeRequest{key} and RangeRequest{key, serializable: true}."""
    etcd_put = _len_field(1, KEY) + _len_field(2, VALUE)
    etcd_get = _len_field(1, KEY)
    etcd_sget = etcd_get + _varint_field(7, 1)  # bool serializable = 7 -> 0x38 0x01
    for name, ours, theirs in (
        ("put", put, etcd_put),
        ("get", get, etcd_get),
        ("serializable get", sget, etcd_sget),
    ):
        if ours != theirs:
            raise SystemExit(f"bench-node: our {name} body differs from etcd's encoding")


# -- rows and results ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    op: str  # "put", "get linearizable", "get serializable"
    body: str  # "put", "get", "sget"
    clients: int  # h2load -c: connections
    streams: int  # h2load -m: concurrent streams per connection

    @property
    def in_flight(self) -> int:
        return self.clients * self.streams

    @property
    def is_put(self) -> bool:
        return self.body == "put"


ROWS = (
    Row("put", "put", 1, 1),
    Row("put", "put", 4, 16),
    Row("put", "put", 16, 64),
    Row("get linearizable", "get", 1, 1),
    Row("get linearizable", "get", 16, 64),
    Row("get serializable", "sget", 1, 1),
    Row("get serializable", "sget", 16, 64),
)
PROFILE_ROW = ROWS[1]  # put, 64 in flight


@dataclass(frozen=True)
class System:
    name: str  # "dkv", "etcd 3.6" or "etcd 3.4"
    put_path: str
    range_path: str

    def path(self, row: Row) -> str:
        return self.put_path if row.is_put else self.range_path

    @property
    def slug(self) -> str:
        """The name without spaces: for directories and process names."""
        return self.name.replace(" ", "")


DKV = System("dkv", "/dkv.v1.KV/Put", "/dkv.v1.KV/Range")
ETCD36 = System("etcd 3.6", "/etcdserverpb.KV/Put", "/etcdserverpb.KV/Range")
ETCD34 = System("etcd 3.4", "/etcdserverpb.KV/Put", "/etcdserverpb.KV/Range")
ETCDS = (ETCD36, ETCD34)  # the primary comparison first


def etcd_binaries(sysm: System) -> EtcdBinaries | None:
    """etcd and etcdctl of ``sysm`` (None: not built / not installed)."""
    return find_etcd36() if sysm is ETCD36 else find_etcd34()


def _norm(name: str) -> str:
    return name.lower().replace(" ", "").replace(".", "")


def select_etcds(names: Sequence[str]) -> tuple[list[System], list[str]]:
    """The etcd systems named (``etcd``: every one that is there, ``etcd 3.6``/``etcd3.6``/
    ``etcd36``, ``etcd 3.4``...), and notes or errors: (systems, notes). A build named
    explicitly but missing is an error (``notes`` starting with "error:"); ``etcd`` skips a
    missing etcd 3.6 with a note."""
    wanted = {_norm(n) for n in names}
    out: list[System] = []
    notes: list[str] = []
    for e in ETCDS:
        explicit = _norm(e.name) in wanted
        if not explicit and "etcd" not in wanted:
            continue
        if etcd_binaries(e) is not None:
            out.append(e)
        elif e is ETCD36:
            how = "run `make etcd36` (needs Go)"
            notes.append(
                f"error: etcd 3.6 is not built; {how}"
                if explicit
                else f"note: etcd 3.6 is not built, so no etcd 3.6 rows; {how}"
            )
        else:
            notes.append("error: etcd 3.4 (etcd, etcdctl) not on PATH")
    return out, notes


def etcd_versions(systems: Sequence[System]) -> str:
    """``etcd Version: 3.6.17 (etcd 3.6)``, ... for the machine line."""
    out = []
    for s in systems:
        b = etcd_binaries(s)
        if b is not None:
            out.append(f"{_version([b.etcd, '--version'])} ({s.name})")
    return ", ".join(out) or "no etcd"


@dataclass(frozen=True)
class H2loadResult:
    requests: int
    seconds: float
    req_per_s: float
    succeeded: int
    failed: int
    errored: int
    timeout: int
    status_2xx: int
    data_bytes: int
    mean_ms: float
    max_ms: float


@dataclass
class RowResult:
    system: str
    op: str
    in_flight: int
    clients: int
    streams: int
    h2load: H2loadResult | None = None
    verified: bool = False
    problems: list[str] = field(default_factory=list)
    # During the measured run, in CPU cores (1.0 = one core busy the whole time): the leader
    # process, and everything on the machine that is NOT ours (the three members, h2load,
    # this script): other people's work that shared the CPUs with the row.
    leader_cpu: float = 0.0
    members_cpu: float = 0.0  # all three members together, the leader included
    other_cpu: float = 0.0


# -- h2load ---------------------------------------------------------------------------------

_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _duration_ms(text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(us|ms|s)", text)
    if m is None:
        raise ValueError(f"not an h2load duration: {text!r}")
    return float(m.group(1)) * _UNIT_MS[m.group(2)]


def parse_h2load(out: str) -> H2loadResult:
    """Parse h2load's summary (nghttp2 1.52's format)."""

    def find(pattern: str) -> re.Match[str]:
        m = re.search(pattern, out, re.MULTILINE)
        if m is None:
            raise ValueError(f"h2load output lacks /{pattern}/:\n{out}")
        return m

    fin = find(r"^finished in ([0-9.]+(?:us|ms|s)), ([0-9.]+) req/s")
    req = find(
        r"^requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout"
    )
    codes = find(r"^status codes: (\d+) 2xx")
    traffic = find(r"^traffic: .*?\((\d+)\) data")
    lat = find(r"^time for request:\s+(\S+)\s+(\S+)\s+(\S+)")
    return H2loadResult(
        requests=int(req.group(1)),
        seconds=_duration_ms(fin.group(1)) / 1e3,
        req_per_s=float(fin.group(2)),
        succeeded=int(req.group(2)),
        failed=int(req.group(3)),
        errored=int(req.group(4)),
        timeout=int(req.group(5)),
        status_2xx=int(codes.group(1)),
        data_bytes=int(traffic.group(1)),
        mean_ms=_duration_ms(lat.group(3)),
        max_ms=_duration_ms(lat.group(2)),
    )


def run_h2load(
    url: str, body_file: Path, row: Row, requests: int, timeout_s: float
) -> H2loadResult:
    cmd = [
        "h2load",
        "-n",
        str(requests),
        "-c",
        str(row.clients),
        "-m",
        str(row.streams),
        "-d",  # a request body makes h2load POST
        str(body_file),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        url,  # http:// -> h2c with prior knowledge
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:  # run() killed h2load
        raise RuntimeError(f"h2load did not finish within {timeout_s:.0f} s: {url}") from exc
    if done.returncode != 0:
        raise RuntimeError(f"h2load exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return parse_h2load(done.stdout)


# -- processes ------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    out: Path
    err: Path
    client_address: str
    member_id: int = 0


class Procs:
    """Every process we start, so that all of them are stopped whatever happens."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def start(
        self,
        name: str,
        cmd: Sequence[str],
        logdir: Path,
        client_address: str,
        env: dict[str, str] | None = None,
    ) -> Proc:
        out, err = logdir / f"{name}.out", logdir / f"{name}.log"
        with out.open("wb") as fo, err.open("wb") as fe:
            popen = subprocess.Popen(
                list(cmd),
                stdout=fo,
                stderr=fe,
                stdin=subprocess.DEVNULL,
                env=env,
                # Own session: a Ctrl-C reaches only us; we stop the children in order.
                start_new_session=True,
            )
        p = Proc(name, popen, out, err, client_address)
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        """SIGTERM every process we started (by PID), SIGKILL what is left after a timeout."""
        live = [p for p in self.procs if p.popen.poll() is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for p in live:
            try:
                p.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.popen.kill()
                p.popen.wait(5)
        self.procs = []


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _ensure_running(procs: Sequence[Proc]) -> None:
    for p in procs:
        if p.popen.poll() is not None:
            raise RuntimeError(
                f"{p.name} exited with {p.popen.returncode}; its log ends:\n{_tail(p.err)}"
            )


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class CpuMeter:
    """CPU used while it runs, in cores: by one process, and by everything that is not ours
    (machine-wide busy time from /proc/stat minus our members, our reaped children such as
    h2load, and this process)."""

    def __init__(self, ours: Sequence[int], watched: int) -> None:
        self.ours = list(ours)
        self.watched = watched
        self.t0 = time.monotonic()
        self.busy0 = machine_busy_s()
        self.procs0 = {pid: proc_cpu_s(pid) for pid in self.ours}
        self.local0 = local_cpu_s()

    def stop(self) -> tuple[float, float, float]:
        """(watched process, all of ``ours``, everything not ours), in cores."""
        wall = max(1e-9, time.monotonic() - self.t0)
        busy = machine_busy_s() - self.busy0
        procs = {pid: proc_cpu_s(pid) - t for pid, t in self.procs0.items()}
        ours = sum(procs.values()) + local_cpu_s() - self.local0
        watched = procs.get(self.watched, 0.0)
        return watched / wall, sum(procs.values()) / wall, max(0.0, busy - ours) / wall


_TICK = os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is already in user)
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / _TICK


def proc_cpu_s(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rpartition(")")[2].split()  # fields[0] is the state (field 3)
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15)


def local_cpu_s() -> float:
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


# -- gRPC probes (a normal client, for verification only) --------------------------------------


def _ident(b: bytes) -> bytes:
    return b


def unary(address: str, path: str, request: bytes) -> bytes:
    """One unary call with raw request bytes; raises grpc.RpcError on a non-OK status."""
    with grpc.insecure_channel(address) as ch:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = ch.unary_unary(
            path, request_serializer=_ident, response_deserializer=_ident
        )
        return call(request, timeout=RPC_TIMEOUT_S)


def _rpc_code(exc: grpc.RpcError) -> str:
    # The sync API raises an object that is both an RpcError and a grpc.Call (the stubs
    # cannot express that): reach the Call methods by name.
    code = getattr(exc, "code", None)
    status = code() if callable(code) else None
    return status.name if isinstance(status, grpc.StatusCode) else "?"


def _trailers(exc: grpc.RpcError) -> dict[str, str]:
    get = getattr(exc, "trailing_metadata", None)
    md = get() if callable(get) else None
    return {str(k): str(v) for k, v in (md or ())}


def read_key(address: str, system: System) -> tuple[int, int]:
    """(store revision, key version) by a linearizable Range at ``address``."""
    raw = unary(address, system.range_path, kv_pb2.RangeRequest(key=KEY).SerializeToString())
    resp = kv_pb2.RangeResponse.FromString(raw)
    version = resp.kvs[0].version if resp.kvs else 0
    return resp.header.revision, version


# -- the two clusters ---------------------------------------------------------------------------


@dataclass
class Cluster:
    system: System
    leader: Proc
    members: list[Proc]


def start_dkv(procs: Procs, root: Path) -> Cluster:
    ports = free_ports(6)
    names = ("n1", "n2", "n3")
    peers = {n: f"127.0.0.1:{ports[i]}" for i, n in enumerate(names)}
    clients = {n: f"127.0.0.1:{ports[3 + i]}" for i, n in enumerate(names)}
    initial = ",".join(f"{n}={a}" for n, a in peers.items())
    members = []
    for n in names:
        cmd = [
            sys.executable,
            "-m",
            "dkv_node.main",
            "--name",
            n,
            "--data-dir",
            str(root / n),
            "--listen-peer",
            peers[n],
            "--listen-client",
            clients[n],
            "--initial-cluster",
            initial,
            "--initial-cluster-state",
            "new",
            "--listen-metrics",
            "127.0.0.1:0",
        ]
        members.append(procs.start(f"dkv-{n}", cmd, root, clients[n]))
    # Ready when each prints "... (id <hex>) serving clients ..." on stdout.
    deadline = time.monotonic() + CLUSTER_START_TIMEOUT_S
    for p in members:
        while True:
            _ensure_running(members)
            m = re.search(r"\(id ([0-9a-f]+)\) serving clients", p.out.read_text(errors="replace"))
            if m:
                p.member_id = int(m.group(1), 16)
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{p.name} not serving after {CLUSTER_START_TIMEOUT_S} s")
            time.sleep(0.1)
    leader = _dkv_leader(members, deadline)
    return Cluster(DKV, leader, members)


def _dkv_leader(members: list[Proc], deadline: float) -> Proc:
    """Put the benchmark key: a follower answers UNAVAILABLE with trailing metadata
    ``dkv-leader-id``; the member that accepts the put (and names itself in the response
    header's member_id) is the leader."""
    by_id = {p.member_id: p for p in members}
    put = kv_pb2.PutRequest(key=KEY, value=VALUE).SerializeToString()
    candidate = members[0]
    last = ""
    while time.monotonic() < deadline:
        _ensure_running(members)
        try:
            resp = kv_pb2.PutResponse.FromString(unary(candidate.client_address, DKV.put_path, put))
        except grpc.RpcError as exc:
            last = f"{candidate.name}: {_rpc_code(exc)}"
            hint = _trailers(exc).get("dkv-leader-id", "")
            nxt = by_id.get(int(hint)) if hint.isdigit() else None
            if nxt is None:  # no leader known yet: try the next member after a pause
                nxt = members[(members.index(candidate) + 1) % len(members)]
                time.sleep(0.2)
            candidate = nxt
            continue
        if resp.header.member_id != candidate.member_id:
            raise RuntimeError(
                f"{candidate.name} answered with member_id {resp.header.member_id:x}, "
                f"expected {candidate.member_id:x}"
            )
        return candidate
    raise RuntimeError(f"no dkv leader within {CLUSTER_START_TIMEOUT_S} s (last: {last})")


def _etcdctl_status(etcdctl: str, endpoints: Sequence[str]) -> list[dict[str, object]]:
    done = subprocess.run(
        [etcdctl, "--endpoints", ",".join(endpoints), "endpoint", "status", "-w", "json"],
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
        env={**_clean_env(), "ETCDCTL_API": "3"},
    )
    if done.returncode != 0:
        return []
    status = json.loads(done.stdout)
    assert isinstance(status, list)
    return status


def _clean_env() -> dict[str, str]:
    """Our environment without ETCD_* / ETCDCTL_* settings that would change etcd's config."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("ETCD_", "ETCDCTL_"))}


def start_etcd(procs: Procs, root: Path, sysm: System = ETCD34) -> Cluster:
    """A 3-member cluster of ``sysm`` (etcd 3.6 or 3.4: the same flags serve both) on
    127.0.0.1, data under ``root``; returns once one leader is agreed and answers a put."""
    binaries = etcd_binaries(sysm)
    if binaries is None:
        raise RuntimeError(f"{sysm.name}: etcd/etcdctl not found")
    ports = free_ports(6)
    names = ("e1", "e2", "e3")
    peers = {n: f"http://127.0.0.1:{ports[i]}" for i, n in enumerate(names)}
    clients = {n: f"127.0.0.1:{ports[3 + i]}" for i, n in enumerate(names)}
    initial = ",".join(f"{n}={u}" for n, u in peers.items())
    members = []
    for n in names:
        cmd = [
            binaries.etcd,
            "--name",
            n,
            "--data-dir",
            str(root / n),
            "--listen-peer-urls",
            peers[n],
            "--initial-advertise-peer-urls",
            peers[n],
            "--listen-client-urls",
            f"http://{clients[n]}",
            "--advertise-client-urls",
            f"http://{clients[n]}",
            "--initial-cluster",
            initial,
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            f"dkv-bench-{os.getpid()}",
        ]
        members.append(procs.start(f"{sysm.slug}-{n}", cmd, root, clients[n], env=_clean_env()))
    deadline = time.monotonic() + CLUSTER_START_TIMEOUT_S
    by_address = {p.client_address: p for p in members}
    while time.monotonic() < deadline:
        _ensure_running(members)
        status = _etcdctl_status(binaries.etcdctl, list(by_address))
        leaders = set()
        for s in status:
            st = s.get("Status")
            if isinstance(st, dict) and isinstance(st.get("header"), dict):
                by_address[str(s.get("Endpoint"))].member_id = int(st["header"]["member_id"])
                leaders.add(int(st.get("leader", 0)))
        if len(status) == len(members) and len(leaders) == 1 and 0 not in leaders:
            leader_id = leaders.pop()
            leader = next(p for p in members if p.member_id == leader_id)
            raw = unary(
                leader.client_address,
                sysm.put_path,
                kv_pb2.PutRequest(key=KEY, value=VALUE).SerializeToString(),
            )
            if kv_pb2.PutResponse.FromString(raw).header.member_id != leader_id:
                raise RuntimeError(
                    f"{sysm.name}'s put was answered by another member than its leader"
                )
            return Cluster(sysm, leader, members)
        time.sleep(0.3)
    raise RuntimeError(f"{sysm.name} cluster without a leader after {CLUSTER_START_TIMEOUT_S} s")


# -- profiling ------------------------------------------------------------------------------


def _py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.is_file() else shutil.which("py-spy")


@dataclass(frozen=True)
class Profile:
    out: Path  # py-spy's raw output
    gil: bool  # only samples holding the GIL (Python CPU time)


@contextlib.contextmanager
def profiled(pid: int, out: Path, gil: bool) -> Iterator[None]:
    """Record ``pid`` with py-spy (raw collapsed stacks, per thread) while the block runs."""
    exe = _py_spy()
    if exe is None:
        print("bench-node: py-spy not found (.venv/bin/pip install py-spy); not profiling")
        yield
        return
    cmd = [exe, "record", "--pid", str(pid), "--format", "raw", "--threads", "--nonblocking"]
    cmd += ["--rate", "100", "-o", str(out)] + (["--gil"] if gil else [])
    spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # let it attach
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait(5)


def summarize_profile(path: Path, top: int = 15, entry: str = "dkv_node/main.py") -> str:
    """Top functions by self samples and, for dkv's own code, by inclusive samples
    (``entry``: the process's entry point, left out of the inclusive list: it holds all)."""
    selfs: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread, frames = frames[0], [re.sub(r":\d+\)$", ")", f) for f in frames[1:]]
        if not frames:
            continue
        total += n
        threads[thread] += n
        selfs[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if total == 0:
        return "  (no samples)"
    lines = [f"  {total} samples; by thread:"]
    lines += [f"    {100 * n / total:5.1f}%  {t}" for t, n in threads.most_common(6)]
    lines.append("  self (where the samples were taken):")
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in selfs.most_common(top)]
    lines.append("  inclusive, dkv code only:")
    ours = [
        (f, n)
        for f, n in incl.most_common()
        if "(dkv" in f and entry not in f  # the entry point holds everything
    ]
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in ours[:top]]
    return "\n".join(lines)


# -- the benchmark --------------------------------------------------------------------------


def _warmup_requests(row: Row) -> int:
    return max(200, 2 * row.in_flight)


def _sized(rate: float, row: Row, seconds: float) -> int:
    n = max(int(rate * seconds), 4 * row.in_flight, 200)
    return math.ceil(n / row.clients) * row.clients  # an equal share per connection


def bench_row(
    cluster: Cluster,
    row: Row,
    bodies: dict[str, Path],
    seconds: float,
    profile: Profile | None = None,
) -> RowResult:
    sysm = cluster.system
    addr = cluster.leader.client_address
    url = f"http://{addr}{sysm.path(row)}"
    body = bodies[row.body]
    res = RowResult(sysm.name, row.op, row.in_flight, row.clients, row.streams)
    warm = run_h2load(url, body, row, _warmup_requests(row), timeout_s=120)
    n = _sized(warm.req_per_s, row, seconds)
    timeout = 10 * seconds + 60
    if row.is_put:
        rev0, ver0 = read_key(addr, sysm)
    else:
        # One call of the very same body through a normal gRPC client: must be OK.
        try:
            probe = unary(addr, sysm.range_path, body.read_bytes()[5:])
        except grpc.RpcError as exc:
            res.problems.append(f"probe Range failed: {_rpc_code(exc)}")
            return res
        kvs = kv_pb2.RangeResponse.FromString(probe).kvs
        if len(kvs) != 1 or kvs[0].value != VALUE:
            res.problems.append("probe Range did not return the benchmark key")
    spy = (
        profiled(cluster.leader.popen.pid, profile.out, profile.gil)
        if profile is not None
        else contextlib.nullcontext()
    )
    meter = CpuMeter([m.popen.pid for m in cluster.members], cluster.leader.popen.pid)
    with spy:
        h = run_h2load(url, body, row, n, timeout)
    res.h2load = h
    res.leader_cpu, res.members_cpu, res.other_cpu = meter.stop()
    if h.succeeded != n or h.status_2xx != n or h.failed or h.errored or h.timeout:
        res.problems.append(
            f"h2load: {h.succeeded}/{n} succeeded, {h.failed} failed, {h.errored} errored, "
            f"{h.timeout} timeout, {h.status_2xx} HTTP 2xx"
        )
    if row.is_put:
        rev1, ver1 = read_key(addr, sysm)
        if ver1 - ver0 != n:
            res.problems.append(f"{n - (ver1 - ver0)} of {n} puts not applied (key version)")
        if rev1 - rev0 != n:
            res.problems.append(f"revision moved by {rev1 - rev0}, not {n}")
    else:
        framed = 5 + len(probe)
        if h.data_bytes != n * framed:
            missing = n - h.data_bytes / framed
            res.problems.append(
                f"≈{missing:.0f} of {n} responses without the {framed}-byte message "
                f"(received {h.data_bytes} data bytes, expected {n * framed}): gRPC errors"
            )
    res.verified = not res.problems
    return res


def bench_system(
    sysm: System,
    rows: Sequence[Row],
    procs: Procs,
    root: Path,
    bodies: dict[str, Path],
    seconds: float,
    profile: Profile | None,
    results: list[RowResult],
    rss: dict[str, int],
) -> None:
    """Start ``sysm``'s cluster, run every row against its leader, record RSS, stop it."""
    sysroot = root / sysm.slug
    sysroot.mkdir()
    cluster = start_dkv(procs, sysroot) if sysm is DKV else start_etcd(procs, sysroot, sysm)
    print(
        f"{sysm.name}: leader {cluster.leader.name} "
        f"(pid {cluster.leader.popen.pid}) at {cluster.leader.client_address}",
        flush=True,
    )
    for row in rows:
        prof = profile if profile is not None and sysm is DKV and row == PROFILE_ROW else None
        try:
            r = bench_row(cluster, row, bodies, seconds, prof)
        except (RuntimeError, grpc.RpcError) as exc:
            r = RowResult(sysm.name, row.op, row.in_flight, row.clients, row.streams)
            r.problems.append(f"{type(exc).__name__}: {exc}")
        results.append(r)
        h = r.h2load
        shown = (
            f"{h.requests:>7} requests {h.req_per_s:>9,.0f} req/s "
            f"mean {h.mean_ms:8.2f} ms max {h.max_ms:8.1f} ms"
            if h
            else ""
        )
        status = "ok" if r.verified else "FAILED: " + "; ".join(r.problems)
        cpu = (
            f"CPU: leader {r.leader_cpu:.2f}, members {r.members_cpu:.2f}, others {r.other_cpu:.2f}"
            if h
            else ""
        )
        print(f"  {r.op:<17} {r.in_flight:>5} in flight  {shown}  {cpu}  {status}", flush=True)
        _ensure_running(cluster.members)
    for m in cluster.members:
        rss[m.name] = rss_kib(m.popen.pid)
    procs.stop_all()


def _fmt_rate(r: RowResult) -> str:
    if r.h2load is None:
        return "FAILED"
    mark = "" if r.verified else " FAILED"
    return f"{r.h2load.req_per_s:,.0f}{mark}"


def _fmt_ms(r: RowResult) -> str:
    return f"{r.h2load.mean_ms:.2f}" if r.h2load is not None else "-"


def _ratio(d: RowResult | None, e: RowResult | None) -> str:
    if d and e and d.h2load and e.h2load and e.h2load.req_per_s > 0:
        return f"{d.h2load.req_per_s / e.h2load.req_per_s:.2f}"
    return "-"


def etcds_in(results: Sequence[RowResult]) -> list[str]:
    """The etcd systems that have results, the primary comparison (etcd 3.6) first."""
    names = dict.fromkeys(r.system for r in results if r.system != DKV.name)
    order = [e.name for e in ETCDS]
    return sorted(names, key=lambda n: order.index(n) if n in order else len(order))


def markdown_table(results: Sequence[RowResult]) -> str:
    """dkv, then each etcd that ran (requests/s, mean ms), then dkv/<each etcd>."""
    by = {(r.system, r.op, r.in_flight): r for r in results}
    systems = [DKV.name, *etcds_in(results)]
    etcds = systems[1:]
    head = "| op | in flight |" + "".join(f" {s} req/s | {s} mean ms |" for s in systems)
    head += "".join(f" dkv/{e} |" for e in etcds)
    lines = [head, "|---|---:|" + "---:|---:|" * len(systems) + "---:|" * len(etcds)]
    for row in ROWS:
        rs = [by.get((s, row.op, row.in_flight)) for s in systems]
        if all(r is None for r in rs):
            continue
        line = f"| {row.op} | {row.in_flight} |"
        line += "".join(f" {_fmt_rate(r) if r else '-'} | {_fmt_ms(r) if r else '-'} |" for r in rs)
        line += "".join(f" {_ratio(rs[0], e)} |" for e in rs[1:])
        lines.append(line)
    return "\n".join(lines)


def details_table(results: Sequence[RowResult]) -> str:
    lines = [
        "| system | op | -c x -m | requests | seconds | req/s | mean ms | max ms "
        "| leader CPU | members' CPU | others' CPU | check |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        h = r.h2load
        check = "ok" if r.verified else "FAILED: " + "; ".join(r.problems)
        if h is None:
            lines.append(
                f"| {r.system} | {r.op} | {r.clients}x{r.streams} | | | | | | | | | {check} |"
            )
            continue
        lines.append(
            f"| {r.system} | {r.op} | {r.clients}x{r.streams} | {h.requests:,} | "
            f"{h.seconds:.1f} | {h.req_per_s:,.0f} | {h.mean_ms:.2f} | {h.max_ms:.1f} | "
            f"{r.leader_cpu:.2f} | {r.members_cpu:.2f} | {r.other_cpu:.2f} | {check} |"
        )
    return "\n".join(lines)


def _version(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def _raise_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that clean up


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument(
        "--seconds",
        type=float,
        default=8.0,
        help="target duration of each measured run (times DKV_BENCH_SCALE)",
    )
    p.add_argument(
        "--systems",
        default="dkv,etcd",
        help="comma-separated: dkv, etcd (each etcd that is there), etcd3.6, etcd3.4",
    )
    p.add_argument("--ops", default="", help="only rows whose op contains this text")
    p.add_argument("--json", action="store_true", help="also print machine-readable results")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (data and logs)")
    args = p.parse_args(argv)

    missing = missing_tools()
    if missing:
        pkgs = " ".join(dict.fromkeys(TOOLS[t] for t in missing))
        print(
            f"bench-node: {', '.join(missing)} not found; install the Debian packages: "
            f"apt-get install {pkgs}",
            file=sys.stderr,
        )
        return 2
    scale = float(os.environ.get("DKV_BENCH_SCALE", "1") or "1")
    seconds = args.seconds * scale
    profile_mode = os.environ.get("DKV_BENCH_PROFILE", "")
    profile_out = Path(tempfile.gettempdir()) / f"dkv-bench-node-profile-{os.getpid()}.txt"
    profile = Profile(profile_out, profile_mode == "gil") if profile_mode else None
    names = [x.strip() for x in args.systems.split(",") if x.strip()]
    known = {"dkv", "etcd", *(_norm(e.name) for e in ETCDS)}
    unknown = [x for x in names if _norm(x) not in known]
    if unknown:
        p.error(f"unknown system(s) {unknown}; choose from dkv, etcd, etcd3.6, etcd3.4")
    etcds, notes = select_etcds(names)
    for note in notes:
        print(f"bench-node: {note}", file=sys.stderr)
    if any(n.startswith("error:") for n in notes):
        return 2
    systems = ([DKV] if "dkv" in {_norm(n) for n in names} else []) + etcds
    rows = [r for r in ROWS if args.ops in r.op]

    put_msg = kv_pb2.PutRequest(key=KEY, value=VALUE).SerializeToString()
    get_msg = kv_pb2.RangeRequest(key=KEY).SerializeToString()
    sget_msg = kv_pb2.RangeRequest(
        key=KEY, consistency=kv_pb2.READ_CONSISTENCY_SERIALIZABLE
    ).SerializeToString()
    _check_bodies(put_msg, get_msg, sget_msg)

    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    signal.signal(signal.SIGHUP, _raise_on_sigterm)
    load = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="dkv-bench-node-"))
    procs = Procs()
    results: list[RowResult] = []
    rss: dict[str, int] = {}
    print(
        f"bench-node: {' then '.join(s.name for s in systems)}, one at a time; 3 members "
        f"each, 1 shard, fsync on, {len(KEY)}-byte key, {len(VALUE)}-byte value, "
        f"~{seconds:g} s per row; data in {root}",
        flush=True,
    )
    try:
        bodies = {}
        for name, msg in (("put", put_msg), ("get", get_msg), ("sget", sget_msg)):
            bodies[name] = root / f"{name}.grpc"
            bodies[name].write_bytes(grpc_frame(msg))
        for sysm in systems:
            try:
                bench_system(sysm, rows, procs, root, bodies, seconds, profile, results, rss)
            except (RuntimeError, grpc.RpcError) as exc:
                # The cluster itself broke (a member died, no leader): say so, go on.
                print(f"!!! {sysm.name}: {type(exc).__name__}: {exc}", flush=True)
                done = {(r.system, r.op, r.in_flight) for r in results}
                for row in rows:
                    if (sysm.name, row.op, row.in_flight) not in done:
                        r = RowResult(sysm.name, row.op, row.in_flight, row.clients, row.streams)
                        r.problems.append(f"not run: {exc}")
                        results.append(r)
            finally:
                procs.stop_all()
    finally:
        procs.stop_all()
        if args.keep:
            print(f"bench-node: kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    print()
    print(markdown_table(results))
    print()
    print(details_table(results))
    print()
    if rss:
        print(
            "RSS after the run (VmRSS): "
            + ", ".join(f"{n} {k / 1024:.0f} MiB" for n, k in rss.items())
        )
    for etcd in etcds_in(results):  # the primary comparison (etcd 3.6) first
        short = [
            f"{d.op} @{d.in_flight}"
            for d in results
            if d.system == DKV.name
            for e in results
            if e.system == etcd and (e.op, e.in_flight) == (d.op, d.in_flight)
            if d.h2load and e.h2load and d.h2load.req_per_s < 0.5 * e.h2load.req_per_s
        ]
        if short:
            print(f"dkv below half of {etcd}: " + ", ".join(short))
    busy = [f"{r.system} {r.op} @{r.in_flight}" for r in results if r.other_cpu > OTHERS_CPU_WARN]
    if busy:
        print(
            f"note: other processes used more than {OTHERS_CPU_WARN} CPU cores during: "
            + ", ".join(busy)
            + " (the machine was shared; those rows are pessimistic)"
        )
    failed = [f"{r.system} {r.op} @{r.in_flight}" for r in results if not r.verified]
    if failed:
        print("!!! VERIFICATION FAILED: " + ", ".join(failed) + " (see the check column)")
    if profile_mode and profile_out.is_file():
        print(f"py-spy profile of the dkv leader, put @{PROFILE_ROW.in_flight} ({profile_out}):")
        print(summarize_profile(profile_out))
    print(
        f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{etcd_versions(etcds)}, {_version(['h2load', '--version'])}, "
        f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
        f"at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    if args.json:
        print(json.dumps({"rows": [asdict(r) for r in results], "rss_kib": rss}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
