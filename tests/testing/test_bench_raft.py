"""`make bench-raft`'s core benchmark runs to its end: every node applies every entry (it exits
with the node that did not otherwise)."""

from __future__ import annotations

from bench.bench_raft import run_raft_bench


def test_every_node_applies_every_entry_of_the_raft_benchmark() -> None:
    got = run_raft_bench(total_entries=2_000, batch=100, payload_bytes=16)
    assert got.entries == 2_000 and got.nodes == 3 and got.entries_per_s > 0
