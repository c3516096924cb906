"""The one place where the node translates :mod:`dkv.errors` into gRPC statuses.

- InvalidArgument      -> INVALID_ARGUMENT, naming the problem;
- NotLeader            -> UNAVAILABLE "not the leader", with trailing metadata
  ``dkv-leader-id`` (hex-free decimal id), ``dkv-leader-name`` and ``dkv-leader-address`` (the
  leader's client address) when known, so callers retry at the leader. Nothing was proposed,
  so retrying is always safe (etcd answers the same way);
- ProposalDropped / ReadIndexDropped -> UNAVAILABLE with ``dkv-retry-safe: true``;
- ConfChangeRejected   -> FAILED_PRECONDITION (another change is pending, or the change is
  invalid for the current configuration);
- DeadlineExceeded     -> DEADLINE_EXCEEDED: a write may or may not have happened; retrying
  with the same request_id is safe;
- any other DkvError   -> INTERNAL.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
import grpc.aio

from dkv.errors import (
    ConfChangeRejected,
    DeadlineExceeded,
    DkvError,
    InvalidArgument,
    NotLeader,
    PermissionDenied,
    ProposalDropped,
    ReadIndexDropped,
)

__all__ = ["Ctx", "LeaderInfo", "call", "leader_trailers"]

T = TypeVar("T")
Ctx = grpc.aio.ServicerContext[object, object]
# member id -> (name, client address); empty strings when unknown.
LeaderInfo = Callable[[int], tuple[str, str]]


def leader_trailers(leader_id: int, info: LeaderInfo) -> tuple[tuple[str, str], ...]:
    md: list[tuple[str, str]] = [("dkv-leader-id", str(leader_id))]
    if leader_id:
        name, address = info(leader_id)
        if name:
            md.append(("dkv-leader-name", name))
        if address:
            md.append(("dkv-leader-address", address))
    return tuple(md)


async def call(
    context: Ctx,
    fn: Callable[[], Awaitable[T]],
    info: LeaderInfo,
    on_error: Callable[[DkvError], None] | None = None,
) -> T:
    """Run ``fn`` and turn a dkv error into the matching status (``context.abort`` raises).
    ``on_error`` sees every dkv error first (the node counts rejections by reason)."""
    try:
        return await fn()
    except DkvError as exc:
        if on_error is not None:
            on_error(exc)
        await _abort(context, exc, info)
    raise AssertionError("unreachable")  # context.abort always raises


async def _abort(context: Ctx, exc: DkvError, info: LeaderInfo) -> None:
    if isinstance(exc, InvalidArgument):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    elif isinstance(exc, NotLeader):
        context.set_trailing_metadata(leader_trailers(exc.leader_hint, info))
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    elif isinstance(exc, (ProposalDropped, ReadIndexDropped)):
        context.set_trailing_metadata((("dkv-retry-safe", "true"),))
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    elif isinstance(exc, ConfChangeRejected):
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    elif isinstance(exc, DeadlineExceeded):
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
    elif isinstance(exc, PermissionDenied):
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
    else:
        await context.abort(grpc.StatusCode.INTERNAL, str(exc))
