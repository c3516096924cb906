"""``make bench-overheads``: what tracing, metrics and access control add to one request, per
hop, in isolation (no network, no other process): the figures behind docs/benchmarks.md's
"Per-request overheads". The end-to-end cost is ``make bench-telemetry``'s; these rows hold on a
machine too busy for it (the best of several runs of one loop, no other process involved)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio

from dkv.host.rpc_server import _observed
from dkv.security.access import Access
from dkv.security.authz import PolicyStore, write_default_policy
from dkv.security.rules import gateway_public_rules
from dkv.telemetry import ProcessMetrics
from dkv.telemetry.raft_metrics import DiskMetrics
from dkv.telemetry.tracing import (
    UNSAMPLED_PARENT,
    Tracing,
    end_rpc_span,
    inject_metadata,
    start_client_span,
    start_server_span,
    unsampled_parent,
)
from dkv.v1 import kv_pb2

__all__ = ["main"]

SAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
UNSAMPLED = SAMPLED[:-2] + "00"
XFCC = 'Hash=abc;Subject="CN=alice";URI=spiffe://dkv/user/alice'


class _Ctx:
    """What Access.check reads of a grpc.aio context."""

    def __init__(self, peer_uri: str, xfcc: str | None) -> None:
        self._auth = {"peer_spiffe_id": [peer_uri.encode()]}
        md: tuple[tuple[str, str], ...] = (("user-agent", "bench"),)
        self._md = md + ((("x-forwarded-client-cert", xfcc),) if xfcc else ())

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._md

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


def _us(fn: Callable[[], object], n: int) -> float:
    return min(timeit.repeat(fn, number=n, repeat=3)) / n * 1e6


def tracing_rows(n: int) -> list[tuple[str, float]]:
    # A batch processor, as the processes use: a request pays for queueing a span, the
    # export happens on its thread.
    tracing = Tracing.with_processor(
        BatchSpanProcessor(InMemorySpanExporter()), "bench", sampler=ParentBasedTraceIdRatio(0.01)
    )
    tracer = tracing.tracer
    assert tracer is not None
    method = "/dkv.v1.KV/Put"
    unsampled_md = (("traceparent", UNSAMPLED), ("user-agent", "bench"))

    def server(md: tuple[tuple[str, str], ...]) -> Callable[[], None]:
        def one() -> None:
            span = start_server_span(tracer, method, md)
            token = otel_context.attach(trace.set_span_in_context(span))
            otel_context.detach(token)
            end_rpc_span(span, grpc.StatusCode.OK)

        return one

    def client() -> None:
        span = start_client_span(tracer, method, {"dkv.shard": 1, "dkv.attempt": 1})
        inject_metadata(span)
        end_rpc_span(span, None)

    def fast_server() -> None:
        token = UNSAMPLED_PARENT.set(unsampled_parent(unsampled_md))
        UNSAMPLED_PARENT.reset(token)

    def fast_client() -> None:
        _ = (("traceparent", UNSAMPLED_PARENT.get() or UNSAMPLED),)

    rows = [
        ("server span, sampled parent (recorded)", _us(server((("traceparent", SAMPLED),)), n)),
        ("server span, unsampled parent (the SDK's way)", _us(server(unsampled_md), n)),
        ("server span, no parent (ratio 0.01)", _us(server(()), n)),
        ("client span + traceparent (no parent)", _us(client, n)),
        ("unsampled parent: server (no span)", _us(fast_server, n)),
        ("unsampled parent: a call made (no span)", _us(fast_client, n)),
    ]
    tracing.shutdown()
    return rows


class _CodeCtx:
    """What the metrics wrapper reads of a grpc.aio context: the code a handler set."""

    def code(self) -> None:
        return None


def metrics_rows(n: int) -> list[tuple[str, float]]:
    """What `--listen-metrics` on adds: a server call through the wrapper that counts and
    times it (next to the same handler bare), a gateway's call to a node, and a group
    commit's histograms (once per batch, not per request)."""
    metrics = ProcessMetrics.create(process=False)
    method = "/dkv.v1.KV/Put"
    ctx = _CodeCtx()

    async def handler(request: object, context: object) -> object:
        return request

    observed = _observed(handler, metrics.grpc_server.method(method))
    loop = asyncio.new_event_loop()

    def served(behavior: Callable[[object, object], Any]) -> float:
        async def many() -> None:
            for _ in range(n):
                await behavior(None, ctx)

        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            loop.run_until_complete(many())
            best = min(best, time.perf_counter() - start)
        return best / n * 1e6

    client = metrics.grpc_client

    def call() -> None:
        client.observe(method, None, client.start(method))

    disk = DiskMetrics(metrics.registry)

    def commit() -> None:
        disk.wal_fsync.observe(0.002)
        disk.backend_commit.observe(0.002)
        disk.batch_entries.observe(8)
        disk.batch_bytes.observe(8 * 100)

    rows = [
        ("metrics: a server call, bare handler (baseline)", served(handler)),
        ("metrics: a server call, counted and timed", served(observed)),
        ("metrics: a call to a node, counted and timed", _us(call, n)),
        ("metrics: a group commit's four histograms", _us(commit, n)),
    ]
    loop.close()
    return rows


def access_rows(n: int) -> list[tuple[str, float]]:
    with tempfile.TemporaryDirectory() as d:
        files = write_default_policy(Path(d))
        files.policy.write_text(files.policy.read_text() + "p, user:alice, app/*, write\n")
        policy = PolicyStore(files)
    req = kv_pb2.PutRequest(key=b"app/x", value=b"v")
    loop = asyncio.new_event_loop()

    def timed(ctx: _Ctx, fresh: bool) -> float:
        async def many() -> None:
            for _ in range(n):
                access = Access("bench", gateway_public_rules(), policy=policy, trust_xfcc=True)
                await access.check("/dkv.v1.KV/Put", req, ctx)

        async def reused() -> None:
            access = Access("bench", gateway_public_rules(), policy=policy, trust_xfcc=True)
            for _ in range(n):
                await access.check("/dkv.v1.KV/Put", req, ctx)

        start = loop.time()
        loop.run_until_complete(many() if fresh else reused())
        return (loop.time() - start) / n * 1e6

    own = _Ctx("spiffe://dkv/user/alice", None)
    via_envoy = _Ctx("spiffe://dkv/envoy", XFCC)
    rows = [
        ("access check, the caller's own certificate", timed(own, False)),
        ("access check, via Envoy's XFCC (parsed once)", timed(via_envoy, False)),
        ("access check, via Envoy's XFCC (parsed every time)", timed(via_envoy, True)),
    ]
    loop.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--n", type=int, default=20_000, help="operations per measurement")
    args = p.parse_args(argv)
    print(f"{'per request, one hop':<52} µs")
    for name, us in tracing_rows(args.n) + metrics_rows(args.n) + access_rows(args.n):
        print(f"{name:<52} {us:6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
