"""A storage node's registration with the membership service (DESIGN.md "membership").

:class:`Registration` is one asyncio task owned by the node:

1. **join**: ``JoinNode`` with the node's member id, name and advertised peer/client addresses,
   retried with jittered exponential backoff until it succeeds or the node stops. Membership
   may come up after the node (or be down for a while): the node never fails because of it.
2. **heartbeat**: every ``interval_s``, ``Heartbeat`` with one :class:`LeaderEntry` (shard id,
   term) per shard this node leads now. A failed heartbeat is retried at the next interval; a
   heartbeat refused because membership does not know the node (FAILED_PRECONDITION) sends
   the node back to step 1.

Calls go through :class:`dkv.client.Client`, which follows NOT_LEADER answers (UNAVAILABLE with
``dkv-leader-address``) to the membership leader and tries the other endpoints when one is
down. There is one call in flight at a time. After a failed call the client's channels are
dropped, so that the next attempt connects afresh instead of waiting out gRPC's reconnect
backoff (up to two minutes) to a replica that was down.

Logging is per state change: the first failure of a streak is a warning, the recovery is one
info line; failures in between are debug. The counters (``joined``, ``joins``,
``heartbeats_ok``, ``heartbeats_failed``) are for tests and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Iterable, Sequence

from dkv.client import Client, ClientTls
from dkv.errors import ConfChangeRejected, InvalidArgument
from dkv.host.channels import TlsFiles
from dkv.v1 import membership_pb2 as pb

__all__ = ["LeadersFn", "Registration"]

log = logging.getLogger("dkv.node.registration")

_SERVICE = "dkv.v1.Membership"

LeadersFn = Callable[[], Iterable[tuple[int, int]]]
"""The shards this node leads now, as (shard id, term)."""

BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 2.0


class Registration:
    """See the module docstring. ``me`` names the node (id, name, addresses; labels and zone
    as given); ``leaders`` is read at every heartbeat."""

    def __init__(
        self,
        endpoints: Sequence[str],
        me: pb.Node,
        leaders: LeadersFn,
        interval_s: float = 1.0,
        tls: TlsFiles | None = None,
        rng: random.Random | None = None,
        call_timeout_s: float | None = None,
        backoff_max_s: float | None = None,
    ) -> None:
        if not endpoints:
            raise InvalidArgument("registration needs at least one membership endpoint")
        if interval_s <= 0:
            raise InvalidArgument(f"heartbeat interval must be > 0, got {interval_s}")
        if me.id < 1 or not me.name:
            raise InvalidArgument("registration needs the node's id (>= 1) and name")
        self.endpoints = list(endpoints)
        self.me = me
        self.leaders = leaders
        self.interval_s = interval_s
        self.rng = rng or random.Random()
        # A heartbeat slower than a few intervals is as good as lost; a join may take an
        # election of the membership group.
        self.call_timeout_s = call_timeout_s or min(5.0, max(1.0, 3 * interval_s))
        # Joins are retried no slower than about two heartbeat intervals (capped).
        self.backoff_max_s = max(
            BACKOFF_MIN_S,
            backoff_max_s if backoff_max_s is not None else min(BACKOFF_MAX_S, 2 * interval_s),
        )
        self._client_tls = (
            None if tls is None else ClientTls(tls.cert_file, tls.key_file, tls.trusted_ca_file)
        )
        self._client = self._new_client()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Counters for tests and metrics.
        self.joined = False
        self.joins = 0
        self.join_failures = 0
        self.heartbeats_ok = 0
        self.heartbeats_failed = 0
        self.map_version = 0  # the membership map version of the last answer
        self._failing = False  # in a streak of failed calls (for logging once per streak)

    def _new_client(self) -> Client:
        return Client(self.endpoints, self._client_tls, self.call_timeout_s, self.rng)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop at once (an in-flight call is cancelled) and close the channels."""
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._client.close()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # -- the loop -------------------------------------------------------------------------------

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopping; returns False when the registration is stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), max(0.0, seconds))
        return not self._stopping.is_set()

    async def _run(self) -> None:
        while not self._stopping.is_set():
            await self._join()
            if self._stopping.is_set():
                return
            await self._heartbeat_loop()

    async def _join(self) -> None:
        backoff = BACKOFF_MIN_S
        while not self._stopping.is_set():
            try:
                resp = await self._client._call(
                    "JoinNode",
                    pb.JoinNodeRequest(node=self.me),
                    pb.JoinNodeResponse,
                    service=_SERVICE,
                )
            except Exception as exc:  # never let membership take the node down
                self.join_failures += 1
                self._failed(f"joining membership at {','.join(self.endpoints)} failed", exc)
                await self._reset_client()
                # Full jitter: replicas coming back do not see every node at the same moment.
                if not await self._sleep(backoff * (0.5 + self.rng.random())):
                    return
                backoff = min(self.backoff_max_s, backoff * 2)
                continue
            self.joined = True
            self.joins += 1
            self.map_version = max(self.map_version, resp.version)
            self._failing = False
            log.info(
                "node %d (%s) registered with membership (map version %d)",
                self.me.id,
                self.me.name,
                resp.version,
            )
            return

    async def _heartbeat_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not self._stopping.is_set():
            next_at += self.interval_s
            req = pb.HeartbeatRequest(
                node_id=self.me.id,
                leaders=[
                    pb.LeaderEntry(shard_id=sid, leader_id=self.me.id, term=term)
                    for sid, term in sorted(self.leaders())
                ],
            )
            try:
                resp = await self._client._call(
                    "Heartbeat", req, pb.HeartbeatResponse, service=_SERVICE
                )
            except ConfChangeRejected as exc:  # FAILED_PRECONDITION: membership lost us
                self.heartbeats_failed += 1
                self.joined = False
                self._failing = False
                log.warning("membership refused a heartbeat (%s); registering again", exc)
                return
            except Exception as exc:
                self.heartbeats_failed += 1
                self._failed("heartbeat to membership failed", exc)
                await self._reset_client()
            else:
                self.heartbeats_ok += 1
                self.map_version = max(self.map_version, resp.version)
                if self._failing:
                    self._failing = False
                    log.info("heartbeats to membership succeed again")
            now = loop.time()
            next_at = max(next_at, now)  # a slow call: skip the missed beats, never burst
            if not await self._sleep(next_at - now):
                return

    def _failed(self, what: str, exc: BaseException) -> None:
        if not self._failing:
            self._failing = True
            log.warning("%s: %s (retrying)", what, exc)
        else:
            log.debug("%s: %s", what, exc)

    async def _reset_client(self) -> None:
        """Drop the channels after a failure: the next call connects afresh."""
        old, self._client = self._client, self._new_client()
        with contextlib.suppress(Exception):
            await old.close()
