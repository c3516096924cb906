"""The checker against Jepsen's labelled etcd histories, and the log parser."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from dkv.testing.jepsen import (
    JEPSEN_DIR_ENV,
    check_jepsen_file,
    check_jepsen_set,
    default_jepsen_dir,
    load_labels,
    parse_jepsen_lines,
    parse_jepsen_log,
    parse_jepsen_value,
)
from dkv.testing.linearizability import UNKNOWN_OUTPUT, CheckResult, check_operations
from dkv.testing.models import register_model

JEPSEN_DIR = default_jepsen_dir()
HAVE_SET = (JEPSEN_DIR / "labels.json").is_file()
LABELS = load_labels(JEPSEN_DIR) if HAVE_SET else {}
NO_SET = f"Jepsen etcd histories not found at {JEPSEN_DIR} (set {JEPSEN_DIR_ENV})"


# --------------------------------------------------------------------------- the labelled set


@pytest.mark.parametrize(
    "name",
    [pytest.param(name, id=name) for name in sorted(LABELS)]
    or [pytest.param(None, id="no-jepsen-set")],
)
def test_verdict_matches_label(name: str | None) -> None:
    if name is None:
        pytest.skip(NO_SET)
    expected = LABELS[name]
    outcome = check_jepsen_file(JEPSEN_DIR, name, expected, timeout_s=120.0)
    want = CheckResult.OK if expected else CheckResult.ILLEGAL
    assert outcome.result.result is want, outcome.result.explain()
    assert outcome.agrees
    assert outcome.operations > 0


def test_labelled_set_is_complete() -> None:
    if not HAVE_SET:
        pytest.skip(NO_SET)
    assert len(LABELS) == 102
    assert sum(LABELS.values()) == 23
    assert "etcd_095.log" not in LABELS
    logs = sorted(p.name for p in JEPSEN_DIR.glob("etcd_*.log"))
    assert len(logs) == 103
    assert set(LABELS) == set(logs) - {"etcd_095.log"}


def test_unlabelled_log_parses() -> None:
    if not HAVE_SET:
        pytest.skip(NO_SET)
    history = parse_jepsen_log(JEPSEN_DIR / "etcd_095.log")
    assert check_operations(register_model(), history, timeout_s=120.0) is not CheckResult.UNKNOWN


def test_every_event_of_the_set_is_parsed() -> None:
    if not HAVE_SET:
        pytest.skip(NO_SET)
    # Some logs use runs of spaces instead of tabs.  Every invocation must become an
    # operation unless it :fail-ed (the set has no :info reads, which would be dropped).
    spaced = 0
    for name in LABELS:
        lines = (JEPSEN_DIR / name).read_text().splitlines()
        spaced += any("\t" not in line for line in lines if line.strip())
        kinds = [line.split()[4] for line in lines if line.strip()]
        expected = kinds.count(":invoke") - kinds.count(":fail")
        assert len(parse_jepsen_log(JEPSEN_DIR / name)) == expected, name
    assert spaced > 0


# --------------------------------------------------------------------------- the parser

SAMPLE = """\
2017-01-01 12:00:00,000{GW} - jepsen.core Running test
INFO  jepsen.util - 0	:invoke	:read	nil
INFO  jepsen.util - 1	:invoke	:write	4
INFO  jepsen.util - 0	:ok	:read	nil
INFO  jepsen.util - 1	:ok	:write	4
INFO  jepsen.util - 2   :invoke :cas    [4 0]
INFO  jepsen.util - 2   :ok     :cas    [4 0]
INFO  jepsen.util - :nemesis	:info	:start	nil
INFO  jepsen.util - 3	:invoke	:cas	[1 2]
INFO  jepsen.util - 3	:fail	:cas	[1 2]
INFO  jepsen.util - 4	:invoke	:write	1
INFO  jepsen.util - 4	:info	:write	:timed-out
INFO  jepsen.util - 0	:invoke	:read	nil
INFO  jepsen.util - 0	:fail	:read	:timed-out

INFO  jepsen.util - 9	:invoke	:cas	[0 3]
INFO  jepsen.util - 5	:invoke	:read	nil
INFO  jepsen.util - 5	:ok	:read	3
"""


def test_parse_sample() -> None:
    ops = parse_jepsen_lines(SAMPLE.splitlines())
    summary = [(op.client_id, op.input, op.output, op.call, op.return_) for op in ops]
    assert summary == [
        (0, ("read", None), None, 1, 3),
        (1, ("write", 4), None, 2, 4),
        (2, ("cas", (4, 0)), True, 5, 6),
        (4, ("write", 1), UNKNOWN_OUTPUT, 9, math.inf),  # :info
        (9, ("cas", (0, 3)), UNKNOWN_OUTPUT, 13, math.inf),  # never completed
        (5, ("read", None), 3, 14, 15),
    ]
    # The read of 3 is explained only by the cas that never completed.
    assert check_operations(register_model(), ops) is CheckResult.OK
    without_cas = [op for op in ops if op.client_id != 9]
    assert check_operations(register_model(), without_cas) is CheckResult.ILLEGAL


def test_parse_values() -> None:
    assert parse_jepsen_value("nil") is None
    assert parse_jepsen_value("42") == 42
    assert parse_jepsen_value("[3 nil]") == (3, None)
    assert parse_jepsen_value(":timed-out") == "timed-out"


def test_parse_rejects_inconsistent_logs() -> None:
    with pytest.raises(ValueError, match="without :invoke"):
        parse_jepsen_lines(["INFO  jepsen.util - 0\t:ok\t:read\t1"])
    with pytest.raises(ValueError, match="invoked twice"):
        parse_jepsen_lines(["INFO  jepsen.util - 0\t:invoke\t:read\tnil"] * 2)


# --------------------------------------------------------------------------- the set runner


def _write_set(directory: Path, labels: dict[str, bool]) -> None:
    legal = "INFO  jepsen.util - 0\t:invoke\t:write\t1\nINFO  jepsen.util - 0\t:ok\t:write\t1\n"
    legal += "INFO  jepsen.util - 1\t:invoke\t:read\tnil\nINFO  jepsen.util - 1\t:ok\t:read\t1\n"
    stale = legal.replace(":ok\t:read\t1", ":ok\t:read\tnil")
    (directory / "legal.log").write_text(legal)
    (directory / "stale.log").write_text(stale)
    body = ", ".join(f'"{name}": {"true" if v else "false"}' for name, v in labels.items())
    (directory / "labels.json").write_text(f'{{"linearizable": {{{body}}}}}')


def test_check_jepsen_set_counts_agreements(tmp_path: Path) -> None:
    _write_set(tmp_path, {"legal.log": True, "stale.log": False})
    ticks = iter(range(1000))
    agreements, total, elapsed = check_jepsen_set(tmp_path, clock=lambda: float(next(ticks)))
    assert (agreements, total) == (2, 2)
    assert elapsed > 0


def test_check_jepsen_set_reports_disagreement(tmp_path: Path) -> None:
    _write_set(tmp_path, {"legal.log": True, "stale.log": True})
    result = check_jepsen_set(tmp_path)
    assert (result.agreements, result.total) == (1, 2)
    assert result.elapsed_s >= 0


def test_default_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(JEPSEN_DIR_ENV, str(tmp_path))
    assert default_jepsen_dir() == tmp_path
    monkeypatch.delenv(JEPSEN_DIR_ENV)
    assert default_jepsen_dir().parts[-3:] == ("shared", "testdata", "jepsen-etcd")
