"""Read Jepsen register logs into histories for :func:`~dkv.testing.models.register_model`.

The logs are Jepsen's etcd test output, one event per line::

    INFO  jepsen.util - 2	:invoke	:cas	[3 0]
    INFO  jepsen.util - 2	:ok	:cas	[3 0]
    INFO  jepsen.util - 4	:info	:write	:timed-out

(process, type, function, value; the separators are tabs or runs of spaces).
Lines of any other shape are skipped.  Each event's position among the parsed
events is its timestamp.  Completion types:

* ``:ok`` -- the operation happened; a read's value is its output.
* ``:fail`` -- the operation definitely did not happen: it is dropped.
* ``:info`` -- unknown: it may have happened at any time after its call, or
  never (output :data:`~dkv.testing.linearizability.UNKNOWN_OUTPUT`, return
  time infinity).  A process that invoked and never completed is treated the
  same way.  Unknown reads are dropped: they have no effect and constrain nothing.

The labelled set used by the tests lives in ``../shared/testdata/jepsen-etcd``
next to the repository (override with ``DKV_JEPSEN_DIR``); ``labels.json`` maps
file names to whether each history is linearizable.  ``python -m
dkv.testing.jepsen [DIR]`` checks the whole set and prints the timing.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from dkv.testing.linearizability import (
    UNKNOWN_OUTPUT,
    CheckResult,
    LinearizabilityResult,
    Operation,
    check_operations_verbose,
)
from dkv.testing.models import register_model

__all__ = [
    "JEPSEN_DIR_ENV",
    "JepsenFileResult",
    "JepsenSetResult",
    "check_jepsen_file",
    "check_jepsen_files",
    "check_jepsen_set",
    "default_jepsen_dir",
    "load_labels",
    "main",
    "parse_jepsen_lines",
    "parse_jepsen_log",
    "parse_jepsen_value",
]

JEPSEN_DIR_ENV = "DKV_JEPSEN_DIR"

_LINE = re.compile(
    r"^\s*INFO\s+jepsen\.util\s+-\s+(\d+)\s+:(invoke|ok|fail|info)\s+:([\w-]+)\s*(.*?)\s*$"
)


def parse_jepsen_value(text: str) -> Any:
    """Parse a Jepsen value: ``nil`` -> None, integers, ``[a b]`` -> tuple, ``:kw`` -> ``"kw"``."""
    text = text.strip()
    if text in ("", "nil"):
        return None
    if text.startswith("[") and text.endswith("]"):
        return tuple(parse_jepsen_value(part) for part in text[1:-1].split())
    if text.startswith(":"):
        return text[1:]
    try:
        return int(text)
    except ValueError:
        return text


def _register_input(f: str, value: Any) -> tuple[str, Any]:
    if f == "read":
        return ("read", None)
    if f == "write":
        return ("write", value)
    if f == "cas":
        if not (isinstance(value, tuple) and len(value) == 2):
            raise ValueError(f"cas needs [from to], got {value!r}")
        return ("cas", value)
    raise ValueError(f"unsupported Jepsen function :{f}")


def parse_jepsen_lines(lines: Iterable[str]) -> list[Operation]:
    """Parse the lines of a Jepsen register log into a history (see the module docstring)."""
    pending: dict[int, tuple[float, str, Any]] = {}
    ops: list[Operation] = []
    t = 0
    for line in lines:
        m = _LINE.match(line)
        if m is None:
            continue
        process, kind, f, raw = int(m[1]), m[2], m[3], m[4]
        t += 1
        if kind == "invoke":
            if process in pending:
                raise ValueError(f"process {process} invoked twice without completing (line {t})")
            pending[process] = (t, f, parse_jepsen_value(raw))
            continue
        try:
            call, invoked_f, invoked_value = pending.pop(process)
        except KeyError:
            raise ValueError(f"process {process}: :{kind} without :invoke") from None
        if invoked_f != f:
            raise ValueError(f"process {process}: invoked :{invoked_f}, completed :{f}")
        if kind == "fail":
            continue
        inp = _register_input(f, invoked_value)
        if kind == "info":
            if f != "read":
                ops.append(Operation(process, inp, call, UNKNOWN_OUTPUT, math.inf))
            continue
        # :ok
        if f == "read":
            output: Any = parse_jepsen_value(raw)
        elif f == "cas":
            output = True
        else:
            output = None
        ops.append(Operation(process, inp, call, output, t))
    for process, (call, f, value) in pending.items():
        if f != "read":
            ops.append(
                Operation(process, _register_input(f, value), call, UNKNOWN_OUTPUT, math.inf)
            )
    ops.sort(key=lambda op: op.call)
    return ops


def parse_jepsen_log(path: str | os.PathLike[str]) -> list[Operation]:
    """Parse a Jepsen register log file into a history."""
    with open(path, encoding="utf-8") as fh:
        return parse_jepsen_lines(fh)


def default_jepsen_dir() -> Path:
    """``$DKV_JEPSEN_DIR``, else ``<repo>/../shared/testdata/jepsen-etcd`` (it may not exist)."""
    env = os.environ.get(JEPSEN_DIR_ENV)
    if env:
        return Path(env)
    repo_root = Path(__file__).resolve().parents[3]
    return repo_root.parent / "shared" / "testdata" / "jepsen-etcd"


def load_labels(directory: str | os.PathLike[str]) -> dict[str, bool]:
    """``labels.json``'s ``linearizable`` map: file name -> expected verdict."""
    with open(Path(directory) / "labels.json", encoding="utf-8") as fh:
        data = json.load(fh)
    return {str(name): bool(value) for name, value in data["linearizable"].items()}


@dataclass(frozen=True)
class JepsenFileResult:
    """Outcome of checking one labelled log."""

    name: str
    expected: bool
    result: LinearizabilityResult
    operations: int
    elapsed_s: float

    @property
    def agrees(self) -> bool:
        """True when the verdict matches the label (UNKNOWN never agrees)."""
        want = CheckResult.OK if self.expected else CheckResult.ILLEGAL
        return self.result.result is want


class JepsenSetResult(NamedTuple):
    """Summary of :func:`check_jepsen_set`."""

    agreements: int
    total: int
    elapsed_s: float


def check_jepsen_file(
    directory: str | os.PathLike[str],
    name: str,
    expected: bool,
    *,
    timeout_s: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> JepsenFileResult:
    """Parse and check one log with the register model (elapsed time includes parsing)."""
    start = clock()
    history = parse_jepsen_log(Path(directory) / name)
    result = check_operations_verbose(register_model(), history, timeout_s=timeout_s, clock=clock)
    return JepsenFileResult(name, expected, result, len(history), clock() - start)


def check_jepsen_files(
    directory: str | os.PathLike[str] | None = None,
    *,
    timeout_s: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> list[JepsenFileResult]:
    """Check every labelled log of ``directory`` (default :func:`default_jepsen_dir`)."""
    directory = default_jepsen_dir() if directory is None else Path(directory)
    labels = load_labels(directory)
    return [
        check_jepsen_file(directory, name, expected, timeout_s=timeout_s, clock=clock)
        for name, expected in sorted(labels.items())
    ]


def check_jepsen_set(
    directory: str | os.PathLike[str] | None = None,
    *,
    timeout_s: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> JepsenSetResult:
    """Check the whole labelled set; returns (agreements, total, elapsed seconds).

    Elapsed time covers parsing and checking every labelled file.
    """
    start = clock()
    results = check_jepsen_files(directory, timeout_s=timeout_s, clock=clock)
    elapsed = clock() - start
    return JepsenSetResult(sum(r.agrees for r in results), len(results), elapsed)


def main(argv: list[str] | None = None) -> int:
    """Check the labelled set and print per-file disagreements and the total time."""
    args = sys.argv[1:] if argv is None else argv
    directory = Path(args[0]) if args else default_jepsen_dir()
    if not (directory / "labels.json").is_file():
        print(f"no Jepsen set at {directory} (set {JEPSEN_DIR_ENV})", file=sys.stderr)
        return 2
    start = time.perf_counter()
    results = check_jepsen_files(directory)
    elapsed = time.perf_counter() - start
    for r in results:
        if not r.agrees:
            print(f"{r.name}: expected linearizable={r.expected}, got {r.result.result.value}")
    slowest = max(results, key=lambda r: r.elapsed_s, default=None)
    agreements = sum(r.agrees for r in results)
    print(
        f"jepsen-etcd: {agreements}/{len(results)} verdicts agree with the labels in {elapsed:.2f}s"
    )
    if slowest is not None:
        print(f"slowest: {slowest.name} ({slowest.operations} ops) {slowest.elapsed_s:.3f}s")
    return 0 if agreements == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
