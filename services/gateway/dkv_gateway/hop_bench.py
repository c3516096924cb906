"""The gateway's own cost per request, without Raft, Envoy or other noise (docs/benchmarks.md,
"Lever 5"): ``python -m dkv_gateway.hop_bench``.

Two processes on 127.0.0.1 besides h2load: a *fake node* (a bare ``grpc.aio`` server that
answers every KV call with the same 300-byte RangeResponse, whatever it is asked) and a
*gateway* (this package's KvGateway and Router on a server made by
``dkv.host.rpc_server.new_server``, metrics recorded as ``make run`` records them, a static
cluster map: one shard, the fake node its leader). h2load sends the benchmark's bodies (16-byte
key; put with a 256-byte value; serializable get) at 1 and 64 in flight. Each row reports
requests/s and the CPU per request of the gateway and of the fake node, from /proc: the fake
node's figure is what one grpc.aio unary call costs a server on this machine at that moment,
the floor under any gateway written with grpc.aio (which serves one call and makes one).

``--compare DIR`` runs a second gateway whose ``dkv_gateway`` package comes from ``DIR`` (e.g.
``services/gateway`` of an older checkout: ``git worktree add /tmp/old <commit>``), rounds
alternating, so that a change is measured against what it replaced in the same minutes.
CPU per request varies less than throughput when the machine is shared, but still by
5-10 % between rounds: compare medians of several rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio

from dkv.v1 import kv_pb2
from dkv.v1 import membership_pb2 as mpb

__all__ = ["main"]

KEY = b"k" * 16
VALUE = b"v" * 256
ROWS = (("sget", 1, 1), ("sget", 4, 16), ("put", 1, 1), ("put", 4, 16))  # op, clients, streams
_TICK = os.sysconf("SC_CLK_TCK")


def _answer() -> bytes:
    resp = kv_pb2.RangeResponse(
        count=1,
        kvs=[kv_pb2.KeyValue(key=KEY, value=VALUE, version=5, mod_revision=9, create_revision=2)],
    )
    resp.header.member_id, resp.header.raft_term, resp.header.revision = 7, 3, 9
    resp.header.shard_id = 1
    return resp.SerializeToString()


def _frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


async def _serve_node(port: int) -> None:
    data = _answer()

    async def handle(_request: bytes, _context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return data

    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(handle)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("dkv.v1.KV", {"Range": handler, "Put": handler}),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


async def _serve_gateway(port: int, node_port: int) -> None:
    # Imported here: with --compare, these come from the other checkout.
    from dkv_membership.state import slot_table  # noqa: PLC0415

    from dkv.client.cluster_map import ClusterMapView  # noqa: PLC0415
    from dkv.host.rpc_server import new_server  # noqa: PLC0415
    from dkv.telemetry import ProcessMetrics  # noqa: PLC0415
    from dkv_gateway import router as router_module  # noqa: PLC0415
    from dkv_gateway.kv_gateway import KvGateway, add_kv_gateway  # noqa: PLC0415
    from dkv_gateway.metrics import GatewayMetrics  # noqa: PLC0415
    from dkv_gateway.server import CLIENT_RPCS_MAX, CLIENT_SERVER_OPTIONS  # noqa: PLC0415

    view = ClusterMapView()
    view.apply(
        mpb.WatchClusterMapResponse(
            version=1,
            full=True,
            map=mpb.ClusterMap(
                version=1,
                nodes=[
                    mpb.Node(id=7, state=mpb.NODE_STATE_UP, client_address=f"127.0.0.1:{node_port}")
                ],
                shards=[mpb.Shard(id=1, voters=[7])],
                slot_ranges=slot_table(1),
                leaders=[mpb.LeaderEntry(shard_id=1, leader_id=7, term=1)],
            ),
        )
    )
    process = ProcessMetrics.create()
    metrics = GatewayMetrics(process.registry, process.grpc_client)
    make_pool = getattr(router_module, "NodeChannels", router_module.ChannelPool)
    router = router_module.Router(view, make_pool(None), metrics=metrics)
    router.on_map_change(view)
    server = new_server(
        options=CLIENT_SERVER_OPTIONS,
        maximum_concurrent_rpcs=CLIENT_RPCS_MAX,
        metrics=process.grpc_server,
    )
    add_kv_gateway(server, KvGateway(router))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Sample:
    req_per_s: float
    gateway_us: float
    node_us: float


class Pair:
    """A fake node and a gateway in front of it (``package_dir``: where ``dkv_gateway``
    comes from; "" for this checkout)."""

    def __init__(self, package_dir: str) -> None:
        self.node_port, self.port = _free_port(), _free_port()
        me = str(Path(__file__).resolve())
        env = dict(os.environ)
        if package_dir:
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (package_dir, env.get("PYTHONPATH", "")) if p
            )
        run = (
            "import runpy, sys; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')"
        )
        self.node = subprocess.Popen(
            [sys.executable, "-c", run, me, "--serve-node", str(self.node_port)],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.gateway = subprocess.Popen(
            [
                sys.executable,
                "-c",
                run,
                me,
                "--serve-gateway",
                str(self.port),
                str(self.node_port),
            ],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for p in (self.node, self.gateway):
            assert p.stdout is not None
            if p.stdout.readline().strip() != "ready":
                self.stop()
                raise RuntimeError(f"hop_bench: a process did not start ({p.args!r})")

    def stop(self) -> None:
        for p in (self.gateway, self.node):
            p.terminate()
        for p in (self.gateway, self.node):
            p.wait(10)

    def run(self, body: Path, path: str, clients: int, streams: int, n: int) -> Sample:
        cmd = ["h2load", "-c", str(clients), "-m", str(streams), "-d", str(body)]
        cmd += ["-H", "content-type: application/grpc", "-H", "te: trailers"]
        url = f"http://127.0.0.1:{self.port}{path}"
        subprocess.run([*cmd, "-n", str(max(200, n // 10)), url], capture_output=True, check=True)
        g0, n0, t0 = _cpu_s(self.gateway.pid), _cpu_s(self.node.pid), time.monotonic()
        done = subprocess.run([*cmd, "-n", str(n), url], capture_output=True, text=True, check=True)
        g1, n1, t1 = _cpu_s(self.gateway.pid), _cpu_s(self.node.pid), time.monotonic()
        if f"{n} succeeded" not in done.stdout:
            raise RuntimeError(f"hop_bench: not every request succeeded:\n{done.stdout[-800:]}")
        return Sample(n / (t1 - t0), (g1 - g0) / n * 1e6, (n1 - n0) / n * 1e6)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--serve-node", type=int, help=argparse.SUPPRESS)
    p.add_argument("--serve-gateway", type=int, nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--compare", default="", help="a directory holding another dkv_gateway")
    p.add_argument("--rounds", type=int, default=3, help="rounds (alternating with --compare)")
    p.add_argument("--requests", type=int, default=10_000, help="requests per row at depth")
    args = p.parse_args(argv)
    if args.serve_node:
        asyncio.run(_serve_node(args.serve_node))
        return 0
    if args.serve_gateway:
        asyncio.run(_serve_gateway(*args.serve_gateway))
        return 0
    if shutil.which("h2load") is None:
        print("hop_bench: h2load not found (apt-get install nghttp2-client)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="dkv-hop-"))
    bodies = {
        "put": (tmp / "put", "/dkv.v1.KV/Put", kv_pb2.PutRequest(key=KEY, value=VALUE)),
        "sget": (
            tmp / "sget",
            "/dkv.v1.KV/Range",
            kv_pb2.RangeRequest(key=KEY, consistency=kv_pb2.READ_CONSISTENCY_SERIALIZABLE),
        ),
    }
    for body, _, msg in bodies.values():
        body.write_bytes(_frame(msg.SerializeToString()))
    variants = {"this checkout": ""}
    if args.compare:
        variants[f"--compare {args.compare}"] = str(Path(args.compare).resolve())
    results: dict[tuple[str, str], list[Sample]] = {}
    try:
        for rnd in range(args.rounds):
            for name, package_dir in variants.items():
                pair = Pair(package_dir)
                try:
                    for op, clients, streams in ROWS:
                        body, path, _ = bodies[op]
                        n = args.requests if streams > 1 else max(500, args.requests // 5)
                        s = pair.run(body, path, clients, streams, n)
                        results.setdefault((name, f"{op}@{clients * streams}"), []).append(s)
                        print(
                            f"round {rnd + 1} {name:<30} {op}@{clients * streams:<3} "
                            f"{s.req_per_s:8,.0f} req/s  gateway {s.gateway_us:4.0f} us/req  "
                            f"fake node {s.node_us:4.0f} us/req",
                            flush=True,
                        )
                finally:
                    pair.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\nmedians (CPU per request, us):")
    print("| gateway | row | req/s | gateway | fake node | gateway / fake node |")
    print("|---|---|---:|---:|---:|---:|")
    for (name, row), samples in results.items():
        rps = statistics.median(s.req_per_s for s in samples)
        gw = statistics.median(s.gateway_us for s in samples)
        node = statistics.median(s.node_us for s in samples)
        print(f"| {name} | {row} | {rps:,.0f} | {gw:.0f} | {node:.0f} | {gw / node:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
