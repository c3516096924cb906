"""Scenario tests that read like the Raft paper: one file per scenario in ``testdata/``.

Each file is a script in the command language of :mod:`dkv.testing.interaction` with the
expected rendering of what every node did; the header comment of each file cites the sentence
of the Raft paper or thesis it checks. Regenerate with ``pytest --rewrite`` (or
``DKV_REWRITE=1``) and review the diff: the expected output is the specification.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dkv.testing.interaction import ScenarioError, run_scenario_file

TESTDATA = Path(__file__).parent / "testdata"
SCENARIOS = sorted(TESTDATA.glob("*.txt"))

# Scenarios whose expected output is the correct behaviour that the core does not show yet.
# strict: when the core is fixed the test XPASSes and fails, so the marker gets removed.
# (None at the moment; lease-read-stale was one until the lease was bounded by acknowledged
# heartbeat send ticks.)
KNOWN_BUGS: dict[str, str] = {}


def _param(path: Path) -> object:
    reason = KNOWN_BUGS.get(path.stem)
    marks = [pytest.mark.xfail(reason=reason, strict=True, raises=AssertionError)] if reason else []
    return pytest.param(path, id=path.stem, marks=marks)


def test_every_known_bug_has_a_scenario() -> None:
    assert set(KNOWN_BUGS) <= {p.stem for p in SCENARIOS}


@pytest.mark.parametrize("path", [_param(p) for p in SCENARIOS])
def test_scenario(path: Path, rewrite: bool) -> None:
    # A known-bug file holds the correct behaviour, written by hand: never overwrite it with
    # what the buggy core does.
    run_scenario_file(path, rewrite=rewrite and path.stem not in KNOWN_BUGS)


# -- the runner itself ----------------------------------------------------------------------------

_SMALL = """\
# a comment
add-nodes 1 voters=1
----
{out}

campaign 1
----
ok
"""


def test_mismatch_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "s.txt"
    path.write_text(_SMALL.format(out="wrong"))
    with pytest.raises(AssertionError) as info:
        run_scenario_file(path)
    message = str(info.value)
    assert f"{path}:2 `add-nodes 1 voters=1` (expected)" in message
    assert "-wrong" in message
    assert f"{path}:6" in message  # `campaign 1` differs too (a single voter becomes leader)


def test_rewrite_regenerates_in_place_and_is_stable(tmp_path: Path) -> None:
    path = tmp_path / "s.txt"
    path.write_text(_SMALL.format(out="wrong") + "\npropose 1 k=v\n")
    run_scenario_file(path, rewrite=True)
    text = path.read_text()
    assert "# a comment\n" in text
    assert "propose 1 k=v\n----\nproposed at index 3\n" in text
    run_scenario_file(path)  # the rewritten file now passes
    run_scenario_file(path, rewrite=True)
    assert path.read_text() == text


@pytest.mark.parametrize(
    "command",
    [
        "no-such-command",
        "campaign 9",
        "add-nodes 1 votres=1",
        "add-nodes 1 index=2",  # gone: MemoryStorage bootstraps with a snapshot at index 1
        "add-nodes 1 learners=3",  # a bootstrapped group needs a voter
        "tick count=x",
    ],
)
def test_malformed_commands_fail_loudly(tmp_path: Path, command: str) -> None:
    path = tmp_path / "s.txt"
    path.write_text(f"add-nodes 1 voters=1\n----\nok\n\n{command}\n----\nok\n")
    with pytest.raises(ScenarioError, match=r"s\.txt:5"):
        run_scenario_file(path)
