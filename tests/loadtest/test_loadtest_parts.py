"""The pure parts of ``make loadtest`` (loadtests/): the key distributions, values, the
operation mix, the read-back check, the runner's arguments and summary. The locustfile itself
is only loaded by locust, in a process of its own (it monkey-patches the process)."""

from __future__ import annotations

import argparse
import collections
import random
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests import run
from loadtests.workload import (
    OPERATIONS,
    KeyChooser,
    WorkloadConfig,
    WriteRecord,
    check_read_back,
    make_value,
    parse_weights,
    prefix_end,
)

REPO = Path(__file__).resolve().parents[2]


def test_weights_name_every_operation_and_refuse_nonsense() -> None:
    assert parse_weights("put=2,cas=1") == {"put": 2, "get": 0, "range": 0, "watch": 0, "cas": 1}
    assert set(parse_weights("get=1")) == set(OPERATIONS)
    for bad in ("put", "pot=1", "put=-1", "put=x", "put=0"):
        with pytest.raises(ValueError, match="weights"):
            parse_weights(bad)


def test_uniform_keys_cover_the_key_space() -> None:
    cfg = WorkloadConfig(key_prefix=b"p/", keys=20)
    chooser = KeyChooser(cfg, random.Random(1))
    seen = collections.Counter(chooser.index() for _ in range(4000))
    assert set(seen) == set(range(20))
    assert max(seen.values()) < 2 * min(seen.values())


def test_zipf_keys_favour_the_first_ones() -> None:
    cfg = WorkloadConfig(key_prefix=b"p/", keys=1000, distribution="zipf", zipf_s=1.1)
    chooser = KeyChooser(cfg, random.Random(1))
    seen = collections.Counter(chooser.index() for _ in range(20_000))
    assert seen.most_common(1)[0][0] == 0
    # P(0) / P(1) = 2 ** 1.1 ~ 2.14
    assert 1.7 < seen[0] / seen[1] < 2.7
    assert all(0 <= i < 1000 for i in seen)


def test_keys_and_values() -> None:
    cfg = WorkloadConfig(key_prefix=b"lt/", keys=5)
    assert cfg.key(3) == b"lt/00000003"
    assert prefix_end(b"lt/") == b"lt0" and prefix_end(b"a\xff") == b"b"
    v = make_value(b"lt/00000003", "g1.7", 64)
    assert len(v) == 64 and v.startswith(b"lt/00000003|g1.7|")
    assert make_value(b"lt/00000003", "g1.7", 4) == b"lt/0"
    assert make_value(b"k", "t", 0) == b""
    for bad in (
        {"keys": 0},
        {"distribution": "normal"},
        {"value_size": -1},
        {"zipf_s": 0},
        {"range_limit": 0},
    ):
        with pytest.raises(ValueError):
            WorkloadConfig(key_prefix=b"lt/", **bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prefix"):
        WorkloadConfig(key_prefix=b"")


def test_read_back_check() -> None:
    cfg = WorkloadConfig(key_prefix=b"lt/", value_size=32)
    rec = WriteRecord()
    a, b, c = cfg.key(0), cfg.key(1), cfg.key(2)
    for key, tag in ((a, "g1.1"), (a, "g2.1"), (b, "h1.1"), (c, "g1.2")):
        rec.attempt(key, tag)
    rec.ack(a, "g1.1")
    rec.ack(b, "h1.1")  # c: sent, outcome unknown
    good = [(a, make_value(a, "g2.1", 32)), (b, make_value(b, "h1.1", 32))]
    ok = check_read_back(rec.to_json(cfg), good)
    assert ok.ok and ok.keys_acked == 2 and ok.keys_found == 2
    # A key of unknown outcome may be there too.
    assert check_read_back(rec.to_json(cfg), [*good, (c, make_value(c, "g1.2", 32))]).ok

    missing = check_read_back(rec.to_json(cfg), good[:1])
    assert not missing.ok and "1 acknowledged keys are missing" in missing.problems[0]
    wrong = check_read_back(rec.to_json(cfg), [good[0], (b, make_value(b, "h9.9", 32))])
    assert not wrong.ok and "none of its 1 writes" in wrong.problems[0]
    foreign = check_read_back(rec.to_json(cfg), [*good, (cfg.key(3), b"x")])
    assert not foreign.ok and "no write of this run" in foreign.problems[0]


def test_record_is_bounded() -> None:
    cfg = WorkloadConfig(key_prefix=b"lt/")
    rec = WriteRecord(tags_max=3)
    for i in range(5):
        rec.attempt(cfg.key(i), "t")
    assert not rec.complete and len(rec.attempted) == 3


def test_run_time_is_bounded() -> None:
    assert run.parse_duration("30s") == 30
    assert run.parse_duration("2m") == 120
    assert run.parse_duration("1h") == 3600
    assert run.parse_duration("45") == 45
    for bad in ("", "0s", "2h", "soon"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"run time|duration"):
            run.parse_duration(bad)


def test_locust_command_carries_the_options(tmp_path: Path) -> None:
    args = run.build_parser().parse_args(
        ["--front-door", "h:1", "--protocols", "grpc", "--distribution", "zipf", "--run-time", "5s"]
    )
    args.protocol_list = ["grpc"]
    args.cacert, args.cert, args.key = Path("ca"), Path("c"), Path("k")
    cmd = run.locust_command(args, tmp_path, "lt/")
    assert cmd[1:3] == ["-m", "locust"] and "--headless" in cmd
    assert cmd[cmd.index("--host") + 1] == "https://h:1"
    assert cmd[cmd.index("--run-time") + 1] == "5s"
    assert cmd[cmd.index("--dkv-distribution") + 1] == "zipf"
    assert cmd[cmd.index("--json-file") + 1] == str(tmp_path / "locust")
    assert cmd[-1] == "GrpcUser" and "JsonUser" not in cmd


def test_summary_from_locust_json() -> None:
    stats = [
        {
            "method": "grpc",
            "name": "put",
            "num_requests": 100,
            "num_failures": 0,
            "start_time": 10.0,
            "last_request_timestamp": 20.0,
            "max_response_time": 30.0,
            "response_times": {"1": 50, "2": 45, "30": 5},
        },
        {
            "method": "grpc",
            "name": "cas conflict",
            "num_requests": 3,
            "num_failures": 1,
            "start_time": 10.0,
            "last_request_timestamp": 20.0,
            "response_times": {"4": 3},
        },
    ]
    s = run.summarize(stats, [{"method": "grpc", "name": "put", "error": "boom", "occurrences": 1}])
    put = next(r for r in s.rows if r.name == "put")
    assert put.requests == 100 and put.rps == pytest.approx(10.0)
    assert (put.p50_ms, put.p95_ms, put.p99_ms) == (1.0, 2.0, 30.0)
    assert s.count("grpc", "cas") == 3 and s.count("http", "put") == 0
    assert s.failures == 1 and s.errors == ["1 x grpc put: boom"]
    assert s.elapsed_s == pytest.approx(10.0)
    assert "cas conflict" in run.table(s) and "  103     1     10.3" in run.table(s)


def test_locust_loads_the_locustfile() -> None:
    """In a process of its own: locust imports the users (and gevent-patches grpc there)."""
    out = subprocess.run(
        [sys.executable, "-m", "locust", "-f", "loadtests/locustfile.py", "--list"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "GrpcUser" in out.stdout and "JsonUser" in out.stdout
    assert "DkvUser" not in out.stdout  # abstract
