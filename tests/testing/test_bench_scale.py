"""The pure parts of ``make bench-scale`` (bench.bench_scale): its arguments and
scaling, the loader's hand-made request bytes, the figures' formatting. No cluster is run."""

from __future__ import annotations

import math

import pytest

from bench.bench_node import H2loadResult, RowResult
from bench.bench_scale import (
    FULL_KEYS,
    LoadResult,
    Route,
    key_for,
    load_line,
    loss_pct,
    mb_per_s,
    parse_args,
    put_request,
    row_pair,
)
from dkv.sharding import shard_for_key
from dkv.v1 import kv_pb2


def test_full_size_by_default() -> None:
    cfg = parse_args([], env={})
    assert cfg.keys == FULL_KEYS == 1_000_000
    assert cfg.value_bytes == 256
    assert cfg.restart_bytes == 1 << 30
    assert cfg.shard_counts == (1, 8, 64)
    assert cfg.idle_seconds == 10.0
    assert cfg.parts == ("load", "join", "restart", "shards")


def test_scale_shrinks_the_work() -> None:
    cfg = parse_args(["--seconds", "10"], env={"DKV_BENCH_SCALE": "0.05"})
    assert cfg.keys == 50_000
    assert cfg.restart_bytes == round(0.05 * (1 << 30))
    assert cfg.seconds == 2.0  # never below 2 s
    assert parse_args(["--seconds", "10"], env={"DKV_BENCH_SCALE": "2"}).seconds == 20.0


@pytest.mark.parametrize(
    "argv, env",
    [
        (["--parts", "join"], {}),  # joins the loaded shard: needs load
        (["--parts", "nope"], {}),
        (["--shards", "0"], {}),
        (["--shards", "x"], {}),
        ([], {"DKV_BENCH_SCALE": "-1"}),
        ([], {"DKV_BENCH_SCALE": "much"}),
    ],
)
def test_bad_arguments_exit_2(argv: list[str], env: dict[str, str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv, env=env)
    assert exc.value.code == 2


def test_put_request_is_protobufs_encoding() -> None:
    for key, value in ((key_for(7), b"v" * 256), (b"k", b""), (key_for(3), bytes(70_000))):
        expected = kv_pb2.PutRequest(key=key, value=value).SerializeToString()
        assert put_request(key, value) == expected
        parsed = kv_pb2.PutRequest.FromString(put_request(key, value))
        assert (parsed.key, parsed.value) == (key, value)


def test_keys_are_distinct_and_spread_over_shards() -> None:
    assert key_for(42) == b"scale/00000042"
    assert key_for(1, b"big/") == b"big/00000001"
    keys = [key_for(i) for i in range(10_000)]
    assert len(set(keys)) == len(keys)
    route = Route(64, {g: f"127.0.0.1:{g}" for g in range(1, 65)})
    assert {route.address(k) for k in keys} == set(route.leaders.values())
    assert route.address(keys[0]) == f"127.0.0.1:{shard_for_key(keys[0], 64)}"


def _row(rate: float, mean_ms: float, ok: bool = True) -> RowResult:
    n = int(rate * 5)
    r = RowResult("dkv", "put", 64, 4, 16)
    r.h2load = H2loadResult(n, 5.0, rate, n, 0, 0, 0, n, 0, mean_ms, 3 * mean_ms)
    r.verified = ok
    if not ok:
        r.problems.append("3 of 5 puts not applied (key version)")
    r.other_cpu = 0.25
    return r


def test_figures() -> None:
    assert loss_pct(1000, 800) == pytest.approx(20.0)
    assert loss_pct(1000, 1100) == pytest.approx(-10.0)
    assert math.isnan(loss_pct(0, 5))
    assert mb_per_s(50_000_000, 2.0) == pytest.approx(25.0)
    line = row_pair(_row(1400, 44.3), _row(1120, 55.0), 1_000_000)
    assert line == (
        "| put | 64 | 1,400 | 44.30 | 1,000,000 | 1,120 | 55.00 | 20.0% | 0.25 / 0.25 | ok |"
    )
    failed = row_pair(_row(1400, 44.3), _row(1120, 55.0, ok=False), 10)
    assert "1,120 FAILED" in failed and failed.endswith("(key version) |")
    lr = LoadResult(puts=1_000_000, seconds=500.0, client_cpu=0.3, errors={"UNAVAILABLE": 2})
    assert load_line("1M keys", lr) == (
        "| 1M keys | 1,000,000 | 500.0 | 2,000 | 0.30 | 0 | UNAVAILABLE 2 |"
    )
