"""``make bench-scale``: how dkv holds up as the work grows (issue 12, "as the work grows").

Real ``dkv-node`` processes on 127.0.0.1, started with :mod:`bench.bench_node`'s helpers
(the same 3-member cluster, fsync on), one cluster at a time. Four parts, each printed as
table rows:

1. **load**: N keys (default 1,000,000; ``DKV_BENCH_SCALE`` scales N) with 256-byte values
   are put into a 3-member, 1-shard cluster by a grpc.aio loader (raw request bytes, many
   puts in flight over several connections: h2load sends one body, so one key, per run);
   the load rate is reported and checked with a linearizable count of the keys. bench_node's
   put and linearizable-get rows at 1 and 64 in flight (h2load, verified as there) run before
   the load (the empty cluster) and after it, side by side with the loss in %.
2. **join**: on that loaded shard, a fourth member is added the way
   ``tests/cluster/test_faults.py::test_member_joins_under_load`` does it (Admin MemberAdd:
   a learner; then the process starts with ``--initial-cluster-state existing``); the time
   from its start until its applied index reaches the leader's, and MB/s over the leader's
   data size (Admin Status ``db_size_bytes``, what ``dkv_storage_db_size_bytes`` exports).
3. **restart**: a new cluster with a large ``--snapshot-count`` (the log is never compacted)
   takes puts of incompressible values until a follower's data dir is about 1 GB (scaled);
   that follower is killed (SIGKILL) and restarted: seconds until it serves, until /readyz
   answers 200 and until its applied index is the leader's; with the data dir size and the
   length of its log.
4. **shards**: clusters of 1, 8 and 64 shards (``--shards``): put throughput at 64 in flight
   with the loader spreading keys over every shard (each key sent to its shard's leader), and
   the CPU each member uses while idle for 10 s (from /proc/<pid>/stat).

Every process is ours (stopped by PID), bounded in time; the data lives in a temp dir that is
removed (``--keep`` keeps it). The loader is Python, so its rates are a floor: its own CPU is
printed next to them (it shares the machine's cores with the three members).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio

from bench.bench_node import (
    DKV,
    KEY,
    PROFILE_ROW,
    VALUE,
    Cluster,
    CpuMeter,
    Proc,
    Procs,
    Profile,
    Row,
    RowResult,
    _ensure_running,
    _len_field,
    _raise_on_sigterm,
    _rpc_code,
    bench_row,
    free_ports,
    grpc_frame,
    local_cpu_s,
    missing_tools,
    proc_cpu_s,
    rss_kib,
    start_dkv,
    summarize_profile,
    unary,
)
from dkv.keys import RANGE_LIMIT_DEFAULT
from dkv.sharding import shard_for_key
from dkv.v1 import admin_pb2, kv_pb2

__all__ = [
    "Config",
    "LoadResult",
    "key_for",
    "loss_pct",
    "main",
    "parse_args",
    "put_request",
]

PREFIX = b"scale/"
FULL_KEYS = 1_000_000
FULL_RESTART_BYTES = 1 << 30
ADMIN = "/dkv.v1.Admin"
WAIT_S = 600.0  # the longest any wait (catch-up, restart) may take before it is a failure
# bench_node's put and linearizable-get rows at 1 and 64 in flight.
ROWS = (
    Row("put", "put", 1, 1),
    Row("put", "put", 4, 16),
    Row("get linearizable", "get", 1, 1),
    Row("get linearizable", "get", 4, 16),
)
SHARD_COUNTS = (1, 8, 64)


# -- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    scale: float
    keys: int  # keys loaded in part 1
    value_bytes: int  # their values
    load_in_flight: int  # the loader's concurrency while loading
    load_max_seconds: float  # the load stops there, loaded or not
    connections: int  # the loader's connections per node
    seconds: float  # each h2load row, and each shard-count throughput run
    restart_bytes: int  # part 3's data dir target
    restart_value_bytes: int  # part 3's values (incompressible)
    snapshot_count: int  # part 3's --snapshot-count
    shard_counts: tuple[int, ...]
    idle_seconds: float
    parts: tuple[str, ...]
    keep: bool


PARTS = ("load", "join", "restart", "shards")


def parse_args(argv: Sequence[str] | None = None, env: dict[str, str] | None = None) -> Config:
    """The command line, with ``DKV_BENCH_SCALE`` (from ``env``, default os.environ) scaling
    the key count, the restart's data dir size and the row durations."""
    environ = os.environ if env is None else env
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--keys", type=int, default=FULL_KEYS, help="keys loaded (times the scale)")
    p.add_argument("--value-bytes", type=int, default=len(VALUE))
    p.add_argument("--load-in-flight", type=int, default=256)
    p.add_argument("--load-max-seconds", type=float, default=900.0, help="times the scale, >= 60")
    p.add_argument("--connections", type=int, default=4, help="loader connections per node")
    p.add_argument("--seconds", type=float, default=5.0, help="per row (times the scale, >= 2)")
    p.add_argument(
        "--restart-mb", type=float, default=FULL_RESTART_BYTES / 2**20, help="times the scale"
    )
    p.add_argument("--restart-value-bytes", type=int, default=4 << 10)
    p.add_argument("--snapshot-count", type=int, default=100_000_000)
    p.add_argument("--shards", default=",".join(map(str, SHARD_COUNTS)))
    p.add_argument("--idle-seconds", type=float, default=10.0)
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated: " + ",".join(PARTS))
    p.add_argument("--keep", action="store_true", help="keep the temp dir (data and logs)")
    args = p.parse_args(argv)
    try:
        scale = float(environ.get("DKV_BENCH_SCALE", "1") or "1")
    except ValueError:
        p.error("DKV_BENCH_SCALE must be a number")
    if not scale > 0:
        p.error("DKV_BENCH_SCALE must be positive")
    parts = tuple(x.strip() for x in args.parts.split(",") if x.strip())
    bad = [x for x in parts if x not in PARTS]
    if bad:
        p.error(f"unknown part(s) {bad}; choose from {', '.join(PARTS)}")
    if "join" in parts and "load" not in parts:
        p.error("the join part needs the load part (it joins the loaded shard)")
    try:
        shards = tuple(int(x) for x in args.shards.split(",") if x.strip())
    except ValueError:
        p.error("--shards takes comma-separated integers")
    if not shards or any(not 1 <= s <= 1024 for s in shards):
        p.error("--shards: each between 1 and 1024")
    return Config(
        scale=scale,
        keys=max(1, round(args.keys * scale)),
        value_bytes=args.value_bytes,
        load_in_flight=args.load_in_flight,
        load_max_seconds=max(60.0, args.load_max_seconds * scale),
        connections=args.connections,
        seconds=max(2.0, args.seconds * scale),
        restart_bytes=max(1 << 20, round(args.restart_mb * scale * 2**20)),
        restart_value_bytes=args.restart_value_bytes,
        snapshot_count=args.snapshot_count,
        shard_counts=shards,
        idle_seconds=args.idle_seconds,
        parts=parts,
        keep=args.keep,
    )


# -- the loader ------------------------------------------------------------------------------


def key_for(i: int, prefix: bytes = PREFIX) -> bytes:
    """The i-th key loaded: ``scale/00000042`` (14 bytes)."""
    return prefix + b"%08d" % i


def put_request(key: bytes, value: bytes) -> bytes:
    """A serialized dkv.v1.PutRequest{key, value}, encoded by hand (no message object per
    put): the loader's client CPU is the floor of its rate."""
    return _len_field(1, key) + _len_field(2, value)


@dataclass
class LoadResult:
    puts: int = 0
    failed: int = 0
    retried: int = 0
    seconds: float = 0.0
    client_cpu: float = 0.0  # cores used by this process (the loader) meanwhile
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.puts / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Route:
    """Where each shard's puts go: its leader's client address."""

    shards: int
    leaders: dict[int, str]  # shard -> its leader's client address
    members: dict[int, str] = field(default_factory=dict)  # member id -> client address

    def address(self, key: bytes) -> str:
        return self.leaders[shard_for_key(key, self.shards)]


def _admin(address: str, method: str, req: bytes) -> bytes:
    return unary(address, f"{ADMIN}/{method}", req)


def status(address: str) -> admin_pb2.StatusResponse:
    raw = _admin(address, "Status", admin_pb2.StatusRequest().SerializeToString())
    return admin_pb2.StatusResponse.FromString(raw)


def route(cluster: Cluster, shards: int, deadline: float) -> Route:
    """Each shard's leader, as the members' Admin Status say (waits until all have one)."""
    while True:
        _ensure_running(cluster.members)
        by_id = {m.member_id: m.client_address for m in cluster.members}
        leaders: dict[int, str] = {}
        for m in cluster.members:
            with contextlib.suppress(grpc.RpcError):
                for s in status(m.client_address).shards:
                    if s.role == admin_pb2.ROLE_LEADER and s.leader_id in by_id:
                        leaders[s.shard_id] = by_id[s.leader_id]
        if len(leaders) == shards:
            return Route(shards, leaders, by_id)
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(leaders)} of {shards} shards have a leader")
        time.sleep(0.2)


def follow_leader(cluster: Cluster) -> None:
    """Point ``cluster.leader`` at shard 1's leader now (it may have moved under load)."""
    address = route(cluster, 1, time.monotonic() + 60).leaders[1]
    cluster.leader = next(m for m in cluster.members if m.client_address == address)


def _channel(address: str, i: int) -> grpc.aio.Channel:
    # A local subchannel pool: each channel gets its own connection.
    return grpc.aio.insecure_channel(
        address, options=[("grpc.use_local_subchannel_pool", 1), ("grpc.dkv_bench_conn", i)]
    )


async def _load(
    rt: Route,
    keys: Sequence[bytes] | range,
    value: bytes,
    in_flight: int,
    connections: int,
    until: float | None,
    stop_at: float | None,
    refresh: Callable[[], Route] | None,
    progress: str,
) -> LoadResult:
    """The loader: ``in_flight`` workers, each putting the next key and waiting for it. A put
    answered UNAVAILABLE goes again to the leader the answer names (``dkv-leader-id``) or,
    without a hint, after a pause to the leaders one shared ``refresh()`` finds."""
    chans: dict[str, list[grpc.aio.Channel]] = {}
    calls: dict[str, list[grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]]] = {}

    def call(addr: str, w: int) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
        if addr not in calls:
            chans[addr] = [_channel(addr, j) for j in range(connections)]
            calls[addr] = [c.unary_unary("/dkv.v1.KV/Put") for c in chans[addr]]  # raw bytes
        return calls[addr][w % connections]

    res = LoadResult()
    nxt = 0
    total = len(keys)
    loop = asyncio.get_running_loop()
    pending: asyncio.Future[Route] | None = None

    async def refreshed() -> None:
        nonlocal pending, rt
        if refresh is None:
            return
        if pending is None or pending.done():
            pending = asyncio.ensure_future(asyncio.to_thread(refresh))
        # No leader found in time: keep the old route, and try again after the next failure.
        with contextlib.suppress(RuntimeError):
            rt = await asyncio.shield(pending)

    def stopped() -> bool:
        now = loop.time()
        if (until is not None and now >= until) or (stop_at is not None and now >= stop_at):
            return True
        return until is None and nxt >= total

    async def worker(w: int) -> None:
        nonlocal nxt
        while not stopped():
            k = keys[nxt % total]
            nxt += 1
            key = k if isinstance(k, bytes) else key_for(k)
            body = put_request(key, value)
            for attempt in range(50):
                addr = rt.address(key)
                try:
                    await call(addr, w)(body, timeout=30)
                    res.puts += 1
                    break
                except grpc.aio.AioRpcError as exc:
                    name = exc.code().name
                    res.errors[name] = res.errors.get(name, 0) + 1
                    if exc.code() != grpc.StatusCode.UNAVAILABLE or refresh is None:
                        res.failed += 1
                        break
                    res.retried += 1
                    hint = dict(exc.trailing_metadata() or ()).get("dkv-leader-id", "")
                    moved = rt.members.get(int(hint)) if str(hint).isdigit() else None
                    if moved and moved != addr:
                        rt.leaders[shard_for_key(key, rt.shards)] = moved
                        continue
                    await asyncio.sleep(min(1.0, 0.1 * (attempt + 1)))
                    await refreshed()
            else:
                res.failed += 1

    async def report() -> None:
        t0 = loop.time()
        while True:
            await asyncio.sleep(60)
            elapsed = loop.time() - t0
            errs = sum(res.errors.values())
            _say(f"  {progress}: {res.puts:,} puts in {elapsed:.0f} s, {errs} errors so far")

    cpu0, t0 = local_cpu_s(), time.monotonic()
    reporter = asyncio.create_task(report()) if progress else None
    try:
        await asyncio.gather(*(worker(w) for w in range(in_flight)))
    finally:
        if reporter is not None:
            reporter.cancel()
        res.seconds = time.monotonic() - t0
        res.client_cpu = (local_cpu_s() - cpu0) / max(1e-9, res.seconds)
        for cs in chans.values():
            for c in cs:
                await c.close()
    return res


def load(
    rt: Route,
    keys: Sequence[bytes] | range,
    value: bytes,
    in_flight: int,
    connections: int,
    seconds: float | None = None,
    refresh: Callable[[], Route] | None = None,
    max_seconds: float | None = None,
    progress: str = "",
) -> LoadResult:
    """Put every key of ``keys`` (ints are numbered with :func:`key_for`) once, or, with
    ``seconds``, cycle over them for that long; ``in_flight`` puts at once; never longer than
    ``max_seconds``. ``progress``: a line every minute, under that name."""

    async def run() -> LoadResult:
        now = asyncio.get_running_loop().time()
        until = None if seconds is None else now + seconds
        stop_at = None if max_seconds is None else now + max_seconds
        return await _load(
            rt, keys, value, in_flight, connections, until, stop_at, refresh, progress
        )

    return asyncio.run(run())


# -- cluster helpers ---------------------------------------------------------------------------


@contextlib.contextmanager
def node_flags(**flags: object) -> Iterator[None]:
    """Extra dkv-node flags for the members :func:`bench_node.start_dkv` starts, as the
    DKV_<FLAG> variables every flag reads (the members inherit our environment)."""
    names = {"DKV_" + k.upper(): str(v) for k, v in flags.items()}
    old = {k: os.environ.get(k) for k in names}
    os.environ.update(names)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def member_name(p: Proc) -> str:
    return p.name.removeprefix("dkv-")


def dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += (Path(dirpath) / f).stat().st_size
    return total


def count_keys(address: str, prefix: bytes) -> int:
    """Keys under ``prefix``, by linearizable counts at ``address``, page by page (pages of
    the default size: a page is read in the node's event loop)."""
    total = 0
    req = kv_pb2.RangeRequest(prefix=prefix, count_only=True, limit=RANGE_LIMIT_DEFAULT)
    with grpc.insecure_channel(address) as ch:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = ch.unary_unary(
            DKV.range_path, request_serializer=_ident, response_deserializer=_ident
        )
        while True:
            resp = kv_pb2.RangeResponse.FromString(call(req.SerializeToString(), timeout=60))
            total += resp.count
            if not resp.more:
                return total
            req.continuation = resp.continuation


def _ident(b: bytes) -> bytes:
    return b


def applied(address: str, shard: int = 1) -> int | None:
    """The applied index of ``shard`` at ``address`` (None: no answer / not hosted yet)."""
    try:
        st = status(address)
    except grpc.RpcError:
        return None
    for s in st.shards:
        if s.shard_id == shard:
            return int(s.applied_index)
    return None


def wait_applied(address: str, target: int, proc: Proc, deadline: float) -> None:
    while True:
        _ensure_running([proc])
        got = applied(address)
        if got is not None and got >= target:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name}: applied {got}, not {target}, in time")
        time.sleep(0.05)


def ready(metrics_address: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{metrics_address}/readyz", timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _serving(p: Proc) -> bool:
    return "serving clients" in p.out.read_text(errors="replace")


def _with_flag(cmd: Sequence[str], flag: str, value: str) -> list[str]:
    out = list(cmd)
    if flag in out:
        out[out.index(flag) + 1] = value
    else:
        out += [flag, value]
    return out


# -- figures ---------------------------------------------------------------------------------


def loss_pct(before: float, after: float) -> float:
    """How much lower ``after`` is than ``before``, in % (negative: it is higher)."""
    return 100.0 * (before - after) / before if before > 0 else math.nan


def _rate(r: RowResult) -> float:
    return r.h2load.req_per_s if r.h2load is not None else 0.0


def row_line(r: RowResult) -> str:
    """One h2load row alone, as it is measured (before the loaded one exists)."""
    h = r.h2load
    shown = f"{h.req_per_s:,.0f} req/s, mean {h.mean_ms:.2f} ms" if h else "no result"
    check = "ok" if r.verified else "FAILED: " + "; ".join(r.problems)
    return f"{r.op} @{r.in_flight}: {shown}, others' CPU {r.other_cpu:.2f}; {check}"


def row_pair(empty: RowResult, loaded: RowResult, keys: int) -> str:
    """One markdown row: the same h2load row on the empty and on the loaded cluster."""

    def cell(r: RowResult) -> str:
        if r.h2load is None:
            return "FAILED | -"
        mark = "" if r.verified else " FAILED"
        return f"{r.h2load.req_per_s:,.0f}{mark} | {r.h2load.mean_ms:.2f}"

    loss = loss_pct(_rate(empty), _rate(loaded))
    ok = [x for x in (empty, loaded) if not x.verified]
    check = "ok" if not ok else "FAILED: " + "; ".join(p for x in ok for p in x.problems)
    return (
        f"| {empty.op} | {empty.in_flight} | {cell(empty)} | {keys:,} | {cell(loaded)} | "
        f"{loss:.1f}% | {empty.other_cpu:.2f} / {loaded.other_cpu:.2f} | {check} |"
    )


ROW_PAIR_HEAD = (
    "| op | in flight | empty req/s | empty mean ms | keys loaded | loaded req/s "
    "| loaded mean ms | loss | others' CPU (empty / loaded) | check |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
)


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def mb_per_s(nbytes: int, seconds: float) -> float:
    """MB/s (10^6 bytes) of ``nbytes`` moved in ``seconds``."""
    return nbytes / 1e6 / seconds if seconds > 0 else math.nan


def load_line(what: str, r: LoadResult) -> str:
    errs = ", ".join(f"{k} {v}" for k, v in sorted(r.errors.items())) or "none"
    return (
        f"| {what} | {r.puts:,} | {r.seconds:.1f} | {r.rate:,.0f} | {r.client_cpu:.2f} | "
        f"{r.failed} | {errs} |"
    )


LOAD_HEAD = (
    "| load | puts | seconds | puts/s | loader CPU (cores) | failed | errors (retried) |\n"
    "|---|---:|---:|---:|---:|---:|---|"
)


def _say(line: str) -> None:
    print(line, flush=True)


# -- the parts -------------------------------------------------------------------------------


def _bench_rows(
    cluster: Cluster, bodies: dict[str, Path], seconds: float, profile: Profile | None = None
) -> list[RowResult]:
    """The rows; with ``profile``, py-spy records the leader during the put row at 64 in
    flight (as ``make bench-node`` does with DKV_BENCH_PROFILE)."""
    out = []
    for row in ROWS:
        prof = profile if row == PROFILE_ROW else None
        try:
            r = bench_row(cluster, row, bodies, seconds, prof)
        except (RuntimeError, grpc.RpcError) as exc:
            r = RowResult(DKV.name, row.op, row.in_flight, row.clients, row.streams)
            r.problems.append(f"{type(exc).__name__}: {exc}")
        out.append(r)
        _ensure_running(cluster.members)
    return out


def part_load(
    cfg: Config, procs: Procs, root: Path, bodies: dict[str, Path], failures: list[str]
) -> Cluster:
    d = root / "load"
    d.mkdir()
    cluster = start_dkv(procs, d)
    _say(f"\n## 1. {cfg.keys:,} keys loaded ({cfg.value_bytes}-byte values), 3 members, 1 shard")
    empty = _bench_rows(cluster, bodies, cfg.seconds)
    _say("bench_node's rows on the empty cluster:")
    for e in empty:
        _say(f"  {row_line(e)}")

    def refresh() -> Route:
        return route(cluster, 1, time.monotonic() + 30)

    value = os.urandom(cfg.value_bytes)
    term0 = status(cluster.leader.client_address).shards[0].term
    meter = CpuMeter([m.popen.pid for m in cluster.members], cluster.leader.popen.pid)
    res = load(
        refresh(),
        range(cfg.keys),
        value,
        cfg.load_in_flight,
        cfg.connections,
        refresh=refresh,
        max_seconds=cfg.load_max_seconds,
        progress="load",
    )
    cpu_leader, cpu_members, cpu_others = meter.stop()
    follow_leader(cluster)
    term1 = status(cluster.leader.client_address).shards[0].term
    count = count_keys(cluster.leader.client_address, PREFIX)
    follow_leader(cluster)  # the rows go to the leader of now
    _say(LOAD_HEAD)
    _say(load_line(f"{cfg.keys:,} keys, {cfg.load_in_flight} in flight", res))
    term2 = status(cluster.leader.client_address).shards[0].term
    _say(
        f"CPU during the load (cores): first leader {cpu_leader:.2f}, the 3 members "
        f"{cpu_members:.2f}, processes not ours {cpu_others:.2f}"
    )
    _say(f"Raft term of the shard: {term0} before the load, {term1} after, {term2} after the count")
    if res.puts < cfg.keys:
        failures.append(
            f"load: only {res.puts:,} of {cfg.keys:,} keys put within {cfg.load_max_seconds:.0f} s"
        )
        _say(f"!!! {failures[-1]}; the rows below ran with {count:,} keys")
    if not res.puts <= count <= res.puts + res.failed + cfg.load_in_flight:
        failures.append(f"load: {count:,} keys counted, {res.puts:,} puts succeeded")
        _say(f"!!! {failures[-1]}")
    else:
        _say(f"(checked: a linearizable count finds {count:,} keys)")
    st = status(cluster.leader.client_address)
    _say(f"leader's data: {mib(st.db_size_bytes)} (db_size_bytes), dir {mib(dir_bytes(d / 'n1'))}")
    mode = os.environ.get("DKV_BENCH_PROFILE", "")
    profile = Profile(root / "profile-loaded-put64.txt", mode == "gil") if mode else None
    loaded = _bench_rows(cluster, bodies, cfg.seconds, profile)
    follow_leader(cluster)
    rss = ", ".join(
        f"{member_name(m)} {rss_kib(m.popen.pid) / 1024:.0f} MiB" for m in cluster.members
    )
    _say(f"RSS after the loaded rows (VmRSS): {rss}")
    _say("")
    _say(ROW_PAIR_HEAD)
    for e, lo in zip(empty, loaded, strict=True):
        _say(row_pair(e, lo, count))
    if profile is not None and profile.out.is_file():
        _say(f"\npy-spy profile of the leader, loaded put @{PROFILE_ROW.in_flight}:")
        _say(summarize_profile(profile.out))
        if not (e.verified and lo.verified):
            failures.append(f"load: {e.op} @{e.in_flight}")
    return cluster


def part_join(cluster: Cluster, procs: Procs, root: Path, failures: list[str]) -> None:
    leader = cluster.leader.client_address
    _say("\n## 2. A fourth member catches up on the loaded shard (learner, by snapshot)")
    members = admin_pb2.MemberListResponse.FromString(
        _admin(leader, "MemberList", admin_pb2.MemberListRequest().SerializeToString())
    ).members
    peer4, client4 = (f"127.0.0.1:{p}" for p in free_ports(2))
    initial = ",".join([*(f"{m.name}={m.peer_address}" for m in members), f"n4={peer4}"])
    add = admin_pb2.MemberAddRequest(name="n4", peer_address=peer4).SerializeToString()
    added = admin_pb2.MemberAddResponse.FromString(_admin(leader, "MemberAdd", add))
    st = status(leader)
    target = st.shards[0].applied_index
    data = st.db_size_bytes
    cmd = [
        sys.executable,
        "-m",
        "dkv_node.main",
        "--name",
        "n4",
        "--data-dir",
        str(root / "load" / "n4"),
        "--listen-peer",
        peer4,
        "--listen-client",
        client4,
        "--initial-cluster",
        initial,
        "--initial-cluster-state",
        "existing",
        "--listen-metrics",
        "127.0.0.1:0",
    ]
    t0 = time.monotonic()
    p = procs.start("dkv-n4", cmd, root / "load", client4)
    deadline = t0 + WAIT_S
    while not _serving(p):
        _ensure_running([p])
        if time.monotonic() > deadline:
            raise RuntimeError("n4 not serving in time")
        time.sleep(0.05)
    serving = time.monotonic() - t0
    wait_applied(client4, target, p, deadline)
    caught = time.monotonic() - t0
    st4 = status(client4)
    snap = st4.shards[0].snapshot_index if st4.shards else 0
    how = f"snapshot at index {snap:,}" if snap else "NO snapshot (caught up from the log)"
    _say(
        "| learner (member id) | leader's applied index | leader's data (db_size_bytes) "
        "| serving after | caught up after | MB/s of it | how | n4's data dir | MB/s of that |\n"
        "|---|---:|---:|---:|---:|---:|---|---:|---:|"
    )
    got = dir_bytes(root / "load" / "n4")
    _say(
        f"| n4 ({added.member.id:x}, learner: {added.member.is_learner}) | {target:,} | "
        f"{mib(data)} | {serving:.1f} s | {caught:.1f} s | {mb_per_s(data, caught):.1f} | "
        f"{how} | {mib(got)} | {mb_per_s(got, caught):.1f} |"
    )
    if not snap:
        failures.append("join: the learner caught up without a snapshot")


def part_restart(cfg: Config, procs: Procs, root: Path, failures: list[str]) -> None:
    d = root / "restart"
    d.mkdir()
    _say(
        f"\n## 3. Restart after kill -9 on a ~{mib(cfg.restart_bytes)} data dir "
        f"(--snapshot-count {cfg.snapshot_count:,}, {cfg.restart_value_bytes:,}-byte "
        "incompressible values)"
    )
    with node_flags(snapshot_count=cfg.snapshot_count):
        cluster = start_dkv(procs, d)
    watched = next(m for m in cluster.members if m is not cluster.leader)

    def refresh() -> Route:
        return route(cluster, 1, time.monotonic() + 30)

    value = os.urandom(cfg.restart_value_bytes)
    chunk = max(256, cfg.restart_bytes // cfg.restart_value_bytes // 20)
    done = 0
    puts = LoadResult()
    deadline = time.monotonic() + WAIT_S
    while dir_bytes(d / member_name(watched)) < cfg.restart_bytes:
        if time.monotonic() > deadline:
            failures.append(f"restart: the data dir did not grow to the target in {WAIT_S:.0f} s")
            _say(f"!!! {failures[-1]}")
            break
        keys = [key_for(i, b"big/") for i in range(done, done + chunk)]
        r = load(refresh(), keys, value, 64, cfg.connections, refresh=refresh)
        done += chunk
        puts.puts += r.puts
        puts.failed += r.failed
        puts.seconds += r.seconds
        _ensure_running(cluster.members)
    follow_leader(cluster)
    follower = (
        watched
        if watched is not cluster.leader
        else next(m for m in cluster.members if m is not cluster.leader)
    )
    fdir = d / member_name(follower)
    target = status(cluster.leader.client_address).shards[0].applied_index
    wait_applied(follower.client_address, target, follower, time.monotonic() + WAIT_S)
    fst = status(follower.client_address).shards[0]
    size = dir_bytes(fdir)
    _say(
        f"written: {puts.puts:,} puts in {puts.seconds:.1f} s ({puts.rate:,.0f}/s, "
        f"{mb_per_s(puts.puts * cfg.restart_value_bytes, puts.seconds):.1f} MB/s of values), "
        f"{puts.failed} failed"
    )
    follower.popen.kill()  # SIGKILL, by PID
    follower.popen.wait(10)
    (metrics_port,) = free_ports(1)
    maddr = f"127.0.0.1:{metrics_port}"
    cmd = _with_flag(follower.popen.args, "--initial-cluster-state", "existing")  # type: ignore[arg-type]
    cmd = _with_flag(cmd, "--listen-metrics", maddr)
    t0 = time.monotonic()
    p = procs.start(f"{follower.name}-restarted", cmd, d, follower.client_address)
    cluster.members[cluster.members.index(follower)] = p
    t_serving = t_ready = None
    limit = t0 + WAIT_S
    while t_ready is None or t_serving is None:
        _ensure_running([p])
        now = time.monotonic()
        if t_serving is None and _serving(p):
            t_serving = now - t0
        if t_ready is None and ready(maddr):
            t_ready = time.monotonic() - t0
        if now > limit:
            raise RuntimeError(f"{p.name} not ready within {WAIT_S:.0f} s")
        time.sleep(0.02)
    wait_applied(p.client_address, target, p, limit)
    caught = time.monotonic() - t0
    _say(
        "| follower | data dir | log entries (first..last) | applied | serving after "
        "| /readyz 200 after | caught up after |\n|---|---:|---:|---:|---:|---:|---:|"
    )
    _say(
        f"| {member_name(follower)} | {mib(size)} | {fst.log_entries:,} "
        f"({fst.first_index:,}..{fst.last_index:,}) | {fst.applied_index:,} | "
        f"{t_serving:.1f} s | {t_ready:.1f} s | {caught:.1f} s |"
    )
    if size < 0.9 * cfg.restart_bytes:
        failures.append(f"restart: the data dir reached only {mib(size)}")
    procs.stop_all()


def part_shards(cfg: Config, procs: Procs, root: Path, failures: list[str]) -> None:
    _say(
        f"\n## 4. Shards: puts at 64 in flight over keys of every shard (loader, "
        f"{cfg.seconds:g} s), then each member's CPU while idle ({cfg.idle_seconds:g} s)"
    )
    _say(
        "| shards | puts/s | failed | loader CPU | idle CPU per member (cores) "
        "| idle CPU, all 3 | RSS per member |\n|---:|---:|---:|---:|---|---:|---|"
    )
    value = os.urandom(cfg.value_bytes)
    for n in cfg.shard_counts:
        d = root / f"shards{n}"
        d.mkdir()
        with node_flags(shards=n):
            cluster = start_dkv(procs, d)
        try:

            def refresh(c: Cluster = cluster, n: int = n) -> Route:
                return route(c, n, time.monotonic() + 30)

            rt = refresh()
            keys = range(max(10_000, 64 * n))
            load(rt, keys, value, 64, cfg.connections, seconds=1.0, refresh=refresh)  # warm-up
            r = load(rt, keys, value, 64, cfg.connections, seconds=cfg.seconds, refresh=refresh)
            time.sleep(2.0)  # let the last appends and their acknowledgements settle
            pids = [m.popen.pid for m in cluster.members]
            c0, t0 = [proc_cpu_s(pid) for pid in pids], time.monotonic()
            time.sleep(cfg.idle_seconds)
            wall = time.monotonic() - t0
            idle = [(proc_cpu_s(pid) - c) / wall for pid, c in zip(pids, c0, strict=True)]
            _ensure_running(cluster.members)
            rss = ", ".join(f"{rss_kib(pid) / 1024:.0f} MiB" for pid in pids)
            _say(
                f"| {n} | {r.rate:,.0f} | {r.failed} | {r.client_cpu:.2f} | "
                f"{', '.join(f'{c:.3f}' for c in idle)} | {sum(idle):.3f} | {rss} |"
            )
            if r.failed:
                failures.append(f"shards {n}: {r.failed} puts failed")
        finally:
            procs.stop_all()


# -- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    if "load" in cfg.parts and missing_tools()[:1] == ["h2load"]:
        print("bench-scale: h2load not found; apt-get install nghttp2-client", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    signal.signal(signal.SIGHUP, _raise_on_sigterm)
    load0 = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="dkv-bench-scale-"))
    procs = Procs()
    failures: list[str] = []
    _say(
        f"bench-scale: DKV_BENCH_SCALE={cfg.scale:g}: {cfg.keys:,} keys, restart at "
        f"{mib(cfg.restart_bytes)}, shards {cfg.shard_counts}, rows ~{cfg.seconds:g} s; "
        f"parts {', '.join(cfg.parts)}; data in {root}"
    )
    t_start = time.monotonic()
    try:
        bodies = {}
        put_msg = kv_pb2.PutRequest(key=KEY, value=VALUE).SerializeToString()
        get_msg = kv_pb2.RangeRequest(key=KEY).SerializeToString()
        for name, msg in (("put", put_msg), ("get", get_msg)):
            bodies[name] = root / f"{name}.grpc"
            bodies[name].write_bytes(grpc_frame(msg))
        steps: list[tuple[str, Callable[[], object]]] = [
            ("load", lambda: part_load(cfg, procs, root, bodies, failures)),
            ("restart", lambda: part_restart(cfg, procs, root, failures)),
            ("shards", lambda: part_shards(cfg, procs, root, failures)),
        ]
        for name, step in steps:
            if name not in cfg.parts:
                continue
            try:
                out = step()
                if name == "load" and "join" in cfg.parts and isinstance(out, Cluster):
                    part_join(out, procs, root, failures)
            except (RuntimeError, grpc.RpcError) as exc:
                detail = _rpc_code(exc) if isinstance(exc, grpc.RpcError) else ""
                failures.append(f"{name}: {type(exc).__name__} {detail}: {exc}")
                _say(f"!!! {failures[-1]}")
            finally:
                procs.stop_all()
    finally:
        procs.stop_all()
        if cfg.keep:
            print(f"bench-scale: kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    _say(
        f"\nmachine: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average at start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, at end "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; {time.monotonic() - t_start:.0f} s"
    )
    if failures:
        _say("!!! FAILED: " + "; ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
