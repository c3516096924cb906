"""The front door as an attacker or a careless user meets it (issue 9), through the real Envoy
and the real gateway of `make run`'s stack (``dkv.devstack``, mTLS, the admin certificate).

Each test is the regression test of one defect seen on the running stack: malformed bodies and
JSON on the gRPC paths got the only gateway ejected (everybody then saw "no healthy upstream");
big ranges failed instead of paging; nonsense fields were accepted; a short deadline was
answered "no quorum"; unrouted services and methods answered with empty errors or HTTP/2
stream errors; the front door stayed shut after the shards recovered. The last test fuzzes
protobuf and JSON bodies while a well-behaved client works beside it: that client must see no
failure at all.

``DKV_FUZZ_EXAMPLES`` sets the fuzz test's size (default 200).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import signal
import ssl
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import grpc.aio
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_dev_stack import free_layout, tls_context

from dkv.client import Client
from dkv.devstack import DevLayout, DevStack
from dkv.host.channels import TlsFiles, client_channel
from dkv.testing.cluster import History, Workload, check
from dkv.testing.frontdoor import FrontDoorClient
from dkv.v1 import kv_pb2

pytestmark = pytest.mark.slow

FUZZ_EXAMPLES = int(os.environ.get("DKV_FUZZ_EXAMPLES", "200"))
SHARDS = 4
MALFORMED = {
    "one 0xff byte": b"\xff",
    "truncated varint": b"\x08\x80",
    "field number 0": b"\x00\x01",
    "invalid UTF-8 in request_id": b"\x52\x02\xff\xfe",
}
REQUESTS: dict[str, Any] = {
    "Put": kv_pb2.PutRequest,
    "Range": kv_pb2.RangeRequest,
    "Delete": kv_pb2.DeleteRequest,
    "Watch": kv_pb2.WatchRequest,
}


class Door:
    """The running stack, seen from outside: gRPC and HTTPS to Envoy, Envoy's admin stats."""

    def __init__(self, stack: DevStack) -> None:
        self.stack = stack
        self.layout: DevLayout = stack.layout
        pki = self.layout.certs
        self.tls_files = TlsFiles(str(pki.cert("admin")), str(pki.key("admin")), str(pki.ca_cert))
        self.address = f"127.0.0.1:{self.layout.front_door}"
        self.url = f"https://{self.address}"
        self.ssl: ssl.SSLContext = tls_context(self.layout)

    def http(self, http2: bool = True) -> httpx.Client:
        return httpx.Client(verify=self.ssl, http2=http2, timeout=30)

    def channel(self) -> grpc.aio.Channel:
        return client_channel(self.address, self.tls_files)

    def stats(self) -> dict[str, int]:
        url = f"http://127.0.0.1:{self.layout.envoy_admin}/stats?format=json"
        with httpx.Client(timeout=10) as h:
            stats = h.get(url).json()["stats"]
        return {s["name"]: int(s["value"]) for s in stats if isinstance(s.get("value"), int)}

    def ejections(self) -> int:
        return self.stats().get("cluster.dkv_gateway.outlier_detection.ejections_enforced_total", 0)

    def gateway_health(self) -> list[str]:
        """Envoy's health flags of each gateway host ("healthy" when nothing is wrong)."""
        url = f"http://127.0.0.1:{self.layout.envoy_admin}/clusters"
        with httpx.Client(timeout=10) as h:
            lines = h.get(url).text.splitlines()
        return [
            ln.rsplit("::", 1)[1]
            for ln in lines
            if ln.startswith("dkv_gateway::") and "::health_flags::" in ln
        ]

    def assert_gateway_in_rotation(self) -> None:
        assert self.ejections() == 0
        assert self.gateway_health() == ["healthy"], self.gateway_health()

    def gateway_log(self) -> str:
        return self.stack.proc("gateway").log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Door]:
    layout = free_layout(tmp_path_factory.mktemp("hardening") / ".dkv")
    layout = DevLayout(layout.root, port_base=layout.port_base, shards=SHARDS)
    stack = DevStack(layout)
    stack.start()
    try:
        asyncio.run(stack.wait_ready())
        yield Door(stack)
        assert stack.dead() is None, f"{stack.dead()} died"
    finally:
        stack.stop()


async def raw_unary(ch: grpc.aio.Channel, method: str, body: bytes, timeout_s: float = 10) -> bytes:
    out: bytes = await ch.unary_unary(f"/dkv.v1.KV/{method}")(body, timeout=timeout_s)
    return out


async def raw_watch(ch: grpc.aio.Channel, body: bytes, timeout_s: float = 10) -> list[bytes]:
    return [m async for m in ch.unary_stream("/dkv.v1.KV/Watch")(body, timeout=timeout_s)]


async def status_of(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Background:
    """A well-behaved client (the linearizability workload of the fault tests) in a thread of
    its own, through the front door, while a test misbehaves beside it."""

    def __init__(self, door: Door, prefix: bytes) -> None:
        self.door = door
        self.prefix = prefix
        self.history = History()
        self.work: Workload | None = None
        self.loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as exc:
            self.error = exc

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        tls = self.door.layout.client_tls_files()
        async with FrontDoorClient(self.door.address, SHARDS, tls) as client:
            self.work = Workload(
                client,  # type: ignore[arg-type]
                self.history,
                workers=3,
                ops_per_worker=1_000_000,
                keys=6,
                prefix=self.prefix,
                op_timeout_s=15.0,
                seed=7,
            )
            task = asyncio.create_task(self.work.run())
            self._ready.set()
            await self._stop.wait()
            self.work.stop()
            await task

    def __enter__(self) -> Background:
        self._thread.start()
        assert self._ready.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(120)
        assert not self._thread.is_alive()
        self.loop.close()
        if self.error is not None:
            raise self.error

    def assert_unharmed(self) -> None:
        assert self.work is not None and self.work.succeeded > 0, "the workload did nothing"
        assert not self.history.errors, f"the well-behaved client failed: {self.history.errors}"
        assert not self.history.unknown, (
            f"the well-behaved client timed out: {self.history.unknown}"
        )
        check(self.history)


# -- 1. malformed bodies cost only their caller ---------------------------------------------------


def test_malformed_bodies_and_json_on_grpc_paths_cost_only_their_caller(door: Door) -> None:
    async def misbehave() -> Counter[str]:
        codes: Counter[str] = Counter()
        ch = door.channel()
        try:
            for _ in range(5):
                for what, body in MALFORMED.items():
                    for method in ("Put", "Range", "Delete"):
                        code = await status_of(raw_unary(ch, method, body))
                        codes[f"{method} {what}: {code.name}"] += 1
                    code = await status_of(raw_watch(ch, body))
                    codes[f"Watch {what}: {code.name}"] += 1
        finally:
            await ch.close()
        return codes

    with Background(door, b"wb1/") as bg:
        codes = asyncio.run(misbehave())
        with door.http() as h:
            answers = [
                h.post(
                    f"{door.url}/dkv.v1.KV/Range",
                    content=b"{}",
                    headers={"content-type": "application/json"},
                )
                for _ in range(10)
            ]
    assert all(k.endswith(": INVALID_ARGUMENT") for k in codes), codes
    assert {a.status_code for a in answers} == {415}
    assert "application/grpc" in answers[0].text
    bg.assert_unharmed()
    door.assert_gateway_in_rotation()
    log = door.gateway_log()
    assert "Traceback" not in log and "DecodeError" not in log
    # One line for the first, the rest within the rate limit (10 s) not logged one by one.
    assert 1 <= log.count("malformed request to") < len(MALFORMED) * 4 * 5


# -- 2. big ranges page ---------------------------------------------------------------------------


def test_a_range_of_big_values_pages_over_grpc_and_http(door: Door) -> None:
    mib = 1 << 20
    keys = [b"big/%d" % i for i in range(9)]

    async def write_and_page() -> list[bytes]:
        async with Client([door.address], door.layout.client_tls_files(), timeout_s=30) as c:
            for i, k in enumerate(keys):
                await c.put(k, bytes([i]) * mib)
            seen: list[bytes] = []
            req = kv_pb2.RangeRequest(prefix=b"big/")
            while True:
                page = await c.range(req)
                assert all(kv.value == bytes([keys.index(kv.key)]) * mib for kv in page.kvs)
                seen += [kv.key for kv in page.kvs]
                if not page.more:
                    break
                req = kv_pb2.RangeRequest(prefix=b"big/", continuation=page.continuation)
            # A watch of the same history comes in messages small enough to receive.
            watched: list[bytes] = []
            watch = c.watch(kv_pb2.WatchRequest(prefix=b"big/", start_revision=1))
            try:
                while len(watched) < len(keys):
                    resp = await asyncio.wait_for(anext(watch), 30)
                    watched += [e.kv.key for e in resp.events]
            finally:
                await watch.aclose()  # type: ignore[attr-defined]
            assert sorted(watched) == keys
            return seen

    assert asyncio.run(write_and_page()) == keys
    seen: list[bytes] = []
    params = {"prefix": b64(b"big/")}
    with door.http() as h:
        while True:
            resp = h.get(f"{door.url}/v1/kv", params=params)
            assert resp.status_code == 200, resp.text[:300]
            body = resp.json()
            seen += [base64.b64decode(kv["key"]) for kv in body["kvs"]]
            if not body["more"]:
                break
            params = {"prefix": b64(b"big/"), "continuation": body["continuation"]}
    assert seen == keys


# -- 3. nonsense fields are refused, naming the field ----------------------------------------------


def test_out_of_range_fields_are_invalid_argument_naming_the_field(door: Door) -> None:
    cases = [
        ("Range", kv_pb2.RangeRequest(key=b"a", consistency=2), "consistency"),  # type: ignore[arg-type]
        ("Range", kv_pb2.RangeRequest(key=b"a", consistency=99), "consistency"),  # type: ignore[arg-type]
        ("Range", kv_pb2.RangeRequest(prefix=b"a", limit=-1), "limit"),
        ("Range", kv_pb2.RangeRequest(prefix=b"a", limit=-(2**63)), "limit"),
        ("Range", kv_pb2.RangeRequest(key=b"a", prefix=b"a"), "prefix"),
        ("Range", kv_pb2.RangeRequest(key=b"b", range_end=b"a"), "range_end"),
        ("Delete", kv_pb2.DeleteRequest(key=b"b", range_end=b"a"), "range_end"),
        (
            "Put",
            kv_pb2.PutRequest(key=b"k", value=b"", precondition=kv_pb2.Precondition(version=-5)),
            "precondition.version",
        ),
        ("Watch", kv_pb2.WatchRequest(key=b"a", prefix=b"a", start_revision=0), "prefix"),
        ("Watch", kv_pb2.WatchRequest(key=b"a", start_revision=-1), "start_revision"),
    ]

    async def run() -> None:
        ch = door.channel()
        try:
            for method, req, field in cases:
                call = (
                    raw_watch(ch, req.SerializeToString())
                    if method == "Watch"
                    else raw_unary(ch, method, req.SerializeToString())
                )
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, (req, info.value)
                assert field in (info.value.details() or ""), (req, info.value.details())
        finally:
            await ch.close()

    asyncio.run(run())
    with door.http() as h:
        resp = h.post(
            f"{door.url}/v1/kv:put",
            json={"key": b64(b"k"), "value": b64(b"v"), "precondition": {"version": "-5"}},
        )
        assert resp.status_code == 400 and "precondition.version" in resp.json()["message"]
        resp = h.get(f"{door.url}/v1/kv", params={"prefix": b64(b"a"), "limit": "-1"})
        assert resp.status_code == 400 and "limit" in resp.json()["message"]


# -- 3b. strict input at the edge: required fields, bounded bodies (issue 11 item 6) ---------------

VALUE_REQUIRED = 'value is required (send "" for an empty value)'


def test_misspelt_fields_and_oversize_bodies_are_refused_at_the_edge(door: Door) -> None:
    """Through Envoy and the gateway: a Put whose value was not given (a misspelt JSON field
    is dropped on the way), a watch that does not say where it starts and bodies over the
    limits are refused naming the field or the limit; nothing is written and the gateway
    stays in rotation."""
    key = b"edge/strict"
    url = f"{door.url}/v1/kv/{base64.urlsafe_b64encode(key).decode().rstrip('=')}"
    with door.http() as h:
        assert h.put(url, json={"value": b64(b"old")}).status_code == 200
        before = h.get(url).json()["kvs"]
        misspelt = h.put(url, json={"valu": b64(b"new")})
        assert misspelt.status_code == 400 and misspelt.json()["message"] == VALUE_REQUIRED
        watch = h.post(f"{door.url}/v1/kv:watch", json={"key": b64(key)})
        assert watch.status_code == 400
        assert watch.json()["message"].startswith("start_revision is required")
    with door.http(http2=False) as h:  # Envoy answers while the body still comes
        too_big = h.put(url, json={"value": b64(b"x" * (3 << 20))})
        assert too_big.status_code == 413
        assert "HTTP/JSON request bodies of at most 2868736 bytes" in too_big.text

    async def grpc_side() -> None:
        ch = door.channel()
        try:
            no_value = kv_pb2.PutRequest(key=key).SerializeToString()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await raw_unary(ch, "Put", no_value)
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details() == VALUE_REQUIRED
            oversize = kv_pb2.PutRequest(key=key, value=b"x" * (3 << 20)).SerializeToString()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await raw_unary(ch, "Put", oversize)
            assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "gRPC request messages of at most 2102400 bytes" in (info.value.details() or "")
        finally:
            await ch.close()

    asyncio.run(grpc_side())
    with door.http() as h:
        assert h.get(url).json()["kvs"] == before  # nothing was written
        assert h.put(url, json={"value": ""}).status_code == 200  # "" is a value
        assert h.get(url).json()["kvs"][0]["value"] == ""
    door.assert_gateway_in_rotation()


# -- 4. a short deadline is DEADLINE_EXCEEDED ------------------------------------------------------


def test_a_short_deadline_is_deadline_exceeded_never_no_quorum(door: Door) -> None:
    async def run() -> Counter[str]:
        codes: Counter[str] = Counter()
        ch = door.channel()
        try:
            await raw_unary(ch, "Put", kv_pb2.PutRequest(key=b"dl", value=b"v").SerializeToString())
            body = kv_pb2.PutRequest(key=b"dl", value=b"x").SerializeToString()
            for i in range(90):
                code = await status_of(raw_unary(ch, "Put", body, 0.001 + i % 3 * 0.001))
                codes[code.name] += 1
        finally:
            await ch.close()
        return codes

    codes = asyncio.run(run())
    assert set(codes) <= {"OK", "DEADLINE_EXCEEDED"}, codes
    assert door.ejections() == 0


# -- what the front door does not route --------------------------------------------------------


def test_unrouted_services_and_methods_answer_cleanly(door: Door) -> None:
    async def admin_status() -> grpc.aio.AioRpcError:
        ch = door.channel()
        try:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await ch.unary_unary("/dkv.v1.Admin/Status")(b"", timeout=10)
            return info.value
        finally:
            await ch.close()

    err = asyncio.run(admin_status())
    assert err.code() is grpc.StatusCode.UNIMPLEMENTED
    assert "dkv.v1.Admin is not served by the front door" in (err.details() or "")
    assert "--endpoints" in (err.details() or "")
    with door.http(http2=True) as h:
        key = f"{door.url}/v1/kv/{b64(b'hello')}"
        for _ in range(5):  # it used to fail now and then: an HTTP/2 stream error
            resp = h.request("PATCH", key, content=b"x" * 200_000)
            assert resp.status_code == 405 and resp.headers["allow"] == "GET, PUT, DELETE"
        resp = h.request("POST", key, json={"value": b64(b"v")})
        assert resp.status_code == 405
        resp = h.get(f"{door.url}/v1/kv:put")
        assert resp.status_code == 405 and resp.headers["allow"] == "POST"
        resp = h.get(f"{door.url}/nothing/here")
        assert resp.status_code == 404 and "/v1/kv" in resp.text
    assert door.ejections() == 0


# -- the fuzz test -------------------------------------------------------------------------------

SEEDS = {
    "Put": kv_pb2.PutRequest(
        key=b"fz/k", value=b"v", request_id="r1", precondition=kv_pb2.Precondition(version=1)
    ),
    "Range": kv_pb2.RangeRequest(prefix=b"fz/", limit=5, continuation=b"fz/a", keys_only=True),
    "Delete": kv_pb2.DeleteRequest(key=b"fz/k", prev_kv=True, request_id="r2"),
    "Watch": kv_pb2.WatchRequest(key=b"fz/k", start_revision=1),
}


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    method = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[method].SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "random"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete" and data:
            del data[pos]
        elif kind == "truncate":
            del data[pos:]
        else:
            data = bytearray(draw(st.binary(max_size=40)))
    return method, bytes(data)


JSON_FIELDS = [
    "key",
    "value",
    "range_end",
    "prefix",
    "limit",
    "consistency",
    "precondition",
    "continuation",
    "request_id",
    "keys_only",
    "count_only",
    "start_revision",
    "zzz",
]
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.text(max_size=12)
    | st.sampled_from(["Zno=", "ZnovYQ==", "AA==", "-1", "READ_CONSISTENCY_SERIALIZABLE"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
json_bodies = st.tuples(
    st.sampled_from(["/v1/kv:range", "/v1/kv:put", "/v1/kv:delete"]),
    st.dictionaries(st.sampled_from(JSON_FIELDS), json_values, max_size=5)
    | st.text(max_size=20).map(lambda t: t),  # not JSON at all, or a bare string
)


def _harmless(method: str, body: bytes) -> bool:
    """Skip bodies that decode to a *valid* write the well-behaved data could be hit by (a
    legitimate request with the admin certificate may delete anything)."""
    try:
        req = REQUESTS[method].FromString(body)
    except Exception:
        return True
    if method == "Delete":
        return not req.range_end and req.key.startswith(b"fz")
    if method == "Put":
        return req.key.startswith(b"fz")
    return True


def test_fuzzed_bodies_through_envoy_hurt_nobody_else(door: Door) -> None:
    async def keep() -> dict[bytes, bytes]:
        async with Client([door.address], door.layout.client_tls_files(), timeout_s=30) as c:
            data = {b"keep/%d" % i: os.urandom(16) for i in range(10)}
            for k, v in data.items():
                await c.put(k, v)
            return data

    async def read(keys: list[bytes]) -> dict[bytes, bytes]:
        async with Client([door.address], door.layout.client_tls_files(), timeout_s=30) as c:
            return {k: (await c.get(k)).kvs[0].value for k in keys}

    before = asyncio.run(keep())
    loop = asyncio.new_event_loop()
    ch = loop.run_until_complete(_open(door))
    grpc_codes: Counter[str] = Counter()
    http_codes: Counter[int] = Counter()
    rng = random.Random(1)

    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(st.one_of(mutated().map(lambda m: ("grpc", m)), json_bodies.map(lambda j: ("json", j))))
    def send(case: tuple[str, Any]) -> None:
        kind, (what, body) = case
        if kind == "grpc":
            if not _harmless(what, body):
                return
            call = raw_watch(ch, body, 0.5) if what == "Watch" else raw_unary(ch, what, body, 10)
            code = loop.run_until_complete(status_of(call))
            grpc_codes[code.name] += 1
            allowed = {"OK", "INVALID_ARGUMENT", "FAILED_PRECONDITION"}
            if what == "Watch":
                allowed.add("DEADLINE_EXCEEDED")  # a valid watch streams until its deadline
            assert code.name in allowed, (what, body, code)
        else:
            if what == "/v1/kv:delete" and isinstance(body, dict) and "range_end" in body:
                return
            raw = json.dumps(body) if rng.random() < 0.9 else json.dumps(body)[:-1]
            resp = h.post(f"{door.url}{what}", content=raw.encode())
            http_codes[resp.status_code] += 1
            assert resp.status_code < 500, (what, raw, resp.status_code, resp.text[:200])
            assert resp.status_code != 429, (what, raw, resp.text[:200])

    try:
        with Background(door, b"wb2/") as bg, door.http() as h:
            send()
    finally:
        loop.run_until_complete(ch.close())
        loop.close()
    bg.assert_unharmed()
    assert door.stack.dead() is None
    assert asyncio.run(read(sorted(before))) == before
    door.assert_gateway_in_rotation()
    assert grpc_codes["INVALID_ARGUMENT"] > 0 and http_codes[400] > 0, (grpc_codes, http_codes)


async def _open(door: Door) -> grpc.aio.Channel:
    return door.channel()


# -- 6. the front door opens as soon as the shards recover -----------------------------------------


def test_the_front_door_serves_as_soon_as_the_shards_recover(door: Door) -> None:
    """Every node paused (SIGSTOP): the gateway passes shard failures through for a while.
    Once the nodes resume and the gateway itself serves again, Envoy must too at once."""
    nodes = [p for p in door.stack.procs if p.name.startswith("node ")]
    pids = [p.popen.pid for p in nodes if p.popen is not None]
    assert len(pids) == 3

    async def run() -> Counter[str]:
        ch = door.channel()
        gw = client_channel(f"127.0.0.1:{door.layout.gateway}", door.tls_files)
        body = kv_pb2.PutRequest(key=b"recover", value=b"v").SerializeToString()
        codes: Counter[str] = Counter()
        try:
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            try:
                for _ in range(8):
                    codes[(await status_of(raw_unary(ch, "Put", body, 1.0))).name] += 1
            finally:
                for pid in pids:
                    os.kill(pid, signal.SIGCONT)
            # Until the gateway, asked directly, writes again (the shards have leaders) ...
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while await status_of(raw_unary(gw, "Put", body, 5)) is not grpc.StatusCode.OK:
                assert loop.time() < deadline, "the shards did not recover"
                await asyncio.sleep(0.1)
            # ... then through Envoy at once, first try.
            await raw_unary(ch, "Put", body, 5)
        finally:
            await ch.close()
            await gw.close()
        return codes

    codes = asyncio.run(run())
    assert "OK" not in codes, codes  # the shards were really down
    door.assert_gateway_in_rotation()
