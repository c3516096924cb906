"""Real dkv-membership processes on 127.0.0.1 (peer mTLS): a node joins at any replica,
every replica serves the same map, kill -9 of the leader, restart with its data dir, graceful
stop, refusals.

Nothing sleeps to let things settle: calls are retried (following the leader hint) until they
succeed or a deadline passes; a process announces on stdout when it serves.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from dkv.security import PkiLayout, write_dev_pki
from dkv.v1 import membership_pb2 as pb

NAMES = ("a", "b", "c")
WAIT_S = 30.0
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """One dkv-membership process; its log goes to a file (a pipe nobody drains would block)."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.args = args
        self.log = log
        self.p: subprocess.Popen[str] | None = None

    def start(self) -> None:
        with self.log.open("a") as err:
            self.p = subprocess.Popen(
                [sys.executable, "-m", "dkv_membership.main", *self.args],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        assert self.p.stdout is not None
        line = self.p.stdout.readline()  # the process announces when it serves: an event
        assert "serving clients on 127.0.0.1:" in line, (line, self.log.read_text()[-2000:])

    def running(self) -> bool:
        return self.p is not None and self.p.poll() is None

    def _reap(self) -> int:
        assert self.p is not None and self.p.stdout is not None
        code = self.p.wait(timeout=30)
        self.p.stdout.close()
        return code

    def kill9(self) -> None:
        assert self.p is not None
        self.p.send_signal(signal.SIGKILL)
        self._reap()

    def term(self) -> int:
        assert self.p is not None
        self.p.send_signal(signal.SIGTERM)
        return self._reap()


async def call(
    addrs: dict[str, str], order: list[str], method: str, req: Any, resp_type: Any
) -> tuple[str, Any]:
    """Call ``method`` at the replicas of ``order`` (names into ``addrs``), following the
    NOT_LEADER trailers (dkv-leader-address, else dkv-leader-name) to the leader; returns
    (the name of the replica that answered, the response). Retries until WAIT_S passes."""
    by_addr = {a: n for n, a in addrs.items()}
    loop = asyncio.get_running_loop()
    end = loop.time() + WAIT_S
    i = 0
    target = order[0]
    while True:
        async with grpc.aio.insecure_channel(addrs[target]) as ch:
            stub = ch.unary_unary(
                f"/dkv.v1.Membership/{method}",
                request_serializer=type(req).SerializeToString,
                response_deserializer=resp_type.FromString,
            )
            try:
                return target, await stub(req, timeout=5)
            except grpc.aio.AioRpcError as exc:
                if loop.time() > end or exc.code() not in RETRYABLE:
                    raise
                md = dict(exc.trailing_metadata() or ())
                hint = by_addr.get(str(md.get("dkv-leader-address", ""))) or str(
                    md.get("dkv-leader-name", "")
                )
                if hint in order and hint != target:
                    target = hint  # a follower named the leader: go there at once
                    continue
                i += 1
                target = order[i % len(order)]
                await asyncio.sleep(0.05)  # no leader yet (an election takes a moment)


async def cluster_map(addrs: dict[str, str], name: str) -> pb.ClusterMap:
    """A linearizable read AT ``name`` (any replica serves it, ReadIndex)."""
    _, resp = await call(
        addrs, [name], "GetClusterMap", pb.GetClusterMapRequest(), pb.GetClusterMapResponse
    )
    m: pb.ClusterMap = resp.map
    return m


def node(nid: int) -> pb.Node:
    return pb.Node(
        id=nid,
        name=f"n{nid}",
        peer_address=f"10.0.0.{nid}:2380",
        client_address=f"10.0.0.{nid}:2379",
        zone="z1",
    )


def test_join_kill9_leader_restart_and_refusals(tmp_path: Path) -> None:
    pki = PkiLayout(tmp_path / "pki")
    write_dev_pki(pki.directory, [("membership", n) for n in NAMES])
    peer = {n: free_port() for n in NAMES}
    client = {n: free_port() for n in NAMES}
    addrs = {n: f"127.0.0.1:{client[n]}" for n in NAMES}
    cluster = ",".join(f"{n}=localhost:{peer[n]}" for n in NAMES)

    def args(n: str, state: str, data_dir: str | None = None) -> list[str]:
        return [
            "--name", n, "--data-dir", data_dir or str(tmp_path / n),
            "--listen-peer", f"127.0.0.1:{peer[n]}", "--listen-client", addrs[n],
            "--initial-cluster", cluster, "--initial-cluster-state", state,
            "--tick-interval-ms", "20",
            # Small, so that the restart rebuilds from a snapshot plus the log after it.
            "--snapshot-count", "4", "--snapshot-catchup-entries", "2",
            # The nodes here are made up (nothing listens): no placement.
            "--placement", "off",
            "--peer-cert-file", str(pki.cert(n)), "--peer-key-file", str(pki.key(n)),
            "--peer-trusted-ca-file", str(pki.ca_cert),
        ]  # fmt: skip

    procs = {n: Proc(args(n, "new"), tmp_path / f"{n}.log") for n in NAMES}
    codes: dict[str, int] = {}
    try:
        for p in procs.values():
            p.start()

        async def phase1() -> str:
            # Join at every replica in turn: followers answer NOT_LEADER, the call follows.
            leaders = set()
            for nid, first in zip((101, 102, 103), NAMES, strict=True):
                req = pb.JoinNodeRequest(node=node(nid))
                leader, resp = await call(
                    addrs, [first, *NAMES], "JoinNode", req, pb.JoinNodeResponse
                )
                assert resp.node.id == nid and resp.node.state == pb.NODE_STATE_UP
                leaders.add(leader)
            maps = [await cluster_map(addrs, n) for n in NAMES]
            assert {n.id for n in maps[0].nodes} == {101, 102, 103}
            assert maps[1:] == maps[:1] * 2, "every replica serves the same map"
            assert len(leaders) == 1, leaders  # no election in between on a quiet cluster
            return leaders.pop()

        leader = asyncio.run(phase1())
        procs[leader].kill9()
        rest = [n for n in NAMES if n != leader]

        async def phase2() -> pb.ClusterMap:
            # The other two elect a leader, which takes writes.
            served, _ = await call(
                addrs, rest, "Heartbeat", pb.HeartbeatRequest(node_id=101), pb.HeartbeatResponse
            )
            assert served in rest
            req = pb.JoinNodeRequest(node=node(104))
            served, resp = await call(addrs, rest, "JoinNode", req, pb.JoinNodeResponse)
            assert served in rest and resp.node.id == 104
            maps = [await cluster_map(addrs, n) for n in rest]
            assert maps[0] == maps[1]
            assert maps[0].version >= resp.version
            assert {n.id for n in maps[0].nodes} == {101, 102, 103, 104}
            return maps[0]

        after = asyncio.run(phase2())
        procs[leader] = Proc(args(leader, "existing"), tmp_path / f"{leader}.log")
        procs[leader].start()

        async def phase3() -> None:
            # The restarted replica catches up: a linearizable read AT it sees every change.
            got = await cluster_map(addrs, leader)
            assert got == after, (got, after)
            for n in rest:
                assert await cluster_map(addrs, n) == got, n

        asyncio.run(phase3())
    finally:
        codes = {n: p.term() for n, p in procs.items() if p.running()}
    assert codes == {n: 0 for n in NAMES}, codes  # graceful shutdown on SIGTERM

    def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dkv_membership.main", *argv],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    # Usage errors: exit 2, naming the flag.
    bad = run([*args("b", "existing"), "--tick-interval-ms", "soon"])
    assert bad.returncode == 2, bad.stderr
    assert "--tick-interval-ms must be an integer" in bad.stderr
    unknown = run([*args("b", "existing"), "--shard-count", "2"])
    assert unknown.returncode == 2 and "--shard-count" in unknown.stderr
    zero = run([*args("b", "existing"), "--shards", "0"])
    assert zero.returncode == 2 and "--shards must be >= 1" in zero.stderr
    placement = run([*args("b", "existing"), "--placement", "maybe"])
    assert placement.returncode == 2 and "--placement must be on or off" in placement.stderr

    # Refusals: one line, exit 1. Another replica's data dir:
    wrong = run(args("b", "existing", data_dir=str(tmp_path / "a")))
    assert wrong.returncode == 1, wrong.stderr
    lines = wrong.stderr.strip().splitlines()
    assert [ln for ln in lines if ln.startswith("dkv-membership:")] == lines[-1:], lines
    assert lines[-1].startswith("dkv-membership: data dir"), lines
    assert "belongs to" in lines[-1] and "'a'" in lines[-1], lines
    # ... and a client port in use.
    with socket.socket() as held:
        held.bind(("127.0.0.1", client["b"]))
        held.listen()
        busy = run(args("b", "existing"))
    assert busy.returncode == 1, busy.stderr
    last = busy.stderr.strip().splitlines()[-1]
    assert last.startswith("dkv-membership: cannot listen on") and addrs["b"] in last, last
