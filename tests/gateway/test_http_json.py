"""HTTP/JSON for ``dkv.v1.KV`` through a real Envoy: the gRPC-JSON transcoder, configured over xDS.

One dkv node (3 shards, real RocksDB) stands in for the gateway: it serves ``dkv.v1.KV`` too.
Envoy's bootstrap names only our ADS server, as in production; everything else arrives over
xDS from :mod:`dkv_gateway.envoy_config`. The node, the ADS server and their event loop live in
a background thread for the whole module, so the tests themselves are plain synchronous HTTP
clients (``http.client``), which is what a curl user is. The encoding rules under test are the
ones docs/http.md and kv.proto promise: bytes are base64 in paths, queries and JSON alike.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import json
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import pytest
from dkv_gateway import envoy_config
from dkv_gateway.xds import CLUSTER_TYPE, LISTENER_TYPE, AdsServer
from dkv_node.node import Node, NodeConfig
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from test_envoy import envoy_binary

from dkv.client import Client
from dkv.v1 import kv_pb2, kv_pb2_grpc

T = TypeVar("T")
DEADLINE_S = 30.0
"""A bound against hangs only: no assertion depends on how long anything takes."""
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]


# -- encodings (docs/http.md) ---------------------------------------------------------------------


def b64url(data: bytes) -> str:
    """The form a URL wants: URL-safe alphabet, no padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64(data: bytes) -> str:
    """The form JSON answers use: standard alphabet, padded."""
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


# -- HTTP -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str
    body: bytes

    def json(self) -> Any:
        assert self.content_type == "application/json", (self.status, self.body)
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


def call(port: int, method: str, path: str, body: object = None) -> Answer:
    """One HTTP/1.1 request. ``body`` is JSON-encoded unless it is already ``bytes``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_S)
    try:
        payload = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        headers = {"content-type": "application/json"} if payload is not None else {}
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        return Answer(response.status, response.getheader("content-type") or "", response.read())
    finally:
        conn.close()


def key_path(key: bytes) -> str:
    return f"/v1/kv/{b64url(key)}"


def put(port: int, key: bytes, value: bytes, **fields: object) -> dict[str, Any]:
    answer = call(port, "PUT", key_path(key), {"value": b64(value), **fields})
    assert answer.status == 200, answer
    result: dict[str, Any] = answer.json()
    return result


@contextlib.contextmanager
def watch_lines(port: int, method: str, path: str, body: object = None) -> Iterator[Iterator[Any]]:
    """An open Watch: yields an iterator of the JSON objects of the answer, one per line."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_S)
    try:
        payload = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=payload)
        response = conn.getresponse()
        assert response.status == 200, response.read()
        assert response.getheader("content-type") == "application/json"

        def lines() -> Iterator[Any]:
            while line := response.readline():
                if line.strip():
                    yield json.loads(line)

        yield lines()
    finally:
        conn.close()


# -- the stack: dkv node + ADS server on a background loop, Envoy as a process ---------------------


class LoopThread:
    """An event loop in a thread: servers live on it while synchronous tests talk to them."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="stack-loop")
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=DEADLINE_S)

    def close(self) -> None:
        self.run(self.loop.shutdown_asyncgens())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ready(admin_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _acked(ads: AdsServer) -> bool:
    return any(
        all(acked.get(t) == ads.version(t) for t in (CLUSTER_TYPE, LISTENER_TYPE))
        for acked in ads.acked_versions()
    )


@contextlib.asynccontextmanager
async def grpc_server(*register: Any) -> AsyncIterator[int]:
    """A grpc.aio server on 127.0.0.1 with ``register(server)`` callbacks applied."""
    server = grpc.aio.server()
    for add in register:
        add(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(grace=None)


@dataclass
class Envoy:
    """A running Envoy configured by ``ads`` (on ``loop``); HTTP and gRPC on ``port``."""

    port: int
    ads: AdsServer
    proc: subprocess.Popen[bytes]
    log: Path


@contextlib.contextmanager
def envoy_for(loop: LoopThread, tmp_path: Path, upstream_port: int, **door: Any) -> Iterator[Envoy]:
    """Start an ADS server serving a FrontDoor to ``upstream_port``, and Envoy bootstrapped to
    it; yield once Envoy is ready and has ACKed both resource types."""
    listen_port, admin_port = free_port(), free_port()
    front = envoy_config.FrontDoor(
        listen_port=listen_port, gateways=[("127.0.0.1", upstream_port)], **door
    )
    clusters, listeners = envoy_config.resources(front)

    async def make_ads() -> AdsServer:
        return AdsServer(clusters=clusters, listeners=listeners)

    ads = loop.run(make_ads())
    server = grpc_server(ads.add_to_server)
    ads_port = loop.run(server.__aenter__())
    proc: subprocess.Popen[bytes] | None = None
    try:
        bootstrap = tmp_path / "envoy-bootstrap.json"
        envoy_config.write_bootstrap(
            str(bootstrap),
            envoy_config.bootstrap(ads_host="127.0.0.1", ads_port=ads_port, admin_port=admin_port),
        )
        log = tmp_path / "envoy.log"
        with log.open("wb") as stderr:
            proc = subprocess.Popen(
                [
                    *(str(envoy_binary()), "-c", str(bootstrap), "--log-level", "warn"),
                    *("--base-id", str(random.randrange(1, 2**31)), "--concurrency", "1"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        deadline = time.monotonic() + DEADLINE_S
        while not _ready(admin_port):  # a process starting up: nothing to await but polling
            assert proc.poll() is None, f"Envoy exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"Envoy not ready:\n{log.read_text()}"
            time.sleep(0.05)
        loop.run(ads.wait_for(lambda: _acked(ads), timeout_s=DEADLINE_S))
        assert ads.nacks == 0, ads.last_nack
        yield Envoy(listen_port, ads, proc, log)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(timeout=DEADLINE_S)
        loop.run(ads.close())
        loop.run(server.__aexit__(None, None, None))


@dataclass
class Stack:
    loop: LoopThread
    node: Node
    envoy: Envoy

    @property
    def port(self) -> int:
        return self.envoy.port

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run(coro)


async def _start_node(data_dir: Path, shards: int) -> Node:
    peer = f"127.0.0.1:{free_port()}"
    node = Node(
        NodeConfig(
            name="solo",
            data_dir=data_dir,
            listen_peer=peer,
            listen_client="127.0.0.1:0",
            initial_cluster={"solo": peer},
            shards=shards,
            tick_interval_ms=10,
        )
    )
    await node.start()
    # A linearizable read of every shard needs every shard's leader: the client retries
    # NOT_LEADER until the elections are over, so HTTP requests never race them.
    client = Client([f"127.0.0.1:{node.client_port}"], timeout_s=DEADLINE_S)
    try:
        await client.range(kv_pb2.RangeRequest(key=b"\x00", range_end=b"\x00", count_only=True))
    finally:
        await client.close()
    return node


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp_path = tmp_path_factory.mktemp("http-json")
    loop = LoopThread()
    try:
        node = loop.run(_start_node(tmp_path / "node", shards=3))
        try:
            with envoy_for(loop, tmp_path, node.client_port) as envoy:
                yield Stack(loop, node, envoy)
        finally:
            loop.run(node.stop())
    finally:
        loop.close()


# -- single keys ----------------------------------------------------------------------------------


def test_put_then_get_returns_value_and_revisions(stack: Stack) -> None:
    written = put(stack.port, b"hello", b"world")
    assert written["succeeded"] is True
    revision = int(written["header"]["revision"])  # int64 is a JSON string
    assert revision > 0

    got = call(stack.port, "GET", key_path(b"hello"))
    assert got.status == 200
    answer = got.json()
    [kv] = answer["kvs"]
    assert unb64(kv["key"]) == b"hello" and kv["key"] == "aGVsbG8="  # standard, padded
    assert unb64(kv["value"]) == b"world"
    assert kv["create_revision"] == kv["mod_revision"] == str(revision)
    assert kv["version"] == "1"
    # Zero values are printed: a client can rely on `more` being there.
    assert answer["more"] is False and answer["count"] == "1"

    # The same read with the whole request as a body, and as a serializable read.
    by_body = call(stack.port, "POST", "/v1/kv:range", {"key": b64(b"hello")})
    assert [unb64(kv["value"]) for kv in by_body.json()["kvs"]] == [b"world"]
    serializable = call(
        stack.port, "GET", key_path(b"hello") + "?consistency=READ_CONSISTENCY_SERIALIZABLE"
    )
    assert [unb64(kv["value"]) for kv in serializable.json()["kvs"]] == [b"world"]


def test_keys_in_paths_take_every_base64_form(stack: Stack) -> None:
    """A key whose base64 has ``+``, ``/`` and ``=`` in the standard alphabet: the URL-safe
    form, the JSON answer's form as it is and the answer's form percent-encoded all name it."""
    key = b"\xfb\xff\xbf/+"
    assert set("+/=") <= set(b64(key))
    put(stack.port, key, b"binary \x00\xff")
    forms = [b64url(key), b64(key), urllib.parse.quote(b64(key), safe="")]
    for form in forms:
        answer = call(stack.port, "GET", f"/v1/kv/{form}")
        assert [unb64(kv["key"]) for kv in answer.json()["kvs"]] == [key], form
        assert unb64(answer.json()["kvs"][0]["value"]) == b"binary \x00\xff"


def test_compare_and_swap_by_version(stack: Stack) -> None:
    first = put(stack.port, b"cas", b"v1")
    assert first["succeeded"] is True
    swapped = put(stack.port, b"cas", b"v2", precondition={"version": "1"})
    assert swapped["succeeded"] is True

    stale = put(stack.port, b"cas", b"v3", precondition={"version": "1"})
    # A failed precondition is an answer, not an error: 200, succeeded false, the key as it is.
    assert stale["succeeded"] is False
    assert unb64(stale["current"]["value"]) == b"v2"
    assert stale["current"]["version"] == "2"
    [kv] = call(stack.port, "GET", key_path(b"cas")).json()["kvs"]
    assert unb64(kv["value"]) == b"v2"

    created = put(stack.port, b"cas-new", b"x", precondition={"version": "0"})
    assert created["succeeded"] is True
    assert put(stack.port, b"cas-new", b"y", precondition={"version": "0"})["succeeded"] is False


def test_delete(stack: Stack) -> None:
    put(stack.port, b"doomed", b"bye")
    refused = call(stack.port, "DELETE", key_path(b"doomed") + "?precondition.version=7")
    assert refused.status == 200
    assert refused.json()["succeeded"] is False and refused.json()["deleted"] == "0"

    deleted = call(stack.port, "DELETE", key_path(b"doomed") + "?prev_kv=true")
    assert deleted.status == 200
    answer = deleted.json()
    assert answer["deleted"] == "1" and answer["succeeded"] is True
    assert [unb64(kv["value"]) for kv in answer["prev_kvs"]] == [b"bye"]
    assert call(stack.port, "GET", key_path(b"doomed")).json()["kvs"] == []
    again = call(stack.port, "DELETE", key_path(b"doomed")).json()
    assert again["deleted"] == "0"


# -- ranges and watches ---------------------------------------------------------------------------


def test_prefix_range_pages_through_every_key_once(stack: Stack) -> None:
    keys = [b"page/%02d" % i for i in range(23)]
    for key in keys:
        put(stack.port, key, key.upper())
    put(stack.port, b"pagf", b"outside the prefix")
    put(stack.port, b"pag", b"outside the prefix")

    seen: list[bytes] = []
    query = {"prefix": b64(b"page/"), "limit": "5"}
    pages = 0
    while True:
        # urlencode percent-encodes the standard alphabet's `+`, `/` and `=`.
        answer = call(stack.port, "GET", "/v1/kv?" + urllib.parse.urlencode(query)).json()
        pages += 1
        assert len(answer["kvs"]) <= 5
        seen += [unb64(kv["key"]) for kv in answer["kvs"]]
        assert all(unb64(kv["value"]) == unb64(kv["key"]).upper() for kv in answer["kvs"])
        if not answer["more"]:
            break
        query["continuation"] = answer["continuation"]
        assert pages <= len(keys), "pagination does not advance"
    assert seen == keys  # all of them, once each, in key order
    assert pages == 5


def test_watch_streams_put_events_as_json_lines(stack: Stack) -> None:
    first = put(stack.port, b"watched", b"one")
    start = first["header"]["revision"]
    body = {"key": b64(b"watched"), "start_revision": start}
    with watch_lines(stack.port, "POST", "/v1/kv:watch", body) as events:
        answer = next(events)
        [event] = answer["events"]
        assert event["type"] == "EVENT_TYPE_PUT"
        assert unb64(event["kv"]["value"]) == b"one"
        assert event["kv"]["mod_revision"] == start
        # The stream stays open: a later write arrives as the next line.
        put(stack.port, b"watched", b"two")
        [event] = next(events)["events"]
        assert unb64(event["kv"]["value"]) == b"two" and event["kv"]["version"] == "2"

    # GET with query parameters: a prefix watch, which sees the delete too.
    call(stack.port, "DELETE", key_path(b"watched"))
    query = urllib.parse.urlencode({"prefix": b64(b"watch"), "start_revision": start})
    with watch_lines(stack.port, "GET", f"/v1/kv:watch?{query}") as events:
        types: list[str] = []
        while len(types) < 3:
            types += [event["type"] for event in next(events)["events"]]
    assert types == ["EVENT_TYPE_PUT", "EVENT_TYPE_PUT", "EVENT_TYPE_DELETE"]


# -- errors ---------------------------------------------------------------------------------------


def test_malformed_json_is_400_with_a_message(stack: Stack) -> None:
    answer = call(stack.port, "PUT", key_path(b"k"), b'{"value": ')
    assert answer.status == 400
    assert "Unexpected end of string" in answer.text
    not_an_object = call(stack.port, "PUT", key_path(b"k"), b"[1, 2]")
    assert not_an_object.status == 400 and "must be a message" in not_an_object.text
    wrong_type = call(stack.port, "PUT", key_path(b"k"), {"value": 12})
    assert wrong_type.status == 400
    assert "value" in wrong_type.text and "TYPE_BYTES" in wrong_type.text
    not_base64 = call(stack.port, "PUT", key_path(b"k"), {"value": "not base64!"})
    assert not_base64.status == 400 and "TYPE_BYTES" in not_base64.text
    bad_number = call(stack.port, "PUT", key_path(b"k"), {"precondition": {"version": "x"}})
    assert bad_number.status == 400 and "precondition.version" in bad_number.text


def test_unknown_fields(stack: Stack) -> None:
    unknown_query = call(stack.port, "GET", key_path(b"k") + "?bogus=1")
    assert unknown_query.status == 400
    assert '"bogus"' in unknown_query.text and "dkv.v1.RangeRequest" in unknown_query.text
    # A body field that repeats the path's key is refused rather than one of them winning.
    collision = call(stack.port, "PUT", key_path(b"k"), {"key": b64(b"other"), "value": ""})
    assert collision.status == 400 and "conflicting" in collision.text
    # Unknown JSON body fields cannot be refused: the transcoder library hard-codes
    # ignore_unknown_fields (docs/http.md). This pins that documented behaviour; it is why the
    # fields whose absence changes a request are required (the strict-input tests below).
    ignored = call(stack.port, "PUT", key_path(b"k"), {"value": b64(b"v"), "bogus": 1})
    assert ignored.status == 200 and ignored.json()["succeeded"] is True


def test_bad_keys_are_invalid_argument(stack: Stack) -> None:
    empty = call(stack.port, "PUT", "/v1/kv/", {"value": b64(b"v")})
    assert empty.status == 400
    assert empty.json() == {
        "code": INVALID_ARGUMENT,
        "message": "key must not be empty",
        "details": [],
    }

    too_long = b"k" * 4097  # dkv_node.limits.Limits.key_bytes_max + 1
    big = call(stack.port, "PUT", key_path(too_long), {"value": b64(b"v")})
    assert big.status == 400
    assert big.json()["code"] == INVALID_ARGUMENT
    assert "4097 bytes; the limit is 4096 bytes" in big.json()["message"]

    # Not base64 at all: the transcoder refuses it before dkv sees it.
    raw = call(stack.port, "GET", "/v1/kv/hello")
    assert raw.status == 400 and "key" in raw.text and "TYPE_BYTES" in raw.text


# -- gRPC on the same port ------------------------------------------------------------------------


def test_grpc_through_the_same_port(stack: Stack) -> None:
    value = bytes(range(256))

    async def scenario() -> None:
        # Created, used and closed on the stack's loop (grpc.aio channels belong to one loop).
        client = Client([f"127.0.0.1:{stack.port}"], timeout_s=DEADLINE_S)
        try:
            written = await client.put(b"via-grpc", value)
            assert written.succeeded
            got = await client.get(b"via-grpc")
            assert [kv.value for kv in got.kvs] == [value]
            watch = client.watch(
                kv_pb2.WatchRequest(key=b"via-grpc", start_revision=written.header.revision),
                resume=False,
            )
            try:
                first = await anext(watch)
            finally:
                await watch.aclose()
            assert [e.kv.value for e in first.events] == [value]
        finally:
            await client.close()

    stack.run(scenario())
    # What gRPC wrote, HTTP/JSON reads byte for byte.
    [kv] = call(stack.port, "GET", key_path(b"via-grpc")).json()["kvs"]
    assert unb64(kv["value"]) == value


# -- routing: transcoded requests take the gRPC routes and their retry policies ------------------


class _Flaky(kv_pb2_grpc.KVServicer):
    """Range fails once with UNAVAILABLE, then answers; Put always fails with UNAVAILABLE."""

    def __init__(self) -> None:
        self.range_calls = 0
        self.put_calls = 0

    async def Range(self, request: kv_pb2.RangeRequest, context: Any) -> kv_pb2.RangeResponse:
        self.range_calls += 1
        if self.range_calls == 1:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "not yet")
        return kv_pb2.RangeResponse(kvs=[kv_pb2.KeyValue(key=request.key, value=b"ok")])

    async def Put(self, request: kv_pb2.PutRequest, context: Any) -> kv_pb2.PutResponse:
        self.put_calls += 1
        await context.abort(grpc.StatusCode.UNAVAILABLE, "maybe proposed")
        raise AssertionError("abort returns only by raising")


def test_transcoded_requests_get_the_grpc_routes_retry_policies(tmp_path: Path) -> None:
    """The transcoder rewrites the path to ``/dkv.v1.KV/<Method>`` and clears the route cache,
    so a read over HTTP is retried like a gRPC read and a write is not (envoy_config)."""
    flaky = _Flaky()
    loop = LoopThread()
    try:
        server = grpc_server(lambda s: kv_pb2_grpc.add_KVServicer_to_server(flaky, s))
        upstream_port = loop.run(server.__aenter__())
        try:
            with envoy_for(loop, tmp_path, upstream_port) as envoy:
                read = call(envoy.port, "GET", key_path(b"r"))
                assert read.status == 200, read
                assert [unb64(kv["value"]) for kv in read.json()["kvs"]] == [b"ok"]
                assert flaky.range_calls == 2  # the UNAVAILABLE answer was retried

                write = call(envoy.port, "PUT", key_path(b"w"), {"value": b64(b"v")})
                assert write.status == 503  # UNAVAILABLE, converted
                assert write.json()["code"] == UNAVAILABLE
                assert write.json()["message"] == "maybe proposed"
                assert flaky.put_calls == 1  # a write that may have been proposed: no retry
        finally:
            loop.run(server.__aexit__(None, None, None))
    finally:
        loop.close()


def _http_filter_names(door: envoy_config.FrontDoor) -> list[str]:
    [chain] = envoy_config.listener(door).filter_chains
    manager = hcm_pb2.HttpConnectionManager()
    assert chain.filters[0].typed_config.Unpack(manager)
    return [f.name for f in manager.http_filters]


def test_http_json_is_on_by_default_and_can_be_turned_off() -> None:
    door = envoy_config.FrontDoor(listen_port=1, gateways=[("127.0.0.1", 2)])
    assert _http_filter_names(door) == [
        "envoy.filters.http.local_ratelimit",
        "envoy.filters.http.grpc_json_transcoder",
        "envoy.filters.http.buffer",
        "envoy.filters.http.router",
    ]
    off = envoy_config.FrontDoor(listen_port=1, gateways=[("127.0.0.1", 2)], http_json=False)
    assert "envoy.filters.http.grpc_json_transcoder" not in _http_filter_names(off)


# -- strict input: required fields, bounded bodies (issue 11 item 6) ------------------------------

VALUE_REQUIRED = 'value is required (send "" for an empty value)'


def _error(answer: Answer) -> tuple[int, int, str]:
    """(HTTP status, gRPC code, message) of an error dkv answered (convert_grpc_status)."""
    body = answer.json()
    assert body["details"] == [], body
    return answer.status, body["code"], body["message"]


def test_a_put_without_value_is_refused_and_writes_nothing(stack: Stack) -> None:
    """The transcoder drops unknown JSON fields: a misspelt ``"valu"`` arrives as a Put
    without a value, which used to write an empty one with 200 OK."""
    key = b"strict/value"
    put(stack.port, key, b"old")
    [old] = call(stack.port, "GET", key_path(key)).json()["kvs"]
    refused = (400, INVALID_ARGUMENT, VALUE_REQUIRED)
    for body in ({"valu": b64(b"new")}, {}, {"value": None}, b"", {"prev_kv": True}):
        assert _error(call(stack.port, "PUT", key_path(key), body)) == refused, body
    whole = call(stack.port, "POST", "/v1/kv:put", {"key": b64(key), "valu": b64(b"new")})
    assert _error(whole) == refused
    # A precondition whose field is misspelt sets no condition: refused, not unconditional.
    cas = {"value": b64(b"new"), "precondition": {"verison": "1"}}
    status, code, message = _error(call(stack.port, "PUT", key_path(key), cas))
    assert (status, code) == (400, INVALID_ARGUMENT)
    assert message.startswith("precondition must set one of version, mod_revision or value")
    # Nothing was written: the same value at the same revision.
    assert call(stack.port, "GET", key_path(key)).json()["kvs"] == [old]

    # An empty value is written by sending it.
    assert put(stack.port, key, b"")["succeeded"] is True
    [kv] = call(stack.port, "GET", key_path(key)).json()["kvs"]
    assert kv["value"] == "" and kv["version"] == "2"


def test_a_watch_without_start_revision_is_refused(stack: Stack) -> None:
    """A resumed watch whose ``start_revision`` is misspelt would silently skip the changes
    since then: it must say where it starts (0: from now on)."""
    expected = (
        400,
        INVALID_ARGUMENT,
        "start_revision is required (0: changes from now on; N: from revision N on)",
    )
    body = {"key": b64(b"strict/watch"), "start_revison": "7"}
    assert _error(call(stack.port, "POST", "/v1/kv:watch", body)) == expected
    query = urllib.parse.urlencode({"key": b64(b"strict/watch")})
    assert _error(call(stack.port, "GET", f"/v1/kv:watch?{query}")) == expected
    # Said explicitly, it is served. ("0", from now on, arrives as given too: the gRPC
    # watches of test_gateway_routing send it; here the answer's headers would wait for the
    # first event.)
    written = put(stack.port, b"strict/watch", b"w")
    start = {"key": b64(b"strict/watch"), "start_revision": written["header"]["revision"]}
    with watch_lines(stack.port, "POST", "/v1/kv:watch", start) as events:
        [event] = next(events)["events"]
        assert unb64(event["kv"]["value"]) == b"w"


def _grpc_put(stack: Stack, req: bytes) -> kv_pb2.PutResponse:
    """One raw gRPC Put through Envoy (bytes as they are), on the stack's loop."""

    async def run() -> kv_pb2.PutResponse:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.port}") as channel:
            stub = channel.unary_unary(
                "/dkv.v1.KV/Put",
                request_serializer=lambda b: b,
                response_deserializer=kv_pb2.PutResponse.FromString,
            )
            answer: kv_pb2.PutResponse = await stub(req, timeout=DEADLINE_S)
            return answer

    return stack.run(run())


def test_oversize_bodies_are_refused_at_envoy_naming_the_limit(stack: Stack) -> None:
    door = envoy_config.FrontDoor(listen_port=1, gateways=[("127.0.0.1", 2)])
    grpc_max, json_max = door.grpc_request_bytes_max, door.http_json_request_bytes
    assert (grpc_max, json_max) == (2_102_400, 2_868_736)  # docs/http.md quotes them
    key = b"strict/size"
    put(stack.port, key, b"old")
    [old] = call(stack.port, "GET", key_path(key)).json()["kvs"]

    # HTTP/JSON: a body over the limit is a 413 naming it, from Envoy.
    too_big = call(stack.port, "PUT", key_path(key), {"value": b64(b"x" * (json_max * 3 // 4))})
    assert (too_big.status, too_big.content_type) == (413, "text/plain")
    assert too_big.text == (
        f"request body too large: the front door takes HTTP/JSON request bodies of at most "
        f"{json_max} bytes, carrying a request of at most {grpc_max} bytes as protobuf "
        "(docs/http.md)\n"
    )
    # A body within the JSON limit whose request is over the gRPC one (a long request id is
    # as long in both): the same answer.
    long_id = call(stack.port, "PUT", key_path(key), {"value": "", "request_id": "r" * grpc_max})
    assert (long_id.status, long_id.text) == (413, too_big.text)

    # gRPC: RESOURCE_EXHAUSTED naming the limit, from Envoy.
    oversize = kv_pb2.PutRequest(key=key, value=b"x" * grpc_max).SerializeToString()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        _grpc_put(stack, oversize)
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details() == (
        "request message too large: the front door takes gRPC request messages of at most "
        f"{grpc_max} bytes (docs/http.md)"
    )
    assert call(stack.port, "GET", key_path(key)).json()["kvs"] == [old]  # nothing written

    # The largest valid request passes, as gRPC and as JSON (the CAS itself fails).
    largest = kv_pb2.PutRequest(
        key=b"L" * 4096,
        value=b"v" * (1 << 20),
        request_id="r" * 128,
        precondition=kv_pb2.Precondition(value=b"p" * (1 << 20)),
    )
    assert largest.ByteSize() <= grpc_max
    assert _grpc_put(stack, largest.SerializeToString()).succeeded is False
    as_json = {
        "request_id": largest.request_id,
        "precondition": {"value": b64(largest.precondition.value)},
    }
    assert put(stack.port, largest.key, largest.value, **as_json)["succeeded"] is False
    # Envoy and the node keep serving.
    assert put(stack.port, key, b"new")["succeeded"] is True


# -- dkv envoy-bootstrap --------------------------------------------------------------------------

DKV = [sys.executable, "-c", "from dkv.cli.main import app; app()"]


def _dkv(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DKV, *args], capture_output=True, text=True, check=False, timeout=DEADLINE_S
    )


def test_envoy_bootstrap_command_is_accepted_by_envoy(tmp_path: Path) -> None:
    out = tmp_path / "bootstrap.json"
    written = _dkv(
        "envoy-bootstrap",
        *("--xds", "127.0.0.1:18000", "--admin-port", "19901"),
        *("--node-id", "edge-1", "--out", str(out)),
    )
    assert written.returncode == 0, written.stderr
    config = json.loads(out.read_text())
    assert config["node"]["id"] == "edge-1"
    assert config["admin"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 19901,
    }
    [ads_cluster] = config["static_resources"]["clusters"]
    endpoint = ads_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 18000}

    validated = subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(out), "--log-level", "warn"],
        capture_output=True,
        text=True,
        check=False,
        timeout=DEADLINE_S,
    )
    assert validated.returncode == 0, validated.stderr

    # Without --out the same JSON goes to stdout.
    printed = _dkv(
        "envoy-bootstrap",
        *("--xds", "127.0.0.1:18000", "--admin-port", "19901", "--node-id", "edge-1"),
    )
    assert printed.returncode == 0 and json.loads(printed.stdout) == config


def test_envoy_bootstrap_command_rejects_a_bad_address() -> None:
    for bad in ("localhost", "localhost:0", "localhost:http", ":18000"):
        answer = _dkv("envoy-bootstrap", "--xds", bad)
        assert answer.returncode == 2, (bad, answer.stdout)
        assert "HOST:PORT" in answer.stderr
