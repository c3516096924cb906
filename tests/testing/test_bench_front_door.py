"""The pure parts of ``make bench`` (bench.bench_front_door): ratios, the aim, tables.
No load is run here."""

from __future__ import annotations

from pathlib import Path

from bench.bench_front_door import (
    AIM,
    Result,
    aim_misses,
    details_table,
    display_order,
    ratio,
    summary_table,
)
from bench.bench_node import H2loadResult
from dkv.devstack import DevLayout


def h2(rate: float, mean_ms: float = 1.0) -> H2loadResult:
    n = int(rate * 2)
    return H2loadResult(
        requests=n,
        seconds=2.0,
        req_per_s=rate,
        succeeded=n,
        failed=0,
        errored=0,
        timeout=0,
        status_2xx=n,
        data_bytes=0,
        mean_ms=mean_ms,
        max_ms=3 * mean_ms,
    )


def res(path: str, op: str, depth: int, rate: float | None, ok: bool = True) -> Result:
    r = Result(path, op, depth, 1, depth)
    if rate is not None:
        r.h2load = h2(rate)
        r.cpu = {"envoy": 0.1, "gateway": 0.3, "leader": 0.5, "nodes": 1.0, "membership": 0.0}
    r.verified = ok and rate is not None
    if not r.verified:
        r.problems.append("boom")
    return r


def sample() -> list[Result]:
    return [
        res("front door", "put", 64, 600),
        res("gateway", "put", 64, 700),
        res("direct", "put", 64, 1000),
        res("etcd", "put", 64, 10000),
        res("front door", "get serializable", 1, 800),
        res("direct", "get serializable", 1, 1000),
    ]


def test_ratios_use_verified_rows_only() -> None:
    rs = sample()
    assert ratio(rs, "front door", "direct", ("put", 64)) == 0.6
    assert ratio(rs, "gateway", "direct", ("put", 64)) == 0.7
    assert ratio(rs, "direct", "etcd", ("put", 64)) == 0.1
    assert ratio(rs, "gateway", "direct", ("get serializable", 1)) is None  # no gateway row
    rs[2].verified = False  # a FAILED direct row has no honest rate
    assert ratio(rs, "front door", "direct", ("put", 64)) is None


def test_aim_misses_names_rows_below_the_aim_and_failed_rows() -> None:
    rs = sample()
    assert AIM == 0.70
    assert aim_misses(rs) == ["put @64 (0.60)"]  # 0.8 >= 0.7 for the serializable get
    rs[4] = res("front door", "get serializable", 1, 800, ok=False)
    assert aim_misses(rs) == ["put @64 (0.60)", "get serializable @1 (failed)"]
    assert aim_misses(rs, aim=0.5) == ["get serializable @1 (failed)"]


def test_cpu_per_request_counts_server_processes_once() -> None:
    r = res("front door", "put", 64, 700)
    # envoy 0.1 + gateway 0.3 + nodes 1.0 + membership 0.0 (the leader is among the nodes)
    per = r.cpu_ms_per_request()
    assert per is not None and abs(per - 1000 * 1.4 / 700) < 1e-9
    assert res("direct", "put", 64, None).cpu_ms_per_request() is None


def test_tables_have_one_line_per_row_and_mark_failures() -> None:
    rs = [*sample(), res("gateway", "get serializable", 1, None)]
    rs.sort(key=display_order)
    assert [(r.op, r.path) for r in rs][:4] == [
        ("put", "front door"),
        ("put", "gateway"),
        ("put", "direct"),
        ("put", "etcd"),
    ]
    summary = summary_table(rs).splitlines()
    assert len(summary) == 2 + 2  # header, rule, put @64, get serializable @1
    assert "| 0.60 | 0.70 | 0.10 |" in summary[2]
    assert "FAILED" in summary[3]
    details = details_table(rs).splitlines()
    assert len(details) == 2 + len(rs)
    assert all(line.count("|") == details[0].count("|") for line in details)
    assert sum(line.endswith("| FAILED: boom |") for line in details) == 1


def test_layout_without_client_tls_keeps_peer_tls(tmp_path: Path) -> None:
    default = DevLayout(tmp_path)
    bench = DevLayout(tmp_path, client_tls=False)
    assert default.client_tls and default.client_tls_flags("n1") == default.tls_flags("n1")
    assert bench.client_tls_flags("n1") == []
    assert "--peer-cert-file" in bench.tls_flags("n1", "peer-")
