"""`make loadtest` against a real local stack: locust drives every operation over gRPC and
HTTP/JSON through Envoy, nothing fails, and what it wrote reads back.

The stack is ``dkv.devstack`` on free ports, as the end-to-end tests start it. Locust runs as
``python -m loadtests.run`` in a process of its own (gevent monkey-patches the process it runs
in; this one must stay unpatched), for a few seconds, bounded by a timeout. The test reads
locust's ``--json-file`` report (not the CSV, whose last write can lag) and reads every
acknowledged key back through the front door over gRPC itself, independently of the runner's
own read-back.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dkv.client import Client
from dkv.devstack import DevLayout, DevStack
from loadtests.workload import OPERATIONS, make_value

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RUN_TIME_S = 8
# Every operation alike, so that each is drawn often enough over both protocols even on a
# loaded machine; a deadline long enough that a slow answer is not a failure.
WEIGHTS = "put=1,get=1,range=1,watch=1,cas=1"
CALL_TIMEOUT_S = 30
VALUE_SIZE = 100


def requests_by_op(stats: list[dict[str, Any]]) -> dict[tuple[str, str], int]:
    """(protocol, operation) -> requests; a ``cas conflict`` is a ``cas``."""
    out: dict[tuple[str, str], int] = {}
    for s in stats:
        op = s["name"].removesuffix(" conflict")
        key = (s["method"], op)
        out[key] = out.get(key, 0) + int(s["num_requests"])
    return out


async def read_back(layout: DevLayout, record: dict[str, Any]) -> dict[str, bytes]:
    door = [f"127.0.0.1:{layout.front_door}"]
    values = {}
    async with Client(door, layout.client_tls_files(), timeout_s=10) as c:
        for key in record["acked"]:
            got = await c.get(key.encode())
            assert len(got.kvs) == 1, f"{key} was acknowledged but is not there"
            values[key] = got.kvs[0].value
    return values


def test_locust_drives_every_operation_over_grpc_and_http(tmp_path: Path) -> None:
    layout = DevLayout.with_free_ports(tmp_path / ".dkv", shards=4)
    out = tmp_path / "report"
    stack = DevStack(layout)
    stack.start()
    try:
        asyncio.run(stack.wait_ready())
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "loadtests.run",
                "--root",
                str(layout.root),
                "--front-door",
                f"127.0.0.1:{layout.front_door}",
                "--users",
                "4",
                "--spawn-rate",
                "4",
                "--run-time",
                f"{RUN_TIME_S}s",
                "--stop-timeout",
                "10",
                "--timeout",
                str(CALL_TIMEOUT_S),
                "--weights",
                WEIGHTS,
                "--keys",
                "40",
                "--distribution",
                "zipf",
                "--value-size",
                str(VALUE_SIZE),
                "--seed",
                "13",
                "--key-prefix",
                "lt/",
                "--out",
                str(out),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=RUN_TIME_S + 10 + 120,
            check=False,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "read back:" in run.stdout, run.stdout

        stats = json.loads((out / "locust.json").read_text())
        assert sum(int(s["num_failures"]) for s in stats) == 0, stats
        counts = requests_by_op(stats)
        for protocol in ("grpc", "http"):
            for op in OPERATIONS:
                assert counts.get((protocol, op), 0) > 0, (protocol, op, counts)
        assert (out / "locust.html").stat().st_size > 0

        record = json.loads((out / "writes.json").read_text())
        assert record["complete"] and record["acked"], record
        assert all(k.startswith("lt/") for k in record["attempted"])
        values = asyncio.run(read_back(layout, record))
        for key, value in values.items():
            sent = {make_value(key.encode(), t, VALUE_SIZE) for t in record["attempted"][key]}
            assert value in sent, (key, value)
    finally:
        stack.stop()
    assert all(p.exited() is not None for p in stack.procs)
