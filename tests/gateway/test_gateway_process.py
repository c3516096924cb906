"""``dkv-gateway`` as a real process: refusals on one line, start, health, SIGTERM.

Membership runs in this test's event loop, so the process is driven with asyncio's subprocess
API (a blocking read would stall membership).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import grpc.aio
from gateway_stack import WAIT_S, Stack, eventually
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dkv.v1 import kv_pb2

GATEWAY = [sys.executable, "-m", "dkv_gateway.main"]
GRPC_LOG = re.compile(r"^[DIWE]\d{4} \d\d:\d\d:\d\d")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GATEWAY, *args], capture_output=True, text=True, timeout=60, check=False
    )


def ours(stderr: str) -> list[str]:
    """The process's own lines: gRPC core logs a failed bind itself (``E1121 12:00:00 ...``)."""
    return [line for line in stderr.strip().splitlines() if not GRPC_LOG.match(line)]


def test_refusals_are_one_line() -> None:
    missing = run("--listen-client", "127.0.0.1:0", "--listen-xds", "127.0.0.1:0")
    assert missing.returncode == 2, missing.stderr
    assert missing.stderr.strip().splitlines() == [
        "dkv-gateway: --membership is required (host:port,... of the membership service) "
        "(see --help)"
    ]
    bad = run("--membership", "nowhere")
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        "dkv-gateway: --membership entry 'nowhere' is not host:port (see --help)"
    )
    for flag in ("--listen-client", "--listen-xds"):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            other = "--listen-xds" if flag == "--listen-client" else "--listen-client"
            busy = run(
                "--membership", "127.0.0.1:1", flag, f"127.0.0.1:{port}", other, "127.0.0.1:0"
            )
        assert busy.returncode == 1, busy.stderr
        assert ours(busy.stderr) == [
            f"dkv-gateway: cannot listen on 127.0.0.1:{port} (in use or not an address)"
        ]


def test_process_starts_reports_health_and_stops_on_sigterm(tmp_path: Path) -> None:
    async def scenario() -> None:
        st = Stack(tmp_path)
        proc: asyncio.subprocess.Process | None = None
        channel: grpc.aio.Channel | None = None
        log = tmp_path / "gateway.log"
        try:
            await st.start_membership()
            with log.open("wb") as err:
                proc = await asyncio.create_subprocess_exec(
                    *GATEWAY,
                    "--membership",
                    st.membership_address,
                    "--listen-client",
                    "127.0.0.1:0",
                    "--listen-xds",
                    "127.0.0.1:0",
                    stdout=asyncio.subprocess.PIPE,
                    stderr=err,
                    env={**os.environ, "DKV_GATEWAY_ENVOY_PORT": "12345"},
                )
            assert proc.stdout is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), WAIT_S)).decode()
            assert line.startswith("dkv-gateway serving clients on 127.0.0.1:"), (
                line + log.read_text()
            )
            assert "(Envoy front door on port 12345)" in line
            address = line.split()[4].rstrip(",")
            channel = grpc.aio.insecure_channel(address)
            health = health_pb2_grpc.HealthStub(channel)

            async def status() -> int:
                resp = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                return int(resp.status)

            assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
            await st.init_cluster(with_replicas=False)

            async def serving() -> bool:
                return await status() == health_pb2.HealthCheckResponse.SERVING

            await eventually(serving, "the gateway reports SERVING once the map has shards")
            rng = channel.unary_unary(
                "/dkv.v1.KV/Range",
                request_serializer=kv_pb2.RangeRequest.SerializeToString,
                response_deserializer=kv_pb2.RangeResponse.FromString,
            )
            try:
                await rng(kv_pb2.RangeRequest(key=b"k"), timeout=1)
                raise AssertionError("a shard without replicas answered")
            except grpc.aio.AioRpcError as exc:
                assert exc.code() is grpc.StatusCode.UNAVAILABLE
                assert "has no reachable leader" in (exc.details() or "")

            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), WAIT_S) == 0, log.read_text()
            rest = (await proc.stdout.read()).decode()
            assert "dkv-gateway: shutting down" in rest
        finally:
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
            if channel is not None:
                await channel.close()
            await st.close()

    asyncio.run(scenario())
