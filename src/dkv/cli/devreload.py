"""Development only: the live-update loop of ``tilt up`` inside a pod (tilt/Tiltfile, and the
chart's ``dev.liveUpdate`` value). Never used in production, and nothing else imports it.

Two subcommands, run as ``python -I -m dkv.cli.devreload ...`` (``-I``: this process itself
ignores ``PYTHONPATH``, so it keeps running from the installed package however broken the synced
sources are):

``seed --dest DIR PACKAGE...``
    Copies each installed package's directory (found with :func:`importlib.util.find_spec`,
    without importing it) to ``DIR/PACKAGE``, leaving out ``__pycache__``. ``DIR`` is first on
    the processes' ``PYTHONPATH``, so these copies shadow the installed packages; Tilt then syncs
    changed sources over them. The copies must be whole packages: a directory holding only the
    changed files would either be skipped (no ``__init__.py``: a namespace portion loses to the
    installed regular package) or hide every other module. A package already in ``DIR`` is
    kept (the init container ran again for a pod whose volume lives on).

``run --trigger FILE [--stop-timeout S] -- COMMAND [ARG...]``
    Runs ``COMMAND`` and restarts it -- SIGTERM, then SIGKILL after ``--stop-timeout`` seconds
    -- whenever ``FILE``'s modification time changes (Tilt's live update touches it after a
    sync). SIGTERM, SIGINT and SIGQUIT are forwarded to the child and end the supervisor once the
    child is gone, so the pod's graceful stop still reaches the process; SIGHUP, SIGUSR1 and
    SIGUSR2 are forwarded. When the child exits by itself the supervisor exits with its status
    (128 + the signal's number for a signal), and Kubernetes restarts the container as it would
    the process.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

__all__ = ["main", "seed", "supervise"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
FORWARDED_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def _say(message: str) -> None:
    print(f"devreload: {message}", file=sys.stderr, flush=True)


def seed(dest: Path, packages: Sequence[str]) -> list[Path]:
    """Copy each installed package to ``dest / name`` (unless there already); returns what was
    copied. Raises ``LookupError`` for a name that is not an installed package."""
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise LookupError(f"{name} is not an installed package")
        source = Path(next(iter(spec.submodule_search_locations)))
        target = dest / name
        if target.exists():
            continue
        partial = dest / f".{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(source, partial, ignore=shutil.ignore_patterns("__pycache__"))
        partial.rename(target)
        copied.append(target)
    return copied


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_ino)


def _exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def supervise(
    command: Sequence[str],
    trigger: Path,
    *,
    stop_timeout: float = 30.0,
    poll_interval: float = 0.25,
) -> int:
    """Run ``command``, restarting it whenever ``trigger`` changes, until it exits by itself or
    a stop signal arrives. Returns the exit status for the supervisor."""
    stopping: list[int] = []
    child: subprocess.Popen[bytes] | None = None

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if signum in STOP_SIGNALS and not stopping:
            stopping.append(signum)
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    for sig in (*STOP_SIGNALS, *FORWARDED_SIGNALS):
        signal.signal(sig, on_signal)

    def start() -> subprocess.Popen[bytes]:
        started = subprocess.Popen(list(command))
        if stopping:  # a stop signal came while no child ran: this one gets it too
            started.send_signal(stopping[0])
        return started

    seen = _stamp(trigger)
    child = start()
    _say(f"started {command[0]} (pid {child.pid}); touch {trigger} to restart it")
    while True:
        try:
            returncode: int | None = child.wait(timeout=poll_interval)
        except subprocess.TimeoutExpired:
            returncode = None
        if stopping:
            # The signal was forwarded; the pod's grace period bounds the wait.
            returncode = child.wait()
            _say(f"{command[0]} stopped (status {returncode}) on signal {stopping[0]}")
            return _exit_status(returncode)
        if returncode is not None:
            _say(f"{command[0]} exited by itself (status {returncode})")
            return _exit_status(returncode)
        stamp = _stamp(trigger)
        if stamp == seen:
            continue
        seen = stamp
        _say(f"{trigger} changed: restarting {command[0]} (pid {child.pid})")
        child.terminate()
        try:
            child.wait(timeout=stop_timeout)
        except subprocess.TimeoutExpired:
            _say(f"{command[0]} still running {stop_timeout:g} s after SIGTERM: SIGKILL")
            child.kill()
            child.wait()
        if stopping:
            return _exit_status(child.returncode)
        child = start()
        _say(f"restarted {command[0]} (pid {child.pid})")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dkv.cli.devreload",
        description="Development only (tilt up): seed a pod's live-update directory, or run a "
        "process and restart it when a trigger file changes.",
    )
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("seed", help="copy installed packages to DIR (first on PYTHONPATH)")
    s.add_argument("--dest", type=Path, required=True, help="the live-update directory")
    s.add_argument("packages", nargs="+", help="top-level package names, e.g. dkv dkv_node")
    r = sub.add_parser("run", help="run COMMAND, restarting it when --trigger changes")
    r.add_argument("--trigger", type=Path, required=True, help="the file Tilt touches")
    r.add_argument(
        "--stop-timeout",
        type=float,
        default=30.0,
        help="seconds between SIGTERM and SIGKILL on a restart (default 30)",
    )
    r.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG...]")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.what == "seed":
        try:
            copied = seed(args.dest, args.packages)
        except (LookupError, OSError) as exc:
            _say(f"seed failed: {exc}")
            return 1
        for path in copied:
            _say(f"copied {path}")
        return 0
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        _say("run: no COMMAND after --")
        return 2
    if shutil.which(command[0]) is None and not os.path.exists(command[0]):
        _say(f"run: {command[0]} not found")
        return 127
    return supervise(command, args.trigger, stop_timeout=args.stop_timeout)


if __name__ == "__main__":
    sys.exit(main())
