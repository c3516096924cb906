"""The deterministic simulator: many seeds with zero violations, determinism, replayability,
and proof that it catches a broken core.

``DKV_SIM_SEEDS`` (default 300) sets how many seeds run; they are split into chunks so that
``pytest -n auto`` spreads them over the cores. A failing chunk lists, for every failing seed,
the report that ends with the one command that replays it (``make sim SEED=n``). For a long
sweep, ``DKV_SIM_SEEDS=10000 make test`` or ``python -m dkv.testing.sim --seeds 0:10000
--jobs 2``.
"""

from __future__ import annotations

import dataclasses
import io
import os
import random
import subprocess
import sys

import pytest

from dkv.raft import ReadOnlyOption, core
from dkv.raft.log import RaftLog
from dkv.raft.types import Message
from dkv.testing.sim import (
    MAX_IN_FLIGHT_MSGS,
    SimParams,
    SimResult,
    Simulator,
    main,
    replay_command,
    run_seed,
)

SEEDS = int(os.environ.get("DKV_SIM_SEEDS", "300"))
CHUNK = 10
CHUNKS = [range(lo, min(lo + CHUNK, SEEDS)) for lo in range(0, SEEDS, CHUNK)]


@pytest.mark.parametrize("seeds", CHUNKS, ids=[f"seeds-{c.start}-{c.stop - 1}" for c in CHUNKS])
def test_seeds_have_no_violations(seeds: range) -> None:
    failures = [r for r in map(run_seed, seeds) if not r.ok]
    assert not failures, "\n\n".join(r.failure or "" for r in failures)


def test_the_same_seed_replays_the_same_run() -> None:
    a, b = Simulator(7), Simulator(7)
    ra, rb = a.run(), b.run()
    assert ra.ok and rb.ok
    assert ra.fingerprint == rb.fingerprint
    assert list(a.trace_tail) == list(b.trace_tail)
    assert a.history == b.history
    assert ra.stats == rb.stats
    assert run_seed(8).fingerprint != ra.fingerprint


def test_a_seed_replays_identically_in_another_process() -> None:
    """No hidden nondeterminism (str hashing, set order, clocks): two fresh interpreters with
    different hash seeds print the same fingerprint, the one this process computes."""
    expected = run_seed(12).fingerprint
    for hash_seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-m", "dkv.testing.sim", "--seed", "12"],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
        ).stdout
        assert f"fingerprint {expected}" in out, out


def test_one_seed_draws_its_own_faults() -> None:
    """Swarm testing: parameters differ between seeds and come only from the seed."""
    drawn = [SimParams.draw(random.Random(s)) for s in range(40)]
    assert drawn[3] == SimParams.draw(random.Random(3))
    assert {p.voters for p in drawn} == {3, 5}
    assert {p.read_only for p in drawn} == set(ReadOnlyOption)
    assert len({p.drop_prob for p in drawn}) > 2
    assert any(p.crash_prob == 0 for p in drawn) and any(p.crash_prob > 0 for p in drawn)


def test_faults_actually_happen() -> None:
    """Guard against a simulator that quietly stopped injecting what it claims to."""
    totals: dict[str, int] = {}
    for seed in range(20):
        r = run_seed(seed)
        assert r.ok, r.failure
        for k, v in r.stats.items():
            totals[k] = totals.get(k, 0) + v
    for stat in (
        "msgs_dropped",
        "msgs_duplicated",
        "crashes",
        "partitions",
        "transfers",
        "conf_changes_applied",
        "snapshots_installed",
        "reads_read_index",
        "ops_ok",
    ):
        assert totals[stat] > 0, f"no {stat} in 20 seeds: {totals}"
    assert totals["leaders_elected"] > 20


def test_verbose_mode_prints_parameters_and_a_readable_trace() -> None:
    out = io.StringIO()
    result = Simulator(3, verbose=True, out=out).run()
    text = out.getvalue()
    assert result.ok
    assert text.startswith("seed 3: voters=")
    assert "drop_prob=" in text and "crash_prob=" in text
    assert " leader in term " in text
    assert "committed up to " in text
    assert "liveness phase" in text and "converged" in text


def test_in_flight_messages_stay_bounded() -> None:
    sim = Simulator(11)
    peak = 0
    push = sim._push

    def spy(at: int, kind: int, payload: object) -> None:
        nonlocal peak
        push(at, kind, payload)
        peak = max(peak, sim._in_flight)

    sim._push = spy  # type: ignore[method-assign]
    assert sim.run().ok
    assert 0 < peak <= MAX_IN_FLIGHT_MSGS


def test_cli_replays_one_seed_and_sweeps(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--seed", "5"]) == 0
    assert "seed 5 passed" in capsys.readouterr().out
    assert main(["--seeds", "0:3", "--jobs", "1"]) == 0
    assert "3 seeds in" in capsys.readouterr().out


# -- the simulator catches broken cores ----------------------------------------------------------
#
# Each test breaks one rule of Raft in this process (monkeypatch undoes it) and checks that the
# simulator reports the matching violation within a few seeds, with the replay command.


def first_failure(seeds: range, params: SimParams | None = None) -> SimResult:
    for seed in seeds:
        r = Simulator(seed, params=params).run() if params is not None else run_seed(seed)
        if not r.ok:
            return r
    raise AssertionError(f"no violation found in seeds {seeds}")


def assert_reported(r: SimResult, invariant: str, drawn_params: bool = True) -> None:
    assert r.invariant == invariant, r.failure
    assert r.failure is not None
    assert f"invariant: {invariant}" in r.failure
    assert r.failure.count("replay: ") == 1
    last = r.failure.rstrip().splitlines()[-1]
    if drawn_params:
        assert last == f"replay: {replay_command(r.seed)}"
    else:
        assert last.startswith(f"replay: Simulator({r.seed}, params=")


def test_catches_voting_twice_in_one_term(monkeypatch: pytest.MonkeyPatch) -> None:
    original = core.Raft._handle_vote_request

    def forgetful(self: core.Raft, m: Message) -> None:
        self.vote, self.lead = 0, 0  # forget whom we voted for
        original(self, m)

    monkeypatch.setattr(core.Raft, "_handle_vote_request", forgetful)
    assert_reported(first_failure(range(10)), "election safety")


def test_catches_a_missing_election_restriction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(RaftLog, "is_up_to_date", lambda self, index, term: True)
    r = first_failure(range(10))
    assert r.invariant in ("leader completeness", "committed entries are durable"), r.failure
    assert_reported(r, r.invariant)


def test_catches_appends_without_the_consistency_check(monkeypatch: pytest.MonkeyPatch) -> None:
    original = RaftLog.maybe_append

    def careless(
        self: RaftLog, index: int, log_term: int, committed: int, ents: tuple[object, ...]
    ) -> int | None:
        if index <= self.last_index():
            log_term = self.term_or_zero(index)  # pretend the previous entry always matches
        return original(self, index, log_term, committed, ents)  # type: ignore[arg-type]

    monkeypatch.setattr(RaftLog, "maybe_append", careless)
    r = first_failure(range(100))
    assert r.invariant in ("log matching", "committed entries are durable"), r.failure
    assert_reported(r, r.invariant)


def test_catches_reads_served_without_confirming_leadership(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A partitioned leader that answers ReadIndex from its own commit index serves stale
    reads; only the linearizability check can see that."""

    def unconfirmed(self: core.Raft, m: Message) -> None:
        self._respond_read_index(m, self.log.committed)

    monkeypatch.setattr(core.Raft, "_serve_read_index", unconfirmed)
    params = dataclasses.replace(
        SimParams.draw(random.Random(0)),
        check_quorum=False,  # the deposed leader keeps believing it leads
        read_only=ReadOnlyOption.SAFE,
        partition_prob=0.05,
        heal_prob=0.02,
        read_index_prob=0.9,
        keys=1,
    )
    r = first_failure(range(60), params)
    assert_reported(r, "linearizability", drawn_params=False)
    assert "not linearizable" in (r.failure or "")


# -- regressions: core bugs the simulator found ---------------------------------------------------


def test_a_leader_with_a_bare_quorum_stays_in_office() -> None:
    """Found by the degraded liveness phase (a minority of voters kept down): a new leader did
    not count itself at its first CheckQuorum and stepped down one election timeout after
    every election, so with a bare quorum some seeds never committed again (seed 109 then)."""
    from dkv.raft import Config, ConfState, MemoryStorage, Role
    from dkv.testing.memhost import MemoryHost

    rng = random.Random(1)
    hosts = {
        i: MemoryHost(Config(id=i), MemoryStorage(ConfState.of([1, 2, 3])), rng) for i in (1, 2, 3)
    }
    hosts[3].crash()  # 1 and 2 are a quorum

    def deliver() -> None:
        moved = True
        while moved:
            moved = False
            for h in (hosts[1], hosts[2]):
                for m in h.process_ready():
                    moved = True
                    if hosts[m.to].alive:
                        hosts[m.to].raw().step(m)

    hosts[1].raw().campaign()
    deliver()
    assert hosts[1].raw().status().role is Role.LEADER
    for _ in range(3 * Config(id=1).election_timeout_ticks):
        hosts[1].raw().tick()
        hosts[2].raw().tick()
        deliver()
    assert hosts[1].raw().status().role is Role.LEADER  # node 2 answered every heartbeat
