"""``make bench-raft``: throughput of the Raft core, and the checker's time on the Jepsen set.

A 3-node cluster of RawNodes with MemoryStorage in one process, no faults, messages delivered
in rounds. The leader proposes ``--batch`` entries at a time (as a host batches client requests
that arrive during one loop iteration); we count entries committed *and applied on every node*
per second of wall-clock time. This measures the core's CPU cost per entry, the ceiling the
host (issue 3) works under: real hosts add fsync, gRPC and the state machine.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass

from dkv.raft import Config, ConfState, MemoryStorage, Message, RawNode
from dkv.testing.jepsen import check_jepsen_set, default_jepsen_dir

__all__ = ["RaftBenchResult", "main", "run_raft_bench"]


@dataclass(frozen=True)
class RaftBenchResult:
    nodes: int
    batch: int
    payload_bytes: int
    entries: int
    elapsed_s: float
    entries_per_s: float


def _drive(nodes: dict[int, RawNode], storages: dict[int, MemoryStorage]) -> int:
    """Run one round: every node handles its Ready; messages are delivered after the round.

    Returns the number of entries applied by the slowest node in this round (all are equal
    at quiescence)."""
    outbox: list[Message] = []
    applied = 0
    for nid, node in nodes.items():
        if not node.has_ready():
            continue
        rd = node.ready()
        st = storages[nid]
        if rd.entries:
            st.append(rd.entries)
        if rd.hard_state is not None:
            st.set_hard_state(rd.hard_state)
        outbox.extend(rd.messages)
        if nid == 1:
            applied += len(rd.committed_entries)
        node.advance()
    for m in outbox:
        nodes[m.to].step(m)
    return applied


def run_raft_bench(
    total_entries: int = 200_000, batch: int = 1000, payload_bytes: int = 128, nodes: int = 3
) -> RaftBenchResult:
    cs = ConfState.of(list(range(1, nodes + 1)))
    rng = random.Random(7)
    storages = {i: MemoryStorage(cs) for i in range(1, nodes + 1)}
    raws = {i: RawNode(Config(id=i), storages[i], rng) for i in range(1, nodes + 1)}
    raws[1].campaign()
    for _ in range(20):
        _drive(raws, storages)
    payload = b"x" * payload_bytes
    leader = raws[1]
    base = leader.status().applied
    start = time.perf_counter()
    proposed = 0
    applied = 0
    while applied < total_entries:
        # Keep a few batches in flight: the pipeline stays full, as under real load.
        if proposed - applied < 4 * batch and proposed < total_entries:
            leader.propose_batch([payload] * batch)
            proposed += batch
        applied += _drive(raws, storages)
    elapsed = time.perf_counter() - start
    # Every node must have applied everything: a benchmark that loses entries is no benchmark.
    # Followers learn the last commit index from the leader's next heartbeat (no append carries
    # it once proposals stop), so the leader ticks until they have, bounded.
    for _ in range(100):
        if all(n.status().applied >= base + total_entries for n in raws.values()):
            break
        leader.tick()
        _drive(raws, storages)
    for i, node in raws.items():
        st = node.status()
        if st.applied < base + total_entries:
            raise SystemExit(f"node {i} applied only {st.applied - base} of {total_entries}")
    return RaftBenchResult(nodes, batch, payload_bytes, applied, elapsed, applied / elapsed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--entries", type=int, default=200_000)
    p.add_argument("--batch", type=int, nargs="*", default=[1, 100, 1000])
    p.add_argument("--payload-bytes", type=int, default=128)
    p.add_argument("--json", action="store_true", help="print machine-readable results")
    args = p.parse_args(argv)
    results = []
    print(f"Raft core, 3 nodes in one process, no faults, {args.payload_bytes}-byte entries")
    print(f"{'batch':>6} {'entries':>9} {'seconds':>8} {'committed entries/s':>20}")
    for b in args.batch:
        n = min(args.entries, 20_000) if b == 1 else args.entries
        r = run_raft_bench(n, b, args.payload_bytes)
        results.append(asdict(r))
        print(f"{b:>6} {r.entries:>9} {r.elapsed_s:>8.2f} {r.entries_per_s:>20,.0f}")
    jdir = default_jepsen_dir()
    if jdir.is_dir():
        agree, total, secs = check_jepsen_set(jdir)
        print(f"linearizability checker: {agree}/{total} Jepsen labels agreed in {secs:.2f} s")
        results.append({"jepsen_agree": agree, "jepsen_total": total, "jepsen_s": secs})
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
