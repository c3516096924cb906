"""The side-by-side benchmarks (docs/benchmarks.md): ``make bench``, ``make bench-node``,
``make bench-scale``, ``make bench-raft``, ``make bench-telemetry``, ``make bench-overheads``.

Not part of the installed ``dkv`` package: run them from the repository root as
``.venv/bin/python -m bench.<module> [options]`` (``bench.bench_node``, ``bench.bench_front_door``,
``bench.bench_scale``, ``bench.bench_raft``, ``bench.bench_telemetry``,
``bench.bench_overheads``); :mod:`bench.etcd_build` finds the etcd builds they compare with.
The locust load tests are in ``loadtests/`` (``make loadtest``, docs/loadtests.md).
"""
