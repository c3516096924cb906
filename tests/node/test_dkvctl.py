"""dkvctl run as a user would (subprocess) against three real dkv-node processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_node_grpc import free_port
from test_processes import Proc

NAMES = ("a", "b", "c")


def test_dkvctl_against_a_real_cluster(tmp_path: Path) -> None:
    peer = {n: free_port() for n in NAMES}
    client = {n: free_port() for n in NAMES}
    cluster = ",".join(f"{n}=127.0.0.1:{peer[n]}" for n in NAMES)
    procs = [
        Proc(
            n,
            [
                "--name",
                n,
                "--data-dir",
                str(tmp_path / n),
                "--initial-cluster",
                cluster,
                "--listen-peer",
                f"127.0.0.1:{peer[n]}",
                "--listen-client",
                f"127.0.0.1:{client[n]}",
                "--shards",
                "2",
                "--tick-interval-ms",
                "20",
                "--max-value-bytes",
                "64",
            ],
            tmp_path / f"{n}.log",
        )
        for n in NAMES
    ]
    for p in procs:
        p.start()
    # Endpoints in an order where the first is probably not the leader: dkvctl must cope.
    endpoints = ",".join(f"127.0.0.1:{client[n]}" for n in reversed(NAMES))

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", "from dkv.cli.dkvctl import main; main()",
             "--endpoints", endpoints, "--timeout", "20", *args],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    try:
        r = ctl("put", "greeting", "hello")
        assert r.returncode == 0 and r.stdout.startswith("OK (revision "), r.stderr
        r = ctl("get", "greeting")
        assert (r.returncode, r.stdout) == (0, "hello\n")
        for i in range(5):
            assert ctl("put", f"app/{i}", f"v{i}").returncode == 0
        r = ctl("-o", "json", "range", "--prefix", "app/", "--limit", "2", "--all")
        data = json.loads(r.stdout)
        assert [kv["key"] for kv in data["kvs"]] == [f"app/{i}" for i in range(5)]
        assert data["more"] is False and data["kvs"][0]["version"] == 1
        r = ctl("range", "--prefix", "app/")
        assert r.stdout.splitlines()[0].split() == ["KEY", "VALUE", "MOD_REVISION", "VERSION"]
        # Watch from the first revision: the history of the prefix, in order.
        r = ctl("watch", "--prefix", "app/", "--rev", "1", "--max-events", "5")
        assert r.stdout.splitlines() == [f"PUT app/{i} v{i}" for i in range(5)], r.stderr
        # Cluster administration.
        r = ctl("-o", "json", "member", "list")
        members = json.loads(r.stdout)["members"]
        assert [(m["name"], m["status"]) for m in members] == [(n, "voter") for n in NAMES]
        assert {m["peer_address"] for m in members} == {f"127.0.0.1:{peer[n]}" for n in NAMES}
        r = ctl("-o", "json", "status")
        rows = json.loads(r.stdout)["shards"]
        assert len(rows) == 6 and {row["shard"] for row in rows} == {1, 2}
        leaders = {row["shard"]: row["id"] for row in rows if row["role"] == "leader"}
        assert set(leaders) == {1, 2}
        target = next(m for m in members if m["id"] != leaders[1])
        r = ctl("leader", "transfer", "--shard", "1", "--to", target["name"])
        assert r.stdout == f"shard 1: leader is now {target['id']}\n", r.stderr
        r = ctl("status")
        assert r.stdout.split()[:4] == ["ENDPOINT", "ID", "NAME", "SHARD"]
        r = ctl("snapshot")
        assert r.returncode == 0 and r.stdout.startswith("shard 1: snapshot at index "), r.stderr
        r = ctl("member", "promote", "nobody")
        assert r.returncode == 1 and "no member named 'nobody'" in r.stderr
        r = ctl("member", "add", "d", "--peer-url", "bad")
        assert r.returncode == 1 and "not host:port" in r.stderr
        assert ctl("del", "greeting").stdout == "1\n"
        r = ctl("del", "--prefix", "app/")
        assert r.stdout == "5\n", r.stderr
        r = ctl("-o", "json", "range", "--prefix", "app/")
        assert json.loads(r.stdout) == {"kvs": [], "more": False}
        r = ctl("get", "greeting")
        assert r.returncode == 3 and "not found" in r.stderr
        r = ctl("put", "big", "x" * 65)
        assert r.returncode == 1 and "limit is 64 bytes" in r.stderr
        r = ctl("-o", "yaml", "get", "x")
        assert r.returncode == 2 and "table" in r.stderr
        r = subprocess.run(
            [sys.executable, "-c", "from dkv.cli.dkvctl import main; main()",
             "--endpoints", f"127.0.0.1:{free_port()}", "--timeout", "1", "get", "k"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert r.returncode == 1 and r.stderr.startswith("Error: ")
    finally:
        codes = [p.term() for p in procs]
    assert codes == [0, 0, 0]
