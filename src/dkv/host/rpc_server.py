"""Every gRPC server of every dkv process is made here (:func:`new_server`).

One place decides what all of them share:

- **Malformed requests are the caller's problem.** A request body that is not a valid
  protobuf of the method's request type (one byte ``0xff``, a truncated varint, field number
  0, invalid UTF-8 in a ``string`` field) makes gRPC's own deserializer raise, and gRPC
  answers ``UNKNOWN: Unexpected <class DecodeError>`` after logging a traceback. UNKNOWN says
  "the server is sick", and Envoy's outlier detection ejected the only gateway after a few of
  them (issue 9). :class:`DecodeGuard` decodes every request of every method in one place:
  a body that does not decode answers ``INVALID_ARGUMENT`` naming the request type and what
  is wrong, and is logged in one line, rate-limited (:class:`RateLimitedLog`), never a
  traceback. It wraps the method handlers the services registered (their own deserializers
  stay the single source of the request types), so a new service is covered by being added
  to a server made here.
- no ``SO_REUSEPORT`` (gRPC's default): a port already taken is a refusal at start, never a
  second process sharing it;
- **gRPC metrics** (``grpc_server_started_total``, ``grpc_server_handled_total``,
  ``grpc_server_handling_seconds``; :mod:`dkv.telemetry.metrics`) when the process passes its
  :class:`~dkv.telemetry.GrpcServerMetrics`: recorded by the same wrapper, outside the decode
  check, so a malformed request counts as ``InvalidArgument``;
- **traces** (:mod:`dkv.telemetry.tracing`) when the process passes its tracer: a SERVER span
  per unary call whose parent is the caller's ``traceparent``, current while the handler runs
  (so the handler's own spans are its children), ERROR with the gRPC code when it fails;
  health checks, peer streams and heartbeats are never traced;
- the keepalive enforcement that matches our clients' pings
  (:data:`dkv.host.channels.SERVER_KEEPALIVE_OPTIONS`), so no client gets ``GOAWAY
  too_many_pings``;
- **message sizes** (:mod:`dkv.sizes`): a request over ``grpc.max_receive_message_length`` or
  an answer over ``grpc.max_send_message_length`` is RESOURCE_EXHAUSTED before any handler
  (or decoding) sees it. By default dkv's public limits (the largest valid request, 2 MiB +
  5 KiB; answers up to 4 MiB); a node passes its own (``Limits.message_limits``: bigger
  values, bigger messages). (The Raft peer ports are not gRPC: dkv.host.peer_transport.)
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Tracer

from dkv.errors import InvalidArgument
from dkv.host.channels import SERVER_KEEPALIVE_OPTIONS, TlsFiles
from dkv.limited_log import RateLimitedLog
from dkv.security import tls_reload
from dkv.security.access import CALLER, Access
from dkv.sizes import message_limits
from dkv.telemetry.metrics import GrpcServerMetrics, MethodMetrics, grpc_type
from dkv.telemetry.tracing import (
    UNSAMPLED_PARENT,
    end_rpc_span,
    is_traced,
    start_server_span,
    unsampled_parent,
)

__all__ = [
    "DecodeGuard",
    "Malformed",
    "RateLimitedLog",
    "bind",
    "finish_pending_tasks",
    "new_server",
    "with_port",
]

log = logging.getLogger("dkv.rpc")

BAD_REQUEST_LOG_INTERVAL_S = 10.0
"""At most one log line per this many seconds for malformed requests (per process); the
line says how many were not logged since the last one."""
DETAIL_CHARS_MAX = 200


@dataclass(frozen=True, slots=True)
class Malformed:
    """What the guarded deserializer returns instead of raising: why the bytes did not decode."""

    type_name: str
    reason: str


def _type_name(deserializer: Callable[[bytes], Any]) -> str:
    """``dkv.v1.PutRequest`` for ``PutRequest.FromString`` (best effort, for messages)."""
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    full_name = getattr(descriptor, "full_name", None)
    if isinstance(full_name, str):
        return full_name
    return getattr(deserializer, "__qualname__", "request")


def _reason(exc: Exception) -> str:
    """DecodeError's own words, without its "Error parsing message with type X:" preamble."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    _, sep, tail = text.partition("': ")
    text = tail if sep and text.startswith("Error parsing message") else text
    return text[:DETAIL_CHARS_MAX]


class DecodeGuard(grpc.aio.ServerInterceptor):
    """See the module docstring. Handlers are wrapped once per method and cached."""

    def __init__(
        self,
        bad_requests: RateLimitedLog | None = None,
        metrics: GrpcServerMetrics | None = None,
        tracer: Tracer | None = None,
        access: Access | None = None,
    ) -> None:
        self.bad_requests = bad_requests or RateLimitedLog(log, BAD_REQUEST_LOG_INTERVAL_S)
        self.metrics = metrics
        self.tracer = tracer
        self.access = access
        self.malformed_total = 0  # for tests and, later, metrics
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any] | None] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],  # -> Awaitable[handler|None]
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method = handler_call_details.method
        if method in self._wrapped:
            cached = self._wrapped[method]
            if cached is not None:
                return cached
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # type: ignore[return-value]  # None: gRPC answers UNIMPLEMENTED
        wrapped = self._wrap(method, handler)
        if self.tracer is not None and is_traced(method) and not wrapped.response_streaming:
            wrapped = self._trace(method, wrapped)
        self._wrapped[method] = wrapped
        return wrapped

    # -- wrapping -------------------------------------------------------------------------------

    def _reject(self, method: str, bad: Malformed, context: Any) -> tuple[grpc.StatusCode, str]:
        self.malformed_total += 1
        peer = context.peer() if hasattr(context, "peer") else "?"
        self.bad_requests.warning(
            "malformed request to %s from %s: %s: %s", method, peer, bad.type_name, bad.reason
        )
        return (
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request body is not a valid {bad.type_name}: {bad.reason}",
        )

    def _wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        if self.access is not None and not self.access.is_open(method):
            handler = self._authorize(method, handler)
        deserializer = handler.request_deserializer
        if deserializer is None:  # raw bytes: nothing can fail to decode
            return self._observe(method, handler) if self.metrics else handler
        type_name = _type_name(deserializer)

        def decode(data: bytes) -> Any:
            try:
                return deserializer(data)
            except Exception as exc:  # every library error of decoding, by design
                return Malformed(type_name, _reason(exc))

        fields: dict[str, Any] = {"request_deserializer": decode}
        if handler.request_streaming:
            name = "stream_stream" if handler.response_streaming else "stream_unary"
            fields[name] = self._stream_request(method, getattr(handler, name))
        else:
            name = "unary_stream" if handler.response_streaming else "unary_unary"
            fields[name] = self._unary_request(method, getattr(handler, name))
        replace: Callable[..., grpc.RpcMethodHandler[Any, Any]] = handler._replace  # type: ignore[attr-defined]
        guarded = replace(**fields)
        return self._observe(method, guarded) if self.metrics else guarded

    def _authorize(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """``handler`` behind the server's access rules (dkv.security.access), checked with
        the decoded request (a stream's before its first message), innermost: a malformed
        body is refused before, and a denial is counted and traced like any answer."""
        assert self.access is not None
        check = self.access.check
        if handler.request_streaming:
            name = "stream_stream" if handler.response_streaming else "stream_unary"
        else:
            name = "unary_stream" if handler.response_streaming else "unary_unary"
        behavior = getattr(handler, name)
        streaming = handler.request_streaming

        if inspect.isasyncgenfunction(behavior):

            async def checked_gen(request: Any, context: Any) -> AsyncIterator[Any]:
                who = None
                if streaming or not isinstance(request, Malformed):
                    who = await check(method, None if streaming else request, context)
                # Each call runs in a task of its own, whose context ends with it: no reset.
                # (A watch cancelled mid-stream is closed by asyncio in another context, where
                # resetting the token raised and logged a traceback.)
                CALLER.set(who)
                async for item in behavior(request, context):
                    yield item

            checked: Callable[..., Any] = checked_gen
        elif inspect.iscoroutinefunction(behavior):

            async def checked_call(request: Any, context: Any) -> Any:
                who = None
                if streaming or not isinstance(request, Malformed):
                    who = await check(method, None if streaming else request, context)
                caller = CALLER.set(who)
                try:
                    return await behavior(request, context)
                finally:
                    CALLER.reset(caller)

            checked = checked_call
        else:

            def refused(request: Any, context: Any) -> Any:
                # Access checks await the policy; every dkv server is grpc.aio.
                context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{method}: no access check")

            checked = refused
        replace: Callable[..., grpc.RpcMethodHandler[Any, Any]] = handler._replace  # type: ignore[attr-defined]
        return replace(**{name: checked})

    def _observe(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """``handler`` with its calls counted and timed (go-grpc-prometheus's metrics)."""
        assert self.metrics is not None
        kind = grpc_type(handler.request_streaming, handler.response_streaming)
        name = {
            "unary": "unary_unary",
            "server_stream": "unary_stream",
            "client_stream": "stream_unary",
            "bidi_stream": "stream_stream",
        }[kind]
        observed = _observed(getattr(handler, name), self.metrics.method(method, kind))
        replace: Callable[..., grpc.RpcMethodHandler[Any, Any]] = handler._replace  # type: ignore[attr-defined]
        return replace(**{name: observed})

    def _trace(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """``handler`` (unary answer) inside a SERVER span. Streamed answers (watches) are
        not traced: a span as long as a stream says nothing about a request."""
        assert self.tracer is not None
        name = "stream_unary" if handler.request_streaming else "unary_unary"
        behavior = getattr(handler, name)
        if not inspect.iscoroutinefunction(behavior):
            return handler  # our servers are all grpc.aio; sync handlers stay untraced
        traced = _traced(behavior, self.tracer, method)
        replace: Callable[..., grpc.RpcMethodHandler[Any, Any]] = handler._replace  # type: ignore[attr-defined]
        return replace(**{name: traced})

    def _unary_request(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        reject = self._reject
        if inspect.isasyncgenfunction(behavior):

            async def unary_async_gen(request: Any, context: Any) -> AsyncIterator[Any]:
                if isinstance(request, Malformed):
                    await context.abort(*reject(method, request, context))
                async for item in behavior(request, context):
                    yield item

            return unary_async_gen
        if inspect.iscoroutinefunction(behavior):

            async def unary_async(request: Any, context: Any) -> Any:
                if isinstance(request, Malformed):
                    await context.abort(*reject(method, request, context))
                return await behavior(request, context)

            return unary_async
        if inspect.isgeneratorfunction(behavior):

            def unary_gen(request: Any, context: Any) -> Iterator[Any]:
                if isinstance(request, Malformed):
                    context.abort(*reject(method, request, context))
                yield from behavior(request, context)

            return unary_gen

        def unary_sync(request: Any, context: Any) -> Any:
            if isinstance(request, Malformed):
                context.abort(*reject(method, request, context))  # raises (sync handlers too)
            return behavior(request, context)

        return unary_sync

    def _stream_request(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        reject = self._reject

        async def checked_async(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, Malformed):
                    await context.abort(*reject(method, request, context))
                yield request

        def checked_sync(requests: Iterator[Any], context: Any) -> Iterator[Any]:
            for request in requests:
                if isinstance(request, Malformed):
                    context.abort(*reject(method, request, context))
                yield request

        if inspect.isasyncgenfunction(behavior):

            async def stream_async_gen(requests: Any, context: Any) -> AsyncIterator[Any]:
                async for item in behavior(checked_async(requests, context), context):
                    yield item

            return stream_async_gen
        if inspect.iscoroutinefunction(behavior):

            async def stream_async(requests: Any, context: Any) -> Any:
                return await behavior(checked_async(requests, context), context)

            return stream_async
        if inspect.isgeneratorfunction(behavior):

            def stream_gen(requests: Any, context: Any) -> Iterator[Any]:
                yield from behavior(checked_sync(requests, context), context)

            return stream_gen

        def stream_sync(requests: Any, context: Any) -> Any:
            return behavior(checked_sync(requests, context), context)

        return stream_sync


def _code(context: Any, default: grpc.StatusCode) -> grpc.StatusCode:
    code = context.code() if hasattr(context, "code") else None
    return code if isinstance(code, grpc.StatusCode) else default


def _cancelled_code(context: Any) -> grpc.StatusCode:
    """A cancelled handler: DeadlineExceeded when the caller's deadline has passed (as Go's
    servers report it), Canceled when the caller went away before it."""
    remaining = context.time_remaining() if hasattr(context, "time_remaining") else None
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


def _details(context: Any) -> str:
    details = context.details() if hasattr(context, "details") else None
    if isinstance(details, bytes):
        return details.decode("utf-8", "replace")
    return details if isinstance(details, str) else ""


def _traced(behavior: Callable[..., Any], tracer: Tracer, method: str) -> Callable[..., Any]:
    """``behavior`` (a coroutine handler) inside a SERVER span, current while it runs, ended
    with the call's final code (as :func:`_observed` finds it)."""
    ok, unknown = grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN

    async def traced(request: Any, context: Any) -> Any:
        metadata = context.invocation_metadata()
        unsampled = unsampled_parent(metadata)
        if unsampled is not None:
            # The caller did not sample it: no span here or below, the header travels on.
            passed_on = UNSAMPLED_PARENT.set(unsampled)
            try:
                return await behavior(request, context)
            finally:
                UNSAMPLED_PARENT.reset(passed_on)
        span = start_server_span(tracer, method, metadata)
        token = otel_context.attach(trace.set_span_in_context(span))
        code = ok
        try:
            result = await behavior(request, context)
            code = _code(context, ok)
            return result
        except asyncio.CancelledError:
            code = _cancelled_code(context)
            raise
        except BaseException:
            code = _code(context, unknown)
            raise
        finally:
            otel_context.detach(token)
            end_rpc_span(span, code, _details(context) if code is not ok else "")

    return traced


def _observed(behavior: Callable[..., Any], mm: MethodMetrics) -> Callable[..., Any]:
    """``behavior`` counted in ``mm``: started, then handled with the call's final code.

    The code is what the handler set (``context.abort`` / ``set_code``), OK when it returned
    without one, Canceled when the call was cancelled (the client went away) or DeadlineExceeded
    (its deadline passed), Unknown for an exception gRPC turns into UNKNOWN."""
    ok, unknown = grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN
    started = mm.started

    if inspect.isasyncgenfunction(behavior):

        async def stream_out(request: Any, context: Any) -> AsyncIterator[Any]:
            started.inc()
            t0 = time.perf_counter()
            code = ok
            try:
                async for item in behavior(request, context):
                    yield item
                code = _code(context, ok)
            except (asyncio.CancelledError, GeneratorExit):
                code = _cancelled_code(context)
                raise
            except BaseException:
                code = _code(context, unknown)
                raise
            finally:
                mm.done(code, t0)

        return stream_out
    if inspect.iscoroutinefunction(behavior):

        async def unary_out(request: Any, context: Any) -> Any:
            started.inc()
            t0 = time.perf_counter()
            code = ok
            try:
                result = await behavior(request, context)
                code = _code(context, ok)
                return result
            except asyncio.CancelledError:
                code = _cancelled_code(context)
                raise
            except BaseException:
                code = _code(context, unknown)
                raise
            finally:
                mm.done(code, t0)

        return unary_out
    if inspect.isgeneratorfunction(behavior):

        def sync_stream_out(request: Any, context: Any) -> Iterator[Any]:
            started.inc()
            t0 = time.perf_counter()
            code = ok
            try:
                yield from behavior(request, context)
                code = _code(context, ok)
            except GeneratorExit:
                code = _cancelled_code(context)
                raise
            except BaseException:
                code = _code(context, unknown)
                raise
            finally:
                mm.done(code, t0)

        return sync_stream_out

    def sync_unary_out(request: Any, context: Any) -> Any:
        started.inc()
        t0 = time.perf_counter()
        code = ok
        try:
            result = behavior(request, context)
            code = _code(context, ok)
            return result
        except BaseException:
            code = _code(context, unknown)
            raise
        finally:
            mm.done(code, t0)

    return sync_unary_out


def new_server(
    *,
    options: Sequence[tuple[str, Any]] = (),
    maximum_concurrent_rpcs: int | None = None,
    guard: DecodeGuard | None = None,
    metrics: GrpcServerMetrics | None = None,
    tracer: Tracer | None = None,
    access: Access | None = None,
) -> grpc.aio.Server:
    """A ``grpc.aio`` server with the shared policy of the module docstring. ``options`` are
    added to (and override) the shared ones; ``metrics``: where its calls are counted;
    ``tracer``: where its calls are traced (None: not traced); ``access``: who may call what
    (dkv.security.access; None: anyone who passes the TLS handshake)."""
    # gRPC sets SO_REUSEPORT by default: a second process could bind a port we hold and
    # share its connections silently. Off: a port in use is an error at start.
    merged: dict[str, Any] = {"grpc.so_reuseport": 0}
    merged.update(SERVER_KEEPALIVE_OPTIONS)
    # dkv's public message limits unless ``options`` say otherwise (module docstring).
    merged.update(message_limits().grpc_options())
    merged.update(dict(options))
    return grpc.aio.server(
        interceptors=[guard or DecodeGuard(metrics=metrics, tracer=tracer, access=access)],
        options=list(merged.items()),
        maximum_concurrent_rpcs=maximum_concurrent_rpcs,
    )


async def finish_pending_tasks(timeout_s: float = 1.0) -> set[asyncio.Task[object]]:
    """Wait, at most ``timeout_s``, until every other task of the running loop has finished;
    returns those still pending. For the end of a process's main coroutine, after its servers
    stopped and its clients closed.

    ``grpc.aio.Server.stop()`` returns when gRPC core has no live call, but the asyncio task
    grpc runs for each call (``_schedule_rpc_coro``) still needs a few loop iterations to see
    its call end. If ``asyncio.run`` returns meanwhile it cancels that task, and grpc logs the
    cancellation at ERROR with a traceback ("Exception not handled by _handle_exceptions in
    servicer method [/dkv.v1.RaftPeer/Stream]") on every graceful stop that had a stream
    open. Letting the tasks finish is the graceful stop; the bound keeps a stuck task from
    holding the process (asyncio.run cancels what is left)."""
    me = asyncio.current_task()
    others = {t for t in asyncio.all_tasks() if t is not me}
    if not others:
        return set()
    _, pending = await asyncio.wait(others, timeout=timeout_s)
    return pending


def with_port(address: str, port: int) -> str:
    """``address`` with its port replaced (the port a ``:0`` listener really got)."""
    host, _, _ = address.rpartition(":")
    return f"{host}:{port}"


def bind(
    server: grpc.aio.Server,
    address: str,
    tls: TlsFiles | None,
    *,
    check_interval_ms: int = tls_reload.CHECK_INTERVAL_MS,
) -> int:
    """Listen on ``address`` (mTLS when ``tls`` is given: clients must present a certificate
    signed by a CA of ``tls.trusted_ca_file``); returns the port. Raises InvalidArgument when
    it cannot, or when the TLS files are not a usable set.

    The files are reloaded when they change (looked at, at most every ``check_interval_ms``,
    when a client connects: :func:`dkv.security.tls_reload.server_credentials`): new
    connections get the new certificate and are checked against the new CA bundle."""
    try:
        if tls is None:
            port = server.add_insecure_port(address)
        else:
            watcher = tls_reload.TlsWatcher(
                tls, check_interval_ms=check_interval_ms, user=f"the server on {address}"
            )
            creds = tls_reload.server_credentials(watcher, require_client_auth=True)
            port = server.add_secure_port(address, creds)
    except RuntimeError as exc:  # grpcio >= 1.5x raises "Failed to bind" instead of returning 0
        raise InvalidArgument(f"cannot listen on {address} (in use or not an address)") from exc
    if port == 0:
        raise InvalidArgument(f"cannot listen on {address} (in use or not an address)")
    return port
