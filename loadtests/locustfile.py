"""dkv under locust: gRPC users and HTTP/JSON users of the front door (Envoy).

Run it with ``make loadtest`` or ``python -m loadtests.run`` (docs/loadtests.md), which fill in
the flags for ``make run``'s stack, bound the run and print a summary; by hand::

    .venv/bin/locust -f loadtests/locustfile.py --headless -u 8 -r 8 -t 30s \\
        --host https://127.0.0.1:2379 --dkv-cacert .dkv/certs/ca.crt \\
        --dkv-cert .dkv/certs/admin.crt --dkv-key .dkv/certs/admin.key GrpcUser JsonUser

Each step of a user is one operation picked by weight (``--dkv-weights``); the requests are
reported to locust as ``grpc``/``http`` ``put``, ``get``, ``range``, ``watch``, ``cas`` and
``cas conflict`` (a compare-and-swap whose precondition failed: not an error, a race lost).

- ``put``: an unconditional write of ``--dkv-value-size`` bytes.
- ``get``: a one-key Range (linearizable unless ``--dkv-serializable-reads``); a value found
  must be one this load test writes for that key.
- ``range``: the ``--dkv-range-limit`` keys from a chosen key on (fans out to every shard).
- ``watch``: a put, then a watch of that key from the put's revision, until its event arrives
  (the time to open a watch and be sent the event from history).
- ``cas``: a Put with a precondition on the ``mod_revision`` the user last saw for the key
  (or "must not exist" for a key it has not seen): the optimistic loop of a lock or counter.
  A failed precondition answers the key as it is, which the user remembers for the next try.

gRPC under locust: locust's gevent monkey-patches the process, and grpc must be told
(``grpc.experimental.gevent.init_gevent()``, before any channel); ``grpc.aio`` cannot run
here, so the users call the synchronous stub (not ``dkv.client``). Each user has its own
channel and connection (a local subchannel pool), as separate clients would.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import requests
from grpc.experimental import gevent as grpc_gevent
from locust import User, constant, events, task
from locust.env import Environment

from dkv.v1 import kv_pb2
from loadtests.workload import (
    DEFAULT_WEIGHTS,
    OPERATIONS,
    KeyChooser,
    WorkloadConfig,
    WriteRecord,
    make_value,
    parse_weights,
)

# After locust's monkey-patching (importing locust did it), before any channel.
grpc_gevent.init_gevent()

T = TypeVar("T")


class CheckError(Exception):
    """An answer that is not what the API promises (reported to locust as a failure)."""


class CallFailed(Exception):
    """A failed call, described without what differs between calls (URLs, keys), so that
    locust's error report groups the failures by cause."""


def _failure(exc: Exception) -> Exception:
    if isinstance(exc, grpc.Call):  # the grpc.RpcError of a finished call
        return CallFailed(f"{exc.code().name}: {exc.details()}")
    if isinstance(exc, requests.RequestException):
        reason = exc.args[0] if exc.args else exc
        reason = getattr(reason, "reason", reason)  # urllib3's MaxRetryError names the URL
        return CallFailed(f"{type(exc).__name__}: {reason}")
    return exc


# locust's event hooks are untyped.
@events.init_command_line_parser.add_listener  # type: ignore[untyped-decorator]
def _add_arguments(parser: Any) -> None:
    parser.add_argument(
        "--dkv-cacert", default="", help="CA certificate of the front door (TLS hosts)"
    )
    parser.add_argument("--dkv-cert", default="", help="client certificate (mTLS)")
    parser.add_argument("--dkv-key", default="", help="client certificate's key (mTLS)")
    parser.add_argument(
        "--dkv-key-prefix",
        default="",
        help="every key starts with this (default: loadtest/<UTC time>/)",
    )
    parser.add_argument("--dkv-keys", type=int, default=10_000, help="size of the key space")
    parser.add_argument(
        "--dkv-distribution",
        choices=["uniform", "zipf"],
        default="uniform",
        help="how keys are picked",
    )
    parser.add_argument("--dkv-zipf-s", type=float, default=1.1, help="Zipf exponent")
    parser.add_argument("--dkv-value-size", type=int, default=256, help="bytes per value")
    parser.add_argument(
        "--dkv-weights", default=DEFAULT_WEIGHTS, help=f"operation mix ({DEFAULT_WEIGHTS})"
    )
    parser.add_argument("--dkv-range-limit", type=int, default=10, help="keys per range")
    parser.add_argument(
        "--dkv-serializable-reads",
        action="store_true",
        default=False,
        help="gets and ranges read any replica (possibly stale) instead of linearizably",
    )
    parser.add_argument("--dkv-timeout", type=float, default=10.0, help="deadline per call (s)")
    parser.add_argument("--dkv-seed", default="", help="seed the users' choices (reproducible)")
    parser.add_argument(
        "--dkv-record",
        default="",
        help="write every key written, with its writes, to this JSON file at the end",
    )
    parser.add_argument(
        "--dkv-errors",
        default="",
        help="write the failures (locust's error report) to this JSON file at the end",
    )


class _Run:
    """What one locust process shares between its users (set by the init event)."""

    config: WorkloadConfig | None = None
    record = WriteRecord()
    record_path: Path | None = None
    errors_path: Path | None = None
    tls: tuple[bytes, bytes, bytes] | None = None  # ca, cert, key (PEM)
    cert_files: tuple[str, str, str] | None = None
    seed = ""
    numbers = itertools.count(1)


@events.init.add_listener  # type: ignore[untyped-decorator]
def _on_init(environment: Environment, **_kwargs: Any) -> None:
    opts = environment.parsed_options
    if opts is None:  # used as a library: the defaults
        _Run.config = WorkloadConfig(key_prefix=_default_prefix())
        return
    _Run.config = WorkloadConfig(
        key_prefix=(opts.dkv_key_prefix or _default_prefix().decode()).encode(),
        keys=opts.dkv_keys,
        distribution=opts.dkv_distribution,
        zipf_s=opts.dkv_zipf_s,
        value_size=opts.dkv_value_size,
        weights=parse_weights(opts.dkv_weights),
        range_limit=opts.dkv_range_limit,
        serializable_reads=opts.dkv_serializable_reads,
        timeout_s=opts.dkv_timeout,
    )
    files = (opts.dkv_cacert, opts.dkv_cert, opts.dkv_key)
    if any(files):
        if not all(files):
            raise SystemExit("--dkv-cacert, --dkv-cert and --dkv-key go together (mTLS)")
        _Run.cert_files = files
        ca, cert, key = (Path(f).read_bytes() for f in files)
        _Run.tls = (ca, cert, key)
    _Run.seed = opts.dkv_seed
    _Run.record_path = Path(opts.dkv_record) if opts.dkv_record else None
    _Run.errors_path = Path(opts.dkv_errors) if opts.dkv_errors else None


@events.test_stop.add_listener  # type: ignore[untyped-decorator]
def _on_test_stop(environment: Environment, **_kwargs: Any) -> None:
    if _Run.record_path is not None and _Run.config is not None:
        _Run.record.write(_Run.record_path, _Run.config)
    if _Run.errors_path is not None and environment.runner is not None:
        errors = list(environment.runner.stats.serialize_errors().values())
        _Run.errors_path.write_text(json.dumps(errors, indent=1, default=str))


def _default_prefix() -> bytes:
    return time.strftime("loadtest/%Y%m%dT%H%M%SZ/", time.gmtime()).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


class _Answer:
    """What the workload needs from a put (both protocols)."""

    __slots__ = ("current_mod_revision", "revision", "size", "succeeded")

    def __init__(
        self, succeeded: bool, revision: int, current_mod_revision: int, size: int
    ) -> None:
        self.succeeded = succeeded
        self.revision = revision  # the write's revision (the key's mod_revision) when succeeded
        self.current_mod_revision = current_mod_revision  # failed precondition: the key's
        self.size = size


class DkvUser(User):
    """The workload, over one protocol's five calls (``_put``, ``_get``, ``_range``,
    ``_watch_first``); each returns what it read and the answer's size in bytes."""

    abstract = True
    wait_time = constant(0)  # closed loop: the next call as soon as the last one answered
    protocol = ""

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        assert _Run.config is not None, "the init event sets the configuration"
        self.cfg = _Run.config
        number = next(_Run.numbers)
        self.rng = (
            random.Random(f"{_Run.seed}/{self.protocol}/{number}") if _Run.seed else random.Random()
        )
        self.keys = KeyChooser(self.cfg, self.rng)
        self.tag_prefix = f"{self.protocol[0]}{os.getpid()}-{number}"
        self.writes = itertools.count(1)
        self.seen: dict[bytes, int] = {}  # key -> mod_revision last seen (0: absent)
        ops = [op for op in OPERATIONS if self.cfg.weights[op] > 0]
        self.ops = ops
        self.op_weights = [self.cfg.weights[op] for op in ops]

    # -- the protocol's calls ----------------------------------------------------------------

    def _put(self, key: bytes, value: bytes, if_mod_revision: int | None) -> _Answer:
        """Write; with ``if_mod_revision``, only if the key's mod_revision is that (0: absent)."""
        raise NotImplementedError

    def _get(self, key: bytes) -> tuple[tuple[bytes, bytes, int] | None, int]:
        raise NotImplementedError

    def _range(self, start: bytes, end: bytes, limit: int) -> tuple[list[bytes], int]:
        raise NotImplementedError

    def _watch_first(self, key: bytes, start_revision: int) -> tuple[bytes, int, bool, int]:
        """(key, mod_revision) of the first event, whether the history was compacted, size."""
        raise NotImplementedError

    # -- reporting -----------------------------------------------------------------------------

    def _timed(self, name: str, call: Callable[[], T], size: Callable[[T], int]) -> T | None:
        start = time.perf_counter()
        try:
            out = call()
        except Exception as exc:  # grpc.RpcError, requests' errors, CheckError: a failure
            self._report(name, start, 0, _failure(exc))
            return None
        self._report(name, start, size(out), None)
        return out

    def _report(self, name: str, start: float, length: int, exc: Exception | None) -> None:
        self.environment.events.request.fire(
            request_type=self.protocol,
            name=name,
            response_time=(time.perf_counter() - start) * 1000.0,
            response_length=length,
            exception=exc,
            context={},
        )

    # -- the workload ----------------------------------------------------------------------------

    @task
    def step(self) -> None:
        op = self.rng.choices(self.ops, weights=self.op_weights)[0]
        getattr(self, f"op_{op}")()

    def _write(self, name: str, key: bytes, if_mod_revision: int | None) -> _Answer | None:
        tag = f"{self.tag_prefix}.{next(self.writes)}"
        value = make_value(key, tag, self.cfg.value_size)
        _Run.record.attempt(key, tag)  # before sending: a failed call may still write
        start = time.perf_counter()
        try:
            ans = self._put(key, value, if_mod_revision)
        except Exception as exc:
            self._report(name, start, 0, _failure(exc))
            return None
        if ans.succeeded:
            _Run.record.ack(key, tag)
            self.seen[key] = ans.revision
            self._report(name, start, ans.size, None)
        elif if_mod_revision is None:
            self._report(name, start, ans.size, CheckError("an unconditional put did not succeed"))
        else:
            self.seen[key] = ans.current_mod_revision
            self._report(f"{name} conflict", start, ans.size, None)
        return ans

    def op_put(self) -> None:
        self._write("put", self.cfg.key(self.keys.index()), None)

    def op_cas(self) -> None:
        key = self.cfg.key(self.keys.index())
        rev = self.seen.get(key, 0)
        # mod_revision 0 means "must not exist", as version 0 does.
        self._write("cas", key, rev)

    def op_get(self) -> None:
        key = self.cfg.key(self.keys.index())

        def call() -> tuple[tuple[bytes, bytes, int] | None, int]:
            found, size = self._get(key)
            if found is not None:
                got_key, value, mod_revision = found
                head = (key + b"|")[: self.cfg.value_size]
                if got_key != key or value[: len(head)] != head:
                    raise CheckError(f"get {key!r} answered {got_key!r} = {value[:40]!r}")
                self.seen[key] = mod_revision
            else:
                self.seen[key] = 0
            return found, size

        self._timed("get", call, lambda out: out[1])

    def op_range(self) -> None:
        index = self.keys.index()
        start = self.cfg.key(index)
        end = self.cfg.key(index + self.cfg.range_limit)  # may pass the key space: fine
        limit = self.cfg.range_limit

        def call() -> tuple[list[bytes], int]:
            keys, size = self._range(start, end, limit)
            if len(keys) > limit or keys != sorted(keys) or any(not start <= k < end for k in keys):
                raise CheckError(
                    f"range [{start!r}, {end!r}) limit {limit} answered {keys[:3]!r}..."
                )
            return keys, size

        self._timed("range", call, lambda out: out[1])

    def op_watch(self) -> None:
        key = self.cfg.key(self.keys.index())
        ans = self._write("put", key, None)
        if ans is None or not ans.succeeded:
            return
        rev = ans.revision

        def call() -> tuple[bytes, int, bool, int]:
            got = self._watch_first(key, rev)
            got_key, got_rev, compacted, _ = got
            if not compacted and (got_key != key or got_rev != rev):
                raise CheckError(
                    f"watch {key!r} from {rev}: first event is {got_key!r} at {got_rev}"
                )
            return got

        self._timed("watch", call, lambda out: out[3])


class GrpcUser(DkvUser):
    """dkv.v1.KV over gRPC (the synchronous stub, gevent-friendly)."""

    protocol = "grpc"

    def on_start(self) -> None:
        target = self.host or "127.0.0.1:2379"
        scheme, _, rest = target.partition("://")
        address = rest if rest else target
        plaintext = scheme == "http" or (not rest and _Run.tls is None)
        options = [("grpc.use_local_subchannel_pool", 1)]  # one connection per user
        if plaintext:
            self.channel = grpc.insecure_channel(address, options=options)
        else:
            ca, cert, key = _Run.tls or (None, None, None)
            creds = grpc.ssl_channel_credentials(ca, key, cert)
            self.channel = grpc.secure_channel(address, creds, options=options)
        self.put_call = self.channel.unary_unary(
            "/dkv.v1.KV/Put",
            request_serializer=kv_pb2.PutRequest.SerializeToString,
            response_deserializer=kv_pb2.PutResponse.FromString,
        )
        self.range_call = self.channel.unary_unary(
            "/dkv.v1.KV/Range",
            request_serializer=kv_pb2.RangeRequest.SerializeToString,
            response_deserializer=kv_pb2.RangeResponse.FromString,
        )
        self.watch_call = self.channel.unary_stream(
            "/dkv.v1.KV/Watch",
            request_serializer=kv_pb2.WatchRequest.SerializeToString,
            response_deserializer=kv_pb2.WatchResponse.FromString,
        )

    def on_stop(self) -> None:
        self.channel.close()

    def _consistency(self) -> kv_pb2.ReadConsistency:
        if self.cfg.serializable_reads:
            return kv_pb2.READ_CONSISTENCY_SERIALIZABLE
        return kv_pb2.READ_CONSISTENCY_LINEARIZABLE

    def _put(self, key: bytes, value: bytes, if_mod_revision: int | None) -> _Answer:
        req = kv_pb2.PutRequest(key=key, value=value)
        if if_mod_revision is not None:
            req.precondition.mod_revision = if_mod_revision
        resp: kv_pb2.PutResponse = self.put_call(req, timeout=self.cfg.timeout_s)
        return _Answer(
            resp.succeeded, resp.header.revision, resp.current.mod_revision, resp.ByteSize()
        )

    def _get(self, key: bytes) -> tuple[tuple[bytes, bytes, int] | None, int]:
        req = kv_pb2.RangeRequest(key=key, consistency=self._consistency())
        resp: kv_pb2.RangeResponse = self.range_call(req, timeout=self.cfg.timeout_s)
        if not resp.kvs:
            return None, resp.ByteSize()
        kv = resp.kvs[0]
        return (kv.key, kv.value, kv.mod_revision), resp.ByteSize()

    def _range(self, start: bytes, end: bytes, limit: int) -> tuple[list[bytes], int]:
        req = kv_pb2.RangeRequest(
            key=start, range_end=end, limit=limit, consistency=self._consistency()
        )
        resp: kv_pb2.RangeResponse = self.range_call(req, timeout=self.cfg.timeout_s)
        return [kv.key for kv in resp.kvs], resp.ByteSize()

    def _watch_first(self, key: bytes, start_revision: int) -> tuple[bytes, int, bool, int]:
        req = kv_pb2.WatchRequest(key=key, start_revision=start_revision)
        stream = self.watch_call(req, timeout=self.cfg.timeout_s)
        size = 0
        try:
            for resp in stream:
                size += resp.ByteSize()
                if resp.compacted:
                    return b"", 0, True, size
                if resp.events:
                    kv = resp.events[0].kv
                    return kv.key, kv.mod_revision, False, size
        finally:
            stream.cancel()
        raise CheckError(f"watch {key!r} from {start_revision}: the stream ended without events")


class JsonUser(DkvUser):
    """dkv.v1.KV over HTTP/JSON (Envoy's transcoder; docs/http.md), with ``requests``."""

    protocol = "http"

    def on_start(self) -> None:
        host = self.host or "https://127.0.0.1:2379"
        if "://" not in host:
            host = ("https://" if _Run.tls is not None else "http://") + host
        self.base = host.rstrip("/") + "/v1/kv"
        self.session = requests.Session()
        # The certificates given, not the environment's: requests lets REQUESTS_CA_BUNDLE
        # override a session's `verify`, and an HTTP(S)_PROXY would take the load elsewhere.
        self.session.trust_env = False
        if _Run.cert_files is not None:
            ca, cert, key = _Run.cert_files
            self.session.verify = ca
            self.session.cert = (cert, key)

    def on_stop(self) -> None:
        self.session.close()

    def _json(self, resp: requests.Response) -> Any:
        if resp.status_code != 200:
            raise CheckError(f"HTTP {resp.status_code}: {resp.text[:200]}")
        return resp.json()

    def _params(self) -> dict[str, str]:
        if self.cfg.serializable_reads:
            return {"consistency": "READ_CONSISTENCY_SERIALIZABLE"}
        return {}

    def _put(self, key: bytes, value: bytes, if_mod_revision: int | None) -> _Answer:
        body: dict[str, Any] = {"value": _b64(value)}
        if if_mod_revision is not None:
            body["precondition"] = {"mod_revision": str(if_mod_revision)}
        resp = self.session.put(
            f"{self.base}/{_b64url(key)}", json=body, timeout=self.cfg.timeout_s
        )
        got = self._json(resp)
        current = got.get("current") or {}
        return _Answer(
            bool(got["succeeded"]),
            int(got["header"]["revision"]),
            int(current.get("mod_revision", 0)),
            len(resp.content),
        )

    def _get(self, key: bytes) -> tuple[tuple[bytes, bytes, int] | None, int]:
        resp = self.session.get(
            f"{self.base}/{_b64url(key)}", params=self._params(), timeout=self.cfg.timeout_s
        )
        kvs = self._json(resp)["kvs"]
        if not kvs:
            return None, len(resp.content)
        kv = kvs[0]
        found = (
            base64.b64decode(kv["key"]),
            base64.b64decode(kv.get("value", "")),
            int(kv["mod_revision"]),
        )
        return found, len(resp.content)

    def _range(self, start: bytes, end: bytes, limit: int) -> tuple[list[bytes], int]:
        params = {"key": _b64url(start), "range_end": _b64url(end), "limit": str(limit)}
        resp = self.session.get(
            self.base, params={**params, **self._params()}, timeout=self.cfg.timeout_s
        )
        kvs = self._json(resp)["kvs"]
        return [base64.b64decode(kv["key"]) for kv in kvs], len(resp.content)

    def _watch_first(self, key: bytes, start_revision: int) -> tuple[bytes, int, bool, int]:
        body = {"key": _b64(key), "start_revision": str(start_revision)}
        with self.session.post(
            f"{self.base}:watch", json=body, stream=True, timeout=self.cfg.timeout_s
        ) as resp:
            if resp.status_code != 200:
                raise CheckError(f"HTTP {resp.status_code}: {resp.text[:200]}")
            size = 0
            # chunk_size=None: each line as it arrives (a watch line may be short).
            for line in resp.iter_lines(chunk_size=None):  # type: ignore[call-overload]
                size += len(line)
                if not line.strip():
                    continue
                msg = json.loads(line)
                if "error" in msg:  # the transcoder's in-stream error object
                    raise CheckError(f"watch stream error: {str(msg)[:200]}")
                msg = msg.get("result", msg)
                if msg.get("compacted"):
                    return b"", 0, True, size
                events = msg.get("events") or []
                if events:
                    kv = events[0]["kv"]
                    return base64.b64decode(kv["key"]), int(kv["mod_revision"]), False, size
        raise CheckError(f"watch {key!r} from {start_revision}: the stream ended without events")
