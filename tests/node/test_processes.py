"""Real dkv-node processes on 127.0.0.1: kill -9, restart, catch-up, graceful stop, refusals."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import grpc.aio
from test_node_grpc import free_port

from dkv.host.members import member_id
from dkv.security import PkiLayout, write_dev_pki
from dkv.v1 import kv_pb2

NAMES = ("a", "b", "c")


class Proc:
    """One dkv-node process; its log goes to a file (a pipe nobody drains would block it)."""

    def __init__(
        self, name: str, args: list[str], log: Path, module: str = "dkv_node.main"
    ) -> None:
        self.name = name
        self.args = args
        self.log = log
        self.module = module
        self.p: subprocess.Popen[str] | None = None
        self.banner = ""

    def start(self) -> None:
        with self.log.open("a") as err:
            self.p = subprocess.Popen(
                [sys.executable, "-m", self.module, *self.args],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        assert self.p.stdout is not None
        line = self.p.stdout.readline()  # the process announces when it serves: an event
        assert "serving clients" in line, (line, self.log.read_text()[-2000:])
        self.banner = line.strip()

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


def _alarming(log: str) -> list[str]:
    """Lines of a node's log that an operator would take for trouble: tracebacks, ERROR and
    WARNING records, gRPC core's own error lines (E1204 12:00:00.000 ...)."""
    return [
        line
        for line in log.splitlines()
        if "Traceback" in line
        or " ERROR " in line
        or " WARNING " in line
        or re.match(r"E\d{4} ", line)
    ]


async def _call(
    ports: dict[str, int], order: list[str], method: str, req, resp_type, deadline_s: float = 30
):  # type: ignore[no-untyped-def]
    """Try nodes in order, following NOT_LEADER hints; bounded by a deadline."""
    ids = {member_id("dkv-cluster", n): n for n in ports}
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    i = 0
    target = order[0]
    while True:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports[target]}") as ch:
            stub = ch.unary_unary(
                f"/dkv.v1.KV/{method}",
                request_serializer=type(req).SerializeToString,
                response_deserializer=resp_type.FromString,
            )
            try:
                return await stub(req, timeout=5)
            except grpc.aio.AioRpcError as exc:
                if loop.time() > end or exc.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    raise
                hint = dict(exc.trailing_metadata() or ()).get("dkv-leader-id")
                if hint and int(hint) in ids and ids[int(hint)] in order:
                    target = ids[int(hint)]
                else:
                    i += 1
                    target = order[i % len(order)]
                    await asyncio.sleep(0.05)  # no leader yet: an election takes a moment


def test_kill9_restart_and_catch_up(tmp_path: Path) -> None:
    pki = PkiLayout(tmp_path / "pki")
    write_dev_pki(pki.directory, [("node", n) for n in NAMES])
    peer = {n: free_port() for n in NAMES}
    client = {n: free_port() for n in NAMES}
    cluster = ",".join(f"{n}=localhost:{peer[n]}" for n in NAMES)

    def args(n: str, state: str) -> list[str]:
        return [
            "--name", n, "--data-dir", str(tmp_path / n),
            "--listen-peer", f"127.0.0.1:{peer[n]}", "--listen-client", f"127.0.0.1:{client[n]}",
            "--initial-cluster", cluster, "--initial-cluster-state", state, "--shards", "2",
            "--tick-interval-ms", "20",
            "--peer-cert-file", str(pki.cert(n)), "--peer-key-file", str(pki.key(n)),
            "--peer-trusted-ca-file", str(pki.ca_cert),
        ]  # fmt: skip

    procs = {n: Proc(n, args(n, "new"), tmp_path / f"{n}.log") for n in NAMES}
    for p in procs.values():
        p.start()
    try:

        async def phase1() -> None:
            for i in range(20):
                req = kv_pb2.PutRequest(key=b"k%02d" % i, value=b"v%d" % i, request_id=f"r{i}")
                assert (await _call(client, list(NAMES), "Put", req, kv_pb2.PutResponse)).succeeded
            procs["a"].kill9()  # maybe a leader: the others must elect and go on
            for i in range(20, 40):
                req = kv_pb2.PutRequest(key=b"k%02d" % i, value=b"v%d" % i, request_id=f"r{i}")
                assert (await _call(client, ["b", "c"], "Put", req, kv_pb2.PutResponse)).succeeded

        asyncio.run(phase1())
        procs["a"] = Proc("a", args("a", "existing"), tmp_path / "a.log")
        procs["a"].start()

        async def phase2() -> None:
            # The restarted node catches up; a linearizable read AT it sees every write.
            for i in range(40):
                req = kv_pb2.RangeRequest(key=b"k%02d" % i)
                got = await _call(client, ["a"], "Range", req, kv_pb2.RangeResponse)
                assert [kv.value for kv in got.kvs] == [b"v%d" % i]

        asyncio.run(phase2())
    finally:
        codes = {n: p.term() for n, p in procs.items() if p.p is not None and p.p.poll() is None}
    assert codes == {n: 0 for n in NAMES}, codes  # graceful shutdown on SIGTERM

    # Refusal with a one-line reason: another member's data dir. ("existing" with an empty
    # data dir joins the cluster, as in etcd: see tests/node/test_admin.py.)
    wrong = subprocess.run(
        [sys.executable, "-m", "dkv_node.main", *args("b", "existing")[:2], "--data-dir",
         str(tmp_path / "a"), *args("b", "existing")[4:]],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert wrong.returncode == 1
    assert wrong.stderr.strip().splitlines()[-1].startswith("dkv-node: data dir")
    assert "belongs to node 'a'" in wrong.stderr
    # A client port that is taken: one line naming it, exit 1 (no traceback).
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = subprocess.run(
            [sys.executable, "-m", "dkv_node.main", "--name", "z", "--data-dir",
             str(tmp_path / "z"), "--initial-cluster", f"z=127.0.0.1:{free_port()}",
             "--listen-peer", f"127.0.0.1:{free_port()}", "--listen-client", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert busy.returncode == 1, busy.stderr
    assert busy.stderr.strip().splitlines()[-1] == (
        f"dkv-node: cannot listen on 127.0.0.1:{port} (in use or not an address)"
    )
    assert "Traceback" not in busy.stderr


def test_start_line_counts_shards_and_a_graceful_stop_is_quiet(tmp_path: Path) -> None:
    """Three nodes stopped together with SIGTERM, twice (new, then restarted): exit 0 and not
    one alarming line in any log (a CancelledError traceback from /dkv.v1.RaftPeer/Stream
    used to come with most stops). The start line gives the shard count."""
    peer = {n: free_port() for n in NAMES}
    client = {n: free_port() for n in NAMES}
    cluster = ",".join(f"{n}=127.0.0.1:{peer[n]}" for n in NAMES)

    def args(n: str, state: str) -> list[str]:
        return [
            "--name", n, "--data-dir", str(tmp_path / n),
            "--listen-peer", f"127.0.0.1:{peer[n]}", "--listen-client", f"127.0.0.1:{client[n]}",
            "--initial-cluster", cluster, "--initial-cluster-state", state, "--shards", "3",
            "--tick-interval-ms", "20",
        ]  # fmt: skip

    for round_, state in enumerate(("new", "existing")):
        procs = {n: Proc(n, args(n, state), tmp_path / f"{n}.log") for n in NAMES}
        try:
            for p in procs.values():
                p.start()
                assert p.banner.endswith(", 3 shard(s)"), p.banner

            async def traffic(round_: int = round_) -> None:
                # Every shard gets a leader and entries: streams are open between all nodes.
                for i in range(12):
                    req = kv_pb2.PutRequest(key=b"k%d-%d" % (round_, i), value=b"v")
                    resp = await _call(client, list(NAMES), "Put", req, kv_pb2.PutResponse)
                    assert resp.succeeded

            asyncio.run(traffic())
        finally:
            for p in procs.values():  # all at once: each sees its peers go while it stops
                if p.p is not None and p.p.poll() is None:
                    p.p.send_signal(signal.SIGTERM)
            codes = {n: p._reap() for n, p in procs.items() if p.p is not None}
        assert codes == {n: 0 for n in NAMES}, codes
        for n in NAMES:
            log = (tmp_path / f"{n}.log").read_text()
            assert _alarming(log) == [], (round_, n, log[-3000:])

    # Under membership the node cannot know the count at start: it says so (it used to print
    # "1 shard(s)", the --shards default, while membership placed 8 on it).
    managed = Proc(
        "m",
        [
            "--name", "m", "--data-dir", str(tmp_path / "m"),
            "--listen-peer", f"127.0.0.1:{free_port()}",
            "--listen-client", f"127.0.0.1:{free_port()}",
            "--membership", f"127.0.0.1:{free_port()}",  # nobody there: nothing placed yet
        ],
        tmp_path / "m.log",
    )  # fmt: skip
    managed.start()
    try:
        assert managed.banner.endswith(
            ", shards placed by membership (none yet: waiting for the cluster map)"
        ), managed.banner
    finally:
        assert managed.term() == 0


def test_start_line_of_a_node_placed_by_membership(tmp_path: Path) -> None:
    """A node placed by membership learns its shards from the map after it starts: its start
    line says so, and one line says what it hosts once the map came; restarted, it hosts them
    from disk and its start line counts them."""
    m_client = free_port()
    membership = Proc(
        "m1",
        [
            "--name", "m1", "--data-dir", str(tmp_path / "m1"),
            "--initial-cluster", f"m1=127.0.0.1:{free_port()}",
            "--listen-client", f"127.0.0.1:{m_client}",
            "--shards", "4", "--replication-factor", "1", "--min-nodes", "1",
        ],
        tmp_path / "m1.log",
        module="dkv_membership.main",
    )  # fmt: skip
    client = {"n1": free_port()}
    args = [
        "--name", "n1", "--data-dir", str(tmp_path / "n1"),
        "--listen-peer", f"127.0.0.1:{free_port()}", "--listen-client", f"127.0.0.1:{client['n1']}",
        "--membership", f"127.0.0.1:{m_client}",
    ]  # fmt: skip
    membership.start()
    try:
        node = Proc("n1", args, tmp_path / "n1.log")
        node.start()
        try:
            assert node.banner.endswith(
                ", shards placed by membership (none yet: waiting for the cluster map)"
            ), node.banner

            async def put_everywhere() -> None:
                # Until the map placed the shards, writes are refused (retried); a write to
                # every shard succeeds once all 4 are hosted.
                for i in range(16):
                    req = kv_pb2.PutRequest(key=b"k%d" % i, value=b"v")
                    resp = await _call(client, ["n1"], "Put", req, kv_pb2.PutResponse)
                    assert resp.succeeded

            asyncio.run(put_everywhere())
        finally:
            assert node.term() == 0
        assert "n1: hosting 4 of 4 shard(s) (cluster map v" in (tmp_path / "n1.log").read_text()

        restarted = Proc("n1", args, tmp_path / "n1.log")
        restarted.start()
        try:
            assert restarted.banner.endswith(", 4 of 4 shard(s) hosted, placed by membership"), (
                restarted.banner
            )
        finally:
            assert restarted.term() == 0
    finally:
        assert membership.term() == 0
