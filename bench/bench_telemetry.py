"""``make bench-telemetry``: what metrics (and tracing) cost on the data path, through the front
door, as ``make bench`` measures it.

The same stack as ``make bench`` (:func:`bench.bench_front_door.bench_stack`: membership,
three nodes, gateway, Envoy; client ports plaintext for h2load), started once per *variant*:

- **metrics off**: every process with ``--listen-metrics off``, which also stops recording on
  the hot paths (the baseline);
- **metrics on**: as ``make run`` runs it (recorded, served, not scraped: a scrape every 15 s
  costs a few milliseconds and is not what is measured here);
- **tracing 0.01**: metrics on, and traces exported over OTLP with
  ``parentbased_traceidratio`` at 0.01 (Envoy samples at 1% too) into a Jaeger the stack
  starts (as ``make run`` does) — where Jaeger is built (``make jaeger``); otherwise the variant
  is reported as not run.

Variants alternate over ``--rounds`` rounds (the machine drifts: alternating spreads the drift
over all of them) and every run is verified as in ``make bench``. The summary gives each
variant's mean requests/s and its ratio to metrics off; the issue's target is a cost under 5%
with metrics on and tracing off (a target for this benchmark, never an assertion in a test).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.bench_front_door import ROWS, Result, bench_stack
from bench.bench_node import (
    KEY,
    TOOLS,
    VALUE,
    _check_bodies,
    _raise_on_sigterm,
    grpc_frame,
    missing_tools,
)
from dkv.telemetry.jaeger import find_jaeger
from dkv.v1 import kv_pb2

__all__ = ["VARIANTS", "main", "summary"]

TARGET_COST = 0.05  # metrics on may cost at most this share of throughput (the target)


@dataclass(frozen=True)
class Variant:
    name: str
    metrics: bool
    trace_ratio: float | None = None  # None: tracing off


VARIANTS = (
    Variant("metrics off", metrics=False),
    Variant("metrics on", metrics=True),
    Variant("tracing 0.01", metrics=True, trace_ratio=0.01),
)
# put and linearizable get at 64 in flight (where the per-request cost shows), put at 1.
BENCH_ROWS = (ROWS[1], ROWS[3], ROWS[0])


def tracing_available() -> bool:
    """A trace backend to export to: the Jaeger ``make jaeger`` builds."""
    return find_jaeger() is not None


def summary(by_variant: dict[str, list[Result]]) -> str:
    """Mean verified requests/s per row and variant, and the ratio to metrics off."""
    base_name = VARIANTS[0].name
    keys = [(r.op, r.in_flight) for r in BENCH_ROWS]

    def mean_rate(name: str, key: tuple[str, int]) -> float | None:
        rates = [r.rate for r in by_variant.get(name, []) if r.key == key]
        ok = [x for x in rates if x is not None]
        return sum(ok) / len(ok) if ok and len(ok) == len(rates) else None

    lines = [
        f"{'row':<26}" + "".join(f"{v.name:>22}" for v in VARIANTS),
    ]
    for key in keys:
        base = mean_rate(base_name, key)
        cells = []
        for v in VARIANTS:
            rate = mean_rate(v.name, key)
            if rate is None:
                cells.append(f"{'not run/failed':>22}")
            elif v.name == base_name or base is None:
                cells.append(f"{rate:>15,.0f} req/s ")
            else:
                cells.append(f"{rate:>9,.0f} ({rate / base:5.1%})  ")
        lines.append(f"{key[0] + ' @' + str(key[1]):<26}" + "".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=5.0, help="target duration of each run")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of every variant")
    p.add_argument("--shards", type=int, default=1)
    args = p.parse_args(argv)
    missing = missing_tools()
    if missing:
        pkgs = " ".join(dict.fromkeys(TOOLS[t] for t in missing))
        print(f"bench-telemetry: {', '.join(missing)} not found; apt-get install {pkgs}")
        return 2
    scale = float(os.environ.get("DKV_BENCH_SCALE", "1") or "1")
    seconds = args.seconds * scale
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    signal.signal(signal.SIGHUP, _raise_on_sigterm)
    put_msg = kv_pb2.PutRequest(key=KEY, value=VALUE).SerializeToString()
    get_msg = kv_pb2.RangeRequest(key=KEY).SerializeToString()
    sget_msg = kv_pb2.RangeRequest(
        key=KEY, consistency=kv_pb2.READ_CONSISTENCY_SERIALIZABLE
    ).SerializeToString()
    _check_bodies(put_msg, get_msg, sget_msg)
    root = Path(tempfile.mkdtemp(prefix="dkv-bench-telemetry-"))
    by_variant: dict[str, list[Result]] = {}
    failed = False
    variants = [v for v in VARIANTS if v.trace_ratio is None or tracing_available()]
    skipped = [v.name for v in VARIANTS if v not in variants]
    print(
        f"bench-telemetry: front door, {', '.join(v.name for v in variants)}; "
        f"{args.rounds} round(s), ~{seconds:g} s per run; data in {root}"
        + (f"; not run (no Jaeger: make jaeger): {', '.join(skipped)}" if skipped else ""),
        flush=True,
    )
    try:
        bodies = {}
        for name, msg in (("put", put_msg), ("get", get_msg), ("sget", sget_msg)):
            bodies[name] = root / f"{name}.grpc"
            bodies[name].write_bytes(grpc_frame(msg))
        for rnd in range(args.rounds):
            order = variants if rnd % 2 == 0 else list(reversed(variants))
            for v in order:
                print(f"--- round {rnd + 1}: {v.name}", flush=True)
                results: list[Result] = []
                run_root = root / f"r{rnd}-{v.name.replace(' ', '-')}"
                run_root.mkdir()
                bench_stack(
                    run_root,
                    args.shards,
                    ["front door"],
                    BENCH_ROWS,
                    bodies,
                    seconds,
                    None,
                    results,
                    {},
                    metrics=v.metrics,
                    trace_ratio=v.trace_ratio,
                )
                failed = failed or any(r.rate is None for r in results)
                by_variant.setdefault(v.name, []).extend(results)
        print("\nsummary (mean of verified runs; in brackets: share of metrics off)")
        print(summary(by_variant))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
