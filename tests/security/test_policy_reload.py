"""A policy edited under traffic is enforced on every gateway (issue 11, "Policy reload under
traffic"), on `make run`'s stack of real processes with a second gateway beside it.

Concurrent callers keep going through three doors for the whole run: the front door (Envoy,
which names the caller to gateway 1 in XFCC), gateway 1's port and gateway 2's port (the
caller's own certificate). On each, ``user:alice`` writes and reads under ``app/`` while the
admin writes and the reader reads elsewhere. Then alice's write grant is revoked by rewriting
policy.csv in place, as an editor does (her read grant stays). Checked on every door: alice's
writes are refused from some point on and never allowed again (one whole policy swapped in, no
flapping), none of her reads and none of the others' calls fails at any time (no request saw
a half-loaded or half-written policy), and each gateway reloaded exactly once. The time from
the edit to the first refusal is printed (``-s``): within a second (the policy is polled every
250 ms and loaded once it stopped changing, docs/security.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_access_stack import As, free_layout

from dkv.devstack import DevLayout, DevStack
from dkv.security import write_dev_pki

pytestmark = pytest.mark.slow

WAIT_S = 30.0  # the failure bound of each wait; the events come within about a second
READ_GRANT = "p, user:alice, app/*, read\n"
WRITE_GRANT = "p, user:alice, app/*, write\n"
CALLS_AFTER_REFUSAL = 10  # alice's writes each door answers after its first refusal
DENIED = grpc.StatusCode.PERMISSION_DENIED
# Gateway 2's ports: in the stack's block of 200, above every port the layout uses.
G2_CLIENT, G2_XDS, G2_METRICS = 190, 191, 192


@dataclass
class Door:
    name: str
    port: int
    writes: list[bool] = field(default_factory=list)  # alice's writes: allowed or refused
    errors: list[str] = field(default_factory=list)  # anything else that failed
    first_refusal_at: float | None = None
    calls: int = 0


def with_flag(argv: list[str], flag: str, value: str | None) -> list[str]:
    """``argv`` with ``flag``'s value replaced (None: the flag and its value removed)."""
    i = argv.index(flag)
    if value is None:
        return argv[:i] + argv[i + 2 :]
    return [*argv[: i + 1], value, *argv[i + 2 :]]


def gateway_sample(metrics_port: int, name: str, labels: dict[str, str]) -> float:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def reloads(metrics_port: int, result: str) -> float:
    return gateway_sample(metrics_port, "dkv_auth_policy_reloads_total", {"result": result})


async def until(check: Callable[[], bool], what: str) -> None:
    """Until ``check()`` is true; fails after WAIT_S naming ``what``."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + WAIT_S
    while not check():
        assert loop.time() < give_up, f"not within {WAIT_S} s: {what}"
        await asyncio.sleep(0.05)


def ready(metrics_port: int) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{metrics_port}/readyz", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def second_gateway(stack: DevStack, log: Path) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    """Another dkv-gateway with the same flags and policy directory as gateway 1, on its own
    ports (no Envoy of its own: callers reach its port directly with their certificates)."""
    base = stack.layout.port_base
    ports = {"client": base + G2_CLIENT, "xds": base + G2_XDS, "metrics": base + G2_METRICS}
    for port in ports.values():
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # fails here, clearly, if another test holds it
    argv = stack.proc("gateway").argv
    argv = with_flag(argv, "--listen-client", f"127.0.0.1:{ports['client']}")
    argv = with_flag(argv, "--listen-xds", f"127.0.0.1:{ports['xds']}")
    argv = with_flag(argv, "--listen-metrics", f"127.0.0.1:{ports['metrics']}")
    argv = with_flag(argv, "--envoy-sds-dir", None)  # Envoy's SDS files are gateway 1's
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    return proc, ports


def test_a_revoked_grant_is_enforced_on_every_gateway_under_traffic(tmp_path: Path) -> None:
    layout = free_layout(tmp_path)
    stack = DevStack(layout)
    g2: subprocess.Popen[bytes] | None = None
    try:
        stack.start()
        asyncio.run(stack.wait_ready())
        write_dev_pki(layout.certs.directory, [("user", "alice")])
        policy = layout.auth_dir / "policy.csv"
        policy.write_text(policy.read_text() + READ_GRANT + WRITE_GRANT)
        g2, g2_ports = second_gateway(stack, tmp_path / "gateway2.log")
        asyncio.run(scenario(layout, policy, g2, g2_ports))
    finally:
        if g2 is not None:
            g2.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                g2.wait(timeout=10)
            if g2.poll() is None:
                g2.kill()
                g2.wait()
        stack.stop()


async def scenario(
    layout: DevLayout, policy: Path, g2: subprocess.Popen[bytes], g2_ports: dict[str, int]
) -> None:
    await until(lambda: ready(g2_ports["metrics"]) or g2.poll() is not None, "gateway 2 ready")
    assert g2.poll() is None, f"gateway 2 exited with {g2.returncode}"
    doors = [
        Door("front door -> gateway 1", layout.front_door),
        Door("gateway 1", layout.gateway),
        Door("gateway 2", g2_ports["client"]),
    ]
    metrics = {"gateway 1": layout.gateway_metrics, "gateway 2": g2_ports["metrics"]}
    stop = asyncio.Event()

    async def alice(door: Door) -> None:
        me = As(layout, "alice", door.port)
        try:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    await me.put(f"app/{door.port}/{i % 8}".encode(), b"v")
                    door.writes.append(True)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() is not DENIED:
                        door.errors.append(f"alice's put: {exc.code().name} {exc.details()}")
                    door.writes.append(False)
                    if door.first_refusal_at is None:
                        door.first_refusal_at = time.monotonic()
                try:
                    await me.range(prefix=f"app/{door.port}/".encode())  # her read grant stays
                except grpc.aio.AioRpcError as exc:
                    door.errors.append(f"alice's range: {exc.code().name} {exc.details()}")
                door.calls += 1
        finally:
            await me.channel.close()

    async def others(door: Door) -> None:
        admin, reader = As(layout, "admin", door.port), As(layout, "reader", door.port)
        try:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    await admin.put(f"other/{door.port}/{i % 8}".encode(), b"a")
                    await reader.range(prefix=f"other/{door.port}/".encode())
                except grpc.aio.AioRpcError as exc:
                    door.errors.append(f"admin or reader: {exc.code().name} {exc.details()}")
        finally:
            await admin.channel.close()
            await reader.channel.close()

    tasks = [asyncio.create_task(f(d)) for d in doors for f in (alice, others)]
    try:
        # Alice may write everywhere: the stack's gateway and the new one loaded her grant.
        await until(
            lambda: all(d.writes.count(True) >= 10 for d in doors),
            "alice's writes allowed at every door",
        )
        assert not any(d.first_refusal_at for d in doors), [
            (d.name, d.writes.count(False)) for d in doors
        ]
        before = {g: reloads(p, "ok") for g, p in metrics.items()}

        # Revoke her write grant: rewritten in place (truncated, then written).
        edited_at = time.monotonic()
        policy.write_text(policy.read_text().replace(WRITE_GRANT, ""))
        await until(
            lambda: all(d.first_refusal_at is not None for d in doors),
            "alice's writes refused at every door",
        )
        counts = {d.name: len(d.writes) for d in doors}
        await until(
            lambda: all(len(d.writes) >= counts[d.name] + CALLS_AFTER_REFUSAL for d in doors),
            "more of alice's writes at every door",
        )
    finally:
        stop.set()
        await asyncio.gather(*tasks)

    took = {d.name: (d.first_refusal_at or edited_at) - edited_at for d in doors}
    print("\nrevocation enforced after (s): " + ", ".join(f"{k} {v:.2f}" for k, v in took.items()))
    for d in doors:
        assert not d.errors, f"{d.name}: {d.errors[:5]}"
        first = d.writes.index(False)
        assert all(d.writes[:first]) and not any(d.writes[first:]), (
            f"{d.name}: alice's writes were refused, then allowed again: {d.writes[first:]}"
        )
    for g, port in metrics.items():
        assert reloads(port, "ok") == before[g] + 1, f"{g} reloaded more or less than once"
        assert reloads(port, "failed") == 0, f"{g} failed to reload"
