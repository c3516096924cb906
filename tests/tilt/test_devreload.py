"""dkv.cli.devreload, the restarter and seeder of the chart's dev.liveUpdate (tilt/Tiltfile),
with real child processes: a restart on the trigger, SIGTERM forwarded for a graceful stop,
SIGKILL for a child that ignores SIGTERM on a restart, the child's own exit passed on, and
that the seeded copy really shadows the installed packages for a console script.

Nothing here waits on a clock: every step waits for the line the child prints when it happened.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from dkv.cli import devreload

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    mode = sys.argv[1]

    def term(signum, frame):
        print(f"term {os.getpid()}", flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "ignore-term" else term)
    signal.signal(signal.SIGUSR1, lambda s, f: print(f"usr1 {os.getpid()}", flush=True))
    print(f"ready {os.getpid()}", flush=True)
    if mode == "exit3":
        sys.exit(3)
    if mode == "kill-self":
        os.kill(os.getpid(), signal.SIGKILL)
    while True:
        signal.pause()
    """
)


class Supervised:
    """``python -I -m dkv.cli.devreload run`` around the child script, as the chart runs it."""

    def __init__(self, tmp: Path, mode: str, *extra: str) -> None:
        script = tmp / "child.py"
        script.write_text(CHILD)
        self.trigger = tmp / "restart"
        self.log = (tmp / "supervisor.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-m", "dkv.cli.devreload", "run", "--trigger",
             str(self.trigger), *extra, "--", sys.executable, str(script), mode],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )  # fmt: skip
        self.touches = 0

    def line(self) -> tuple[str, int]:
        assert self.proc.stdout is not None
        text = self.proc.stdout.readline()
        assert text, "the supervisor's output ended"
        what, pid = text.split()
        return what, int(pid)

    def touch(self) -> None:
        """A new modification time every call (as Tilt's `touch` gives)."""
        self.touches += 1
        self.trigger.touch()
        stamp = 1_000_000_000 * (1_600_000_000 + self.touches)
        os.utime(self.trigger, ns=(stamp, stamp))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self.log.close()


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[list[Supervised]]:
    made: list[Supervised] = []
    yield made
    for s in made:
        s.close()


def start(made: list[Supervised], tmp: Path, mode: str, *extra: str) -> Supervised:
    s = Supervised(tmp, mode, *extra)
    made.append(s)
    return s


def test_restarts_on_the_trigger_and_stops_gracefully_on_sigterm(
    tmp_path: Path, supervised: list[Supervised]
) -> None:
    s = start(supervised, tmp_path, "serve")
    what, first = s.line()
    assert what == "ready"
    s.touch()
    assert s.line() == ("term", first)  # the old process got SIGTERM ...
    what, second = s.line()  # ... and a new one started
    assert what == "ready" and second != first
    s.touch()
    assert s.line() == ("term", second)
    what, third = s.line()
    assert what == "ready" and third not in (first, second)
    # Other signals reach the child and change nothing.
    s.proc.send_signal(signal.SIGUSR1)
    assert s.line() == ("usr1", third)
    # Kubernetes stops the container: SIGTERM to the supervisor (PID 1) reaches the process,
    # and the supervisor ends with it, without a restart.
    s.proc.send_signal(signal.SIGTERM)
    assert s.line() == ("term", third)
    assert s.proc.wait() == 0
    assert s.proc.stdout is not None and s.proc.stdout.read() == ""


def test_a_child_that_ignores_sigterm_is_killed_on_restart(
    tmp_path: Path, supervised: list[Supervised]
) -> None:
    s = start(supervised, tmp_path, "ignore-term", "--stop-timeout", "0.2")
    _, first = s.line()
    s.touch()
    what, second = s.line()
    assert what == "ready" and second != first
    with pytest.raises(ProcessLookupError):
        os.kill(first, 0)  # gone (SIGKILL), and reaped by the supervisor
    s.proc.send_signal(signal.SIGINT)  # a stop signal the child does not ignore ... (SIGINT)
    assert s.proc.wait() == 128 + signal.SIGINT  # Python's default: KeyboardInterrupt ends it


@pytest.mark.parametrize(("mode", "status"), [("exit3", 3), ("kill-self", 128 + 9)])
def test_the_childs_own_exit_ends_the_supervisor_with_its_status(
    tmp_path: Path, supervised: list[Supervised], mode: str, status: int
) -> None:
    s = start(supervised, tmp_path, mode)
    assert s.line()[0] == "ready"
    assert s.proc.wait() == status


def test_run_refuses_a_missing_command(tmp_path: Path) -> None:
    assert devreload.main(["run", "--trigger", str(tmp_path / "t"), "--"]) == 2
    missing = str(tmp_path / "no-such-program")
    assert devreload.main(["run", "--trigger", str(tmp_path / "t"), "--", missing]) == 127


PACKAGES = ["dkv", "dkv_node", "dkv_membership", "dkv_gateway"]


def test_seed_copies_whole_packages_without_bytecode_and_keeps_what_is_there(
    tmp_path: Path,
) -> None:
    dest = tmp_path / "python"
    copied = devreload.seed(dest, PACKAGES)
    assert sorted(p.name for p in copied) == sorted(PACKAGES)
    import dkv

    installed = Path(dkv.__file__).parent
    want = {
        p.relative_to(installed)
        for p in installed.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    got = {p.relative_to(dest / "dkv") for p in (dest / "dkv").rglob("*") if p.is_file()}
    assert got == want
    assert not list(dest.rglob("__pycache__"))
    assert (dest / "dkv_gateway" / "dkv_descriptor.pb").is_file()  # package data too
    # Seeding again (the init container of a pod whose volume lives on) keeps synced edits.
    marker = dest / "dkv" / "edited_by_tilt.py"
    marker.write_text("EDITED = True\n")
    assert devreload.seed(dest, PACKAGES) == []
    assert marker.is_file()
    with pytest.raises(LookupError):
        devreload.seed(dest, ["no_such_package_here"])
    assert devreload.main(["seed", "--dest", str(dest), "no_such_package_here"]) == 1


def test_the_seeded_copy_shadows_the_installed_packages(tmp_path: Path) -> None:
    """A console script (dkv-node's, as the container runs it) imports the copy first on
    PYTHONPATH, edits included -- not the installed package, whatever .pth files or editable
    finders the environment has."""
    dest = tmp_path / "python"
    devreload.seed(dest, PACKAGES)
    init = dest / "dkv_node" / "__init__.py"
    init.write_text(
        init.read_text() + "\nimport sys as _sys\nprint('SHADOWED', __file__, file=_sys.stderr)\n"
    )
    dkv_node = Path(sys.executable).parent / "dkv-node"
    env = {**os.environ, "PYTHONPATH": str(dest), "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run(
        [str(dkv_node), "--help"], env=env, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert f"SHADOWED {init}" in out.stderr
    probe = "import dkv, dkv_gateway; print(dkv.__file__); print(dkv_gateway.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == [
        str(dest / "dkv" / "__init__.py"),
        str(dest / "dkv_gateway" / "__init__.py"),
    ]
    # Without PYTHONPATH (the restarter itself runs with -I): the installed package.
    out = subprocess.run(
        [sys.executable, "-I", "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    assert str(dest) not in out.stdout
