"""`dkv dev` (what `make run` starts) supervises its processes as Kubernetes would.

The real command runs as a subprocess, its output in a file; the test finds its children by
PID in /proc, kills them with SIGKILL and talks to the stack through the front door (and to the
restarted node directly). A process that dies is reported (exit code, signal, log, the tail of
its log) and started again with backoff while the rest keeps serving; a restart waits while
another process holds its port; SIGTERM stops everything. Before the stack is first ready, a
process that keeps dying is a refusal: the command gives up with the reason.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from test_dev_stack import free_layout

from dkv.client import Client
from dkv.devstack import Backoff, DevLayout, DevStack, Supervisor, _Proc
from dkv.errors import DkvError

pytestmark = pytest.mark.slow

READY_S = 180.0  # the whole stack starting on a shared 2-core machine
EVENT_S = 60.0  # one death reported, one restart, the front door serving again
DKV = str(Path(sys.executable).parent / "dkv")


def _proc_name(argv: list[bytes]) -> str | None:
    """The stack's name of a child process ("node n3", "gateway", ...) from its argv."""
    args = [a.decode(errors="replace") for a in argv]
    if args and Path(args[0]).name == "envoy":
        return "envoy"
    name = args[args.index("--name") + 1] if "--name" in args[:-1] else ""
    if "dkv_node.main" in args:
        return f"node {name}"
    if "dkv_membership.main" in args:
        return f"membership {name}"
    if "dkv_gateway.main" in args:
        return "gateway"
    return None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class DevRun:
    """``dkv dev`` as a user runs it, stdout and stderr in one file."""

    def __init__(self, layout: DevLayout, out: Path) -> None:
        self.layout = layout
        self.out = out
        with out.open("wb") as sink:
            self.popen = subprocess.Popen(
                [
                    DKV,
                    "dev",
                    "--root",
                    str(layout.root),
                    "--port-base",
                    str(layout.port_base),
                    "--shards",
                    str(layout.shards),
                ],
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        self.seen: set[int] = set()  # every child PID seen, to check none outlives the run

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def children(self) -> dict[str, int]:
        """Running (not zombie) children of ``dkv dev`` by name."""
        found: dict[str, int] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if int(ppid) != self.popen.pid or state == "Z":
                continue
            name = _proc_name(argv)
            if name is not None:
                found[name] = int(entry.name)
        self.seen.update(found.values())
        return found

    async def wait_output(self, pattern: str, since: int = 0, timeout_s: float = EVENT_S) -> str:
        """The first match of ``pattern`` after offset ``since`` of the output (its groups
        through ``re.Match``: returns the matched text); fails if ``dkv dev`` exits first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            text = self.text()
            m = re.compile(pattern).search(text, since)
            if m is not None:
                return m.group(0)
            if self.popen.poll() is not None:
                raise AssertionError(f"dkv dev exited ({self.popen.returncode}):\n{text}")
            if loop.time() > deadline:
                raise AssertionError(f"not seen within {timeout_s} s: {pattern!r}\n{text}")
            self.children()
            await asyncio.sleep(0.1)

    def stop(self) -> int:
        """SIGTERM, as Ctrl-C; on a hang, SIGKILL it and the children it left."""
        if self.popen.poll() is None:
            self.children()
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(90)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
                for pid in self.seen:
                    if alive(pid):
                        os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"dkv dev did not stop on SIGTERM:\n{self.text()}") from None
        return self.popen.returncode


async def until(
    what: str, probe: Callable[[], Awaitable[object]], timeout_s: float = EVENT_S
) -> None:
    """Poll the coroutine function ``probe`` until it returns truthy without a DkvError."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last = "no answer"
    while True:
        try:
            if await probe():
                return
            last = "not yet"
        except DkvError as exc:
            last = str(exc)
        if loop.time() > deadline:
            raise AssertionError(f"not reached within {timeout_s} s: {what} (last: {last})")
        await asyncio.sleep(0.2)


async def hold_port(port: int, timeout_s: float = 10.0) -> socket.socket:
    """Listen on ``port`` as soon as the process that had it is gone."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        s = socket.socket()
        # As a server would: the killed process's connections in TIME_WAIT do not matter.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
            return s
        except OSError:
            s.close()
            if loop.time() > deadline:
                raise
        await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevRun]:
    layout = free_layout(tmp_path_factory.mktemp("supervised") / ".dkv")
    run = DevRun(layout, layout.root.parent / "dev.out")
    try:
        asyncio.run(run.wait_output(r"dkv is up", timeout_s=READY_S))
        with_data = asyncio.run(_put(layout, b"sup/before", b"1"))
        assert with_data > 0
    except BaseException:
        run.stop()
        raise
    yield run
    code = run.stop()
    text = run.text()
    assert code == 0, text
    assert "stopping dkv" in text
    assert not [pid for pid in run.seen if alive(pid)], "a child outlived dkv dev"


def _door(layout: DevLayout) -> list[str]:
    return [f"127.0.0.1:{layout.front_door}"]


async def _put(layout: DevLayout, key: bytes, value: bytes) -> int:
    async with Client(_door(layout), layout.client_tls_files(), timeout_s=15) as c:
        return int((await c.put(key, value)).header.revision)


def test_a_killed_node_is_reported_and_restarted_while_the_rest_serves(dev: DevRun) -> None:
    asyncio.run(_node_killed(dev))


async def _node_killed(dev: DevRun) -> None:
    lay = dev.layout
    port = lay.node_client(3)
    n3 = f"127.0.0.1:{port}"
    old = dev.children()["node n3"]
    async with Client(_door(lay), lay.client_tls_files(), timeout_s=15) as c:
        since = len(dev.text())
        os.kill(old, signal.SIGKILL)
        # Take n3's client port before the supervisor's first restart (0.5 s after the death
        # is seen): n3 stays down for as long as the test wants, and the restart must wait
        # for the port instead of starting beside another listener.
        holder = await hold_port(port)
        try:
            restarted = re.compile(r"restarted node n3").search(dev.text(), since)
            assert restarted is None, "n3 was restarted before the test could hold its port"
            log = re.escape(str(lay.logs / "n3.log"))
            report = await dev.wait_output(
                rf"node n3 exited with code -9 \(SIGKILL\) after [\d.]+ s \(log: {log}\):\n"
                r"((    .*)?\n)+",
                since,
            )
            tail = [line.strip() for line in report.splitlines()[1:] if line.strip()]
            assert tail and all(line in (lay.logs / "n3.log").read_text() for line in tail)
            await dev.wait_output(
                rf"node n3 cannot start: port {port} \(node n3 \(clients\)\) is held by "
                r"another process\n.*restarting node n3 in [\d.]+ s",
                since,
            )
            # n3 is down; every shard has two of its three replicas: writes go on.
            missed: dict[int, int] = {}
            for i in range(24):
                resp = await c.put(b"sup/while-down/%02d" % i, b"v%d" % i)
                shard = resp.header.shard_id
                missed[shard] = max(missed.get(shard, 0), int(resp.header.revision))
            assert "node n3" not in dev.children(), "n3 started while its port was held"
        finally:
            holder.close()

        line = await dev.wait_output(r"restarted node n3 \(pid \d+", since)
        new = int(line.rsplit(" ", 1)[1])
        assert new != old and dev.children()["node n3"] == new

        # The new n3 serves, from the same data directory, and caught up with the writes it
        # missed.
        async def caught_up() -> bool:
            status = await c.status(n3)
            revisions = {s.shard_id: s.revision for s in status.shards}
            return status.name == "n3" and all(
                revisions.get(shard, 0) >= rev for shard, rev in missed.items()
            )

        await until("n3 serves again and has the writes made while it was down", caught_up)
        got = await c.get(b"sup/before")
        assert [kv.value for kv in got.kvs] == [b"1"]


@pytest.mark.parametrize("name", ["gateway", "envoy"])
def test_a_killed_front_door_process_is_restarted_and_the_door_serves_again(
    dev: DevRun, name: str
) -> None:
    asyncio.run(_front_door_process_killed(dev, name))


async def _front_door_process_killed(dev: DevRun, name: str) -> None:
    lay = dev.layout
    old = dev.children()[name]
    since = len(dev.text())
    os.kill(old, signal.SIGKILL)
    log = re.escape(str(lay.logs / f"{name}.log"))
    await dev.wait_output(
        rf"{name} exited with code -9 \(SIGKILL\) after [\d.]+ s \(log: {log}\):\n    ", since
    )
    line = await dev.wait_output(rf"restarted {name} \(pid \d+", since)
    new = int(line.rsplit(" ", 1)[1])
    assert new != old and dev.children()[name] == new
    async with Client(_door(lay), lay.client_tls_files(), timeout_s=5) as c:

        async def writes() -> bool:
            await c.put(f"sup/after-{name}".encode(), b"ok")
            return True

        await until(f"a write through the front door after {name} restarted", writes)
        got = await c.get(b"sup/before")
        assert [kv.value for kv in got.kvs] == [b"1"]


def test_a_refusal_at_start_up_stops_the_stack_with_its_reason(tmp_path: Path) -> None:
    """n1's data directory is a file: n1 exits at once, every time. After three attempts
    ``dkv dev`` gives up, names the process and shows its log; nothing is left running."""
    layout = free_layout(tmp_path / ".dkv")
    layout.root.mkdir(parents=True)
    (layout.root / "n1").write_text("not a data directory\n")
    run = DevRun(layout, tmp_path / "dev.out")

    async def exited() -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_S
        while run.popen.poll() is None:
            run.children()
            if loop.time() > deadline:
                run.stop()
                raise AssertionError(f"dkv dev did not give up:\n{run.text()}")
            await asyncio.sleep(0.1)
        return run.popen.returncode

    code = asyncio.run(exited())
    text = run.text()
    assert code == 1, text
    assert text.count("node n1 exited with code 1") == 3, text
    assert text.count("restarted node n1") == 2, text
    error = text[text.index("error: ") :]
    assert re.match(
        r"error: node n1 exited with code 1 after [\d.]+ s \(log: .*n1\.log\); that is 3 "
        r"failures before the stack was ready, giving up:\n",
        error,
    ), error
    assert "is not a directory" in error, error
    assert "dkv is up" not in text
    assert not [pid for pid in run.seen if alive(pid)], "a child outlived dkv dev"


def test_backoff_doubles_to_its_cap_and_resets_after_a_long_run(tmp_path: Path) -> None:
    """The supervisor on a real process that exits at once, with the clock in the test's
    hands: 0.5 s, 1, 2, 4, 8, 16, 16 ...; after a run longer than 30 s, 0.5 s again."""
    stack = DevStack(DevLayout(tmp_path))
    toy = _Proc("toy", [sys.executable, "-c", "print('toy ran')"], tmp_path / "toy.log")
    stack.procs = [toy]
    reports: list[str] = []
    now = [1000.0]
    sup = Supervisor(stack, reports.append, clock=lambda: now[0])
    sup.mark_ready()
    toy.start(stack.env)

    def next_delay(up_s: float) -> float:
        """Let the toy exit after ``up_s`` (clock time); the delay the supervisor chose."""
        assert toy.popen is not None
        toy.popen.wait(30)
        now[0] += up_s
        reports.clear()
        sup.poll()
        assert reports[0].startswith("toy exited with code 0 after"), reports
        m = re.fullmatch(r"restarting toy in ([\d.]+) s", reports[-1])
        assert m is not None, reports
        delay = float(m.group(1))
        now[0] += delay
        sup.poll()
        assert re.fullmatch(r"restarted toy \(pid \d+; restart \d+\)", reports[-1]), reports
        return delay

    assert [next_delay(0.1) for _ in range(7)] == [0.5, 1, 2, 4, 8, 16, 16]
    assert next_delay(Backoff().reset_after_s) == 0.5
    assert next_delay(0.1) == 1
    assert toy.popen is not None
    toy.popen.wait(30)
    assert "toy ran" in toy.log_path.read_text()
