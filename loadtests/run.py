"""``make loadtest``: a bounded, headless locust run against a dkv front door, then a summary.

    .venv/bin/python -m loadtests.run                      # make run's stack, 30 s, 8 users
    .venv/bin/python -m loadtests.run --run-time 2m --users 32 --distribution zipf
    .venv/bin/python -m loadtests.run --front-door host:port --cacert ca.crt \\
        --cert client.crt --key client.key                 # any front door with mTLS
    .venv/bin/python -m loadtests.run --plaintext --front-door 127.0.0.1:8080

Locust runs in its own process (``python -m locust -f loadtests/locustfile.py --headless``:
gevent monkey-patches the whole process it runs in) and writes its JSON and HTML reports into
``--out`` (``.dkv/loadtest/<run>/`` by default: ``locust.json``, ``locust.html``,
``writes.json``, every key written with its writes, and ``errors.json``, the failures). It
is bounded: ``--run-time`` (at most 1 h), then ``--stop-timeout`` for the calls in flight,
and killed if it has not exited 60 s after that. Then every key of the run is read back
through the front door over gRPC (``dkv.client``) and checked against what was written
(:func:`loadtests.workload.check_read_back`).

The summary is one line per protocol and request name (count, failures, requests/s, latency
percentiles in ms). The exit status is 0 only when locust exited 0, no request failed, every
operation with a weight made requests with each protocol, and the read-back found every
acknowledged write.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dkv.client import Client, ClientTls
from dkv.devstack import CLIENT_NAME, DevLayout
from dkv.errors import DkvError
from dkv.v1 import kv_pb2
from loadtests.workload import (
    DEFAULT_WEIGHTS,
    OPERATIONS,
    ReadBack,
    check_read_back,
    parse_weights,
    prefix_end,
)

__all__ = ["Summary", "main", "read_back", "summarize"]

REPO = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).with_name("locustfile.py")
USER_CLASSES = {"grpc": "GrpcUser", "http": "JsonUser"}
RUN_TIME_MAX_S = 3600
KILL_AFTER_S = 60  # past run time + stop timeout: locust is stuck, kill it


def parse_duration(text: str) -> int:
    """``"30s"``, ``"2m"``, ``"1h30m"`` or ``"45"`` (seconds) -> seconds, as locust's ``-t``."""
    m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?", text.strip())
    if not text.strip() or m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30s, 2m or 1h")
    h, mi, s = (int(g or 0) for g in m.groups())
    seconds = h * 3600 + mi * 60 + s
    if not 1 <= seconds <= RUN_TIME_MAX_S:
        raise argparse.ArgumentTypeError(f"run time must be 1 s to {RUN_TIME_MAX_S} s")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    dev = DevLayout(Path(".dkv"))
    p = argparse.ArgumentParser(
        prog="python -m loadtests.run",
        description="A bounded headless locust run against a dkv front door (docs/loadtests.md).",
    )
    p.add_argument(
        "--root",
        type=Path,
        default=dev.root,
        help="make run's root: its certificates are the defaults (%(default)s)",
    )
    p.add_argument(
        "--front-door",
        default=f"127.0.0.1:{dev.front_door}",
        help="host:port of Envoy (%(default)s, make run's)",
    )
    p.add_argument("--cacert", type=Path, help="CA certificate (default ROOT/certs/ca.crt)")
    p.add_argument("--cert", type=Path, help=f"client certificate (ROOT/certs/{CLIENT_NAME}.crt)")
    p.add_argument("--key", type=Path, help=f"its key (ROOT/certs/{CLIENT_NAME}.key)")
    p.add_argument("--plaintext", action="store_true", help="no TLS (a front door without it)")
    p.add_argument(
        "--protocols",
        default="grpc,http",
        help="user kinds, comma-separated: grpc, http (%(default)s; users split evenly)",
    )
    p.add_argument("--users", type=int, default=8, help="concurrent users (%(default)s)")
    p.add_argument("--spawn-rate", type=float, default=8, help="users started per second")
    p.add_argument("--run-time", type=parse_duration, default=30, help="e.g. 30s, 2m (default 30s)")
    p.add_argument(
        "--stop-timeout", type=int, default=5, help="seconds for calls in flight at the end"
    )
    p.add_argument("--keys", type=int, default=10_000, help="size of the key space")
    p.add_argument("--distribution", choices=["uniform", "zipf"], default="uniform")
    p.add_argument("--zipf-s", type=float, default=1.1, help="Zipf exponent (%(default)s)")
    p.add_argument("--value-size", type=int, default=256, help="bytes per value")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help="operation mix (%(default)s)")
    p.add_argument("--range-limit", type=int, default=10, help="keys per range")
    p.add_argument("--serializable-reads", action="store_true")
    p.add_argument("--timeout", type=float, default=10.0, help="deadline per call, seconds")
    p.add_argument("--seed", default="", help="seed the users' choices")
    p.add_argument("--key-prefix", default="", help="default: loadtest/<run>/")
    p.add_argument("--out", type=Path, help="reports directory (default ROOT/loadtest/<run>)")
    p.add_argument("--no-read-back", action="store_true", help="skip reading the written keys back")
    p.add_argument(
        "locust_args",
        nargs=argparse.REMAINDER,
        help="after --: more locust flags, passed as they are",
    )
    return p


@dataclass(frozen=True)
class Row:
    protocol: str
    name: str
    requests: int
    failures: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float


@dataclass(frozen=True)
class Summary:
    rows: list[Row]
    errors: list[str]  # the failures locust grouped, "count x protocol name: error"
    elapsed_s: float = 0.0  # first request's start to the last request

    def count(self, protocol: str, op: str) -> int:
        """Requests of one operation: ``cas`` counts its conflicts too."""
        return sum(
            r.requests
            for r in self.rows
            if r.protocol == protocol and r.name in (op, f"{op} conflict")
        )

    @property
    def failures(self) -> int:
        return sum(r.failures for r in self.rows)


def _percentile(times: dict[str, int], total: int, q: float) -> float:
    """Locust's rounded response-time histogram ({ms: count}) -> the q-quantile in ms."""
    if total <= 0:
        return math.nan
    rank = q * total
    seen = 0
    for ms, n in sorted((float(k), v) for k, v in times.items()):
        seen += n
        if seen >= rank:
            return ms
    return max(float(k) for k in times)


def summarize(stats: list[dict[str, Any]], failures: list[dict[str, Any]]) -> Summary:
    """Locust's ``--json-file`` entries (one per request type and name) -> a Summary."""
    rows = []
    first, last_seen = math.inf, 0.0
    for s in stats:
        n = int(s["num_requests"])  # failures included
        times: dict[str, int] = s.get("response_times", {})
        start = float(s.get("start_time") or 0)
        last = float(s.get("last_request_timestamp") or start)
        elapsed = max(last - start, 1e-9)
        first, last_seen = min(first, start), max(last_seen, last)
        rows.append(
            Row(
                protocol=s["method"],
                name=s["name"],
                requests=n,
                failures=int(s["num_failures"]),
                rps=n / elapsed if n > 1 else float(n),
                p50_ms=_percentile(times, n, 0.50),
                p95_ms=_percentile(times, n, 0.95),
                p99_ms=_percentile(times, n, 0.99),
                max_ms=float(s.get("max_response_time") or 0),
            )
        )
    rows.sort(key=lambda r: (r.protocol, r.name))
    failures = sorted(failures, key=lambda f: -int(f.get("occurrences", 1)))
    errors = [
        f"{f.get('occurrences', 1)} x {f.get('method')} {f.get('name')}: "
        + " ".join(str(f.get("error")).split())[:300]
        for f in failures
    ]
    return Summary(rows, errors, max(last_seen - first, 0.0) if rows else 0.0)


def table(summary: Summary) -> str:
    lines = [
        f"{'protocol':8} {'request':14} {'count':>8} {'fail':>5} {'req/s':>8} "
        f"{'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'max ms':>7}"
    ]
    for r in summary.rows:
        lines.append(
            f"{r.protocol:8} {r.name:14} {r.requests:8d} {r.failures:5d} {r.rps:8.1f} "
            f"{r.p50_ms:7.1f} {r.p95_ms:7.1f} {r.p99_ms:7.1f} {r.max_ms:7.1f}"
        )
    total = sum(r.requests for r in summary.rows)
    rps = total / summary.elapsed_s if summary.elapsed_s > 0 else 0.0
    lines.append(f"{'all':8} {'':14} {total:8d} {summary.failures:5d} {rps:8.1f}")
    return "\n".join(lines)


async def read_back(
    front_door: str, tls: ClientTls | None, record: dict[str, Any], timeout_s: float = 30.0
) -> ReadBack:
    """Read every key under the run's prefix (linearizably, in pages) and check it."""
    prefix = str(record["key_prefix"]).encode()
    found: list[tuple[bytes, bytes]] = []
    async with Client([front_door], tls, timeout_s=timeout_s) as client:
        req = kv_pb2.RangeRequest(key=prefix, range_end=prefix_end(prefix), limit=1000)
        while True:
            page = await client.range(req)
            found += [(kv.key, kv.value) for kv in page.kvs]
            if not page.more:
                break
            req = kv_pb2.RangeRequest(
                key=prefix, range_end=prefix_end(prefix), limit=1000, continuation=page.continuation
            )
    return check_read_back(record, found)


def locust_command(args: argparse.Namespace, out: Path, key_prefix: str) -> list[str]:
    scheme = "http" if args.plaintext else "https"
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--only-summary",
        "--host",
        f"{scheme}://{args.front_door}",
        "--users",
        str(args.users),
        "--spawn-rate",
        str(args.spawn_rate),
        "--run-time",
        f"{args.run_time}s",
        "--stop-timeout",
        f"{args.stop_timeout}s",
        "--json-file",
        str(out / "locust"),
        "--html",
        str(out / "locust.html"),
        "--dkv-key-prefix",
        key_prefix,
        "--dkv-keys",
        str(args.keys),
        "--dkv-distribution",
        args.distribution,
        "--dkv-zipf-s",
        str(args.zipf_s),
        "--dkv-value-size",
        str(args.value_size),
        "--dkv-weights",
        args.weights,
        "--dkv-range-limit",
        str(args.range_limit),
        "--dkv-timeout",
        str(args.timeout),
        "--dkv-record",
        str(out / "writes.json"),
        "--dkv-errors",
        str(out / "errors.json"),
    ]
    if args.serializable_reads:
        cmd.append("--dkv-serializable-reads")
    if args.seed:
        cmd += ["--dkv-seed", args.seed]
    if not args.plaintext:
        cmd += ["--dkv-cacert", str(args.cacert), "--dkv-cert", str(args.cert)]
        cmd += ["--dkv-key", str(args.key)]
    extra = list(args.locust_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    cmd += extra
    cmd += [USER_CLASSES[p] for p in args.protocol_list]
    return cmd


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.protocol_list = [p.strip() for p in args.protocols.split(",") if p.strip()]
    if not args.protocol_list or any(p not in USER_CLASSES for p in args.protocol_list):
        parser.error(f"--protocols: a comma-separated choice of {', '.join(USER_CLASSES)}")
    try:
        weights = parse_weights(args.weights)
    except ValueError as exc:
        parser.error(str(exc))
    tls: ClientTls | None = None
    if not args.plaintext:
        certs = args.root / "certs"
        args.cacert = args.cacert or certs / "ca.crt"
        args.cert = args.cert or certs / f"{CLIENT_NAME}.crt"
        args.key = args.key or certs / f"{CLIENT_NAME}.key"
        for f in (args.cacert, args.cert, args.key):
            if not f.is_file():
                parser.error(f"{f} not found: start the stack (make run), or give the files")
        tls = ClientTls(str(args.cert), str(args.key), str(args.cacert))
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    key_prefix = args.key_prefix or f"loadtest/{run_id}/"
    out: Path = args.out or args.root / "loadtest" / run_id
    out.mkdir(parents=True, exist_ok=True)

    cmd = locust_command(args, out, key_prefix)
    env = dict(os.environ)
    # The locustfile imports loadtests.workload: the repository root on the path, wherever
    # this runs from.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    print(
        f"locust: {args.users} users ({args.protocols}) for {args.run_time} s against "
        f"{args.front_door}, keys {key_prefix}* ({args.keys}, {args.distribution}), "
        f"values {args.value_size} B, mix {args.weights}",
        flush=True,
    )
    bound_s = args.run_time + args.stop_timeout + KILL_AFTER_S
    try:
        rc = subprocess.run(cmd, cwd=REPO, env=env, timeout=bound_s, check=False).returncode
    except subprocess.TimeoutExpired:
        print(f"locust did not stop within {bound_s} s: killed", file=sys.stderr)
        return 1

    problems: list[str] = []
    report = out / "locust.json"
    if not report.is_file():
        print(f"locust wrote no report ({report}); exit status {rc}", file=sys.stderr)
        return 1
    stats = json.loads(report.read_text())
    errors_file = out / "errors.json"
    failures = json.loads(errors_file.read_text()) if errors_file.is_file() else []
    summary = summarize(stats, failures)
    print(table(summary))
    for e in summary.errors[:10]:
        print(f"  failed: {e}")
    if rc != 0:
        problems.append(f"locust exited with status {rc}")
    if summary.failures:
        problems.append(f"{summary.failures} requests failed")
    for proto in args.protocol_list:
        for op in OPERATIONS:
            if weights[op] and summary.count(proto, op) == 0:
                problems.append(f"no {proto} {op} request was made")

    if not args.no_read_back:
        record = json.loads((out / "writes.json").read_text())
        if not record["complete"]:
            print("read back: skipped (the record of writes hit its bound)")
        else:
            try:
                checked = asyncio.run(read_back(args.front_door, tls, record))
            except DkvError as exc:
                problems.append(f"read back: {type(exc).__name__}: {exc}")
            else:
                print(
                    f"read back: {checked.keys_found} keys under {key_prefix}, "
                    f"{checked.keys_acked} acknowledged"
                    + ("; every one holds a value written to it" if checked.ok else "")
                )
                problems += checked.problems
    print(f"reports: {out / 'locust.html'}, {report}, {out / 'writes.json'}")
    for p in problems:
        print(f"FAILED: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
