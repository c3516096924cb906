"""Managed placement: the shards a node hosts come from the membership service's cluster map.

A node started with ``--membership`` and no ``--initial-cluster`` is *managed*: it registers
(:mod:`dkv_node.registration`), watches the cluster map (:func:`dkv.client.cluster_map.
follow_cluster_map`) and makes its Raft groups follow the map:

- a shard that lists this node (voter or learner) and is not hosted yet is created. At the
  shard's first epoch the initial voters all bootstrap it with the same configuration (the
  map's voters; etcd's "new" cluster); later, a replica placed here starts empty and learns
  the configuration and data from the leader's snapshot (the leader added it as a learner
  first: the membership leader changes Raft before it records the change in the map);
- a hosted shard the map no longer lists this node for is dropped with all its data. Safe
  because the map records a removal only after the shard's Raft configuration committed it;
- every node of the map is a known peer (addresses for the Raft transport and for NOT_LEADER
  hints).

What is hosted, and the cluster's shard count (fixed at initialization; it maps keys to
shards), are persisted in the node's RocksDB, so a restarted node serves its shards at once,
before (or without) reaching membership.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc.aio

from dkv.client.cluster_map import ClusterMapView, follow_cluster_map
from dkv.host.members import Member
from dkv.raft import ConfState
from dkv.storage import CF_RAFT_STATE, Engine, group_prefix

if TYPE_CHECKING:
    from dkv_node.node import Node

__all__ = ["ShardHosting", "hosted_shards"]

log = logging.getLogger("dkv.node.hosting")

_HOSTED = group_prefix(0) + b"hosted/"
_SHARD_COUNT = group_prefix(0) + b"shard_count"
_U64 = struct.Struct(">Q")


def hosted_shards(engine: Engine) -> tuple[list[int], int]:
    """The shards this node hosted when it stopped, and the cluster's shard count (0:
    never learned)."""
    gids = [
        _U64.unpack(k[len(_HOSTED) :])[0]
        for k, _ in engine.scan(CF_RAFT_STATE, _HOSTED, _HOSTED + b"\xff")
    ]
    blob = engine.get(CF_RAFT_STATE, _SHARD_COUNT)
    return sorted(gids), (_U64.unpack(blob)[0] if blob else 0)


class ShardHosting:
    """See the module docstring. ``channel_for(address)`` gives a channel to a membership
    replica's client port (with the node's client TLS)."""

    def __init__(
        self,
        node: Node,
        endpoints: list[str],
        channel_for: Callable[[str], grpc.aio.Channel],
        shard_count: int,
    ) -> None:
        self.node = node
        self.endpoints = endpoints
        self.channel_for = channel_for
        self.view = ClusterMapView()
        self.shard_count = shard_count
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # Map versions this node has acted on (tests and status wait for it).
        self.reconciled_version = 0
        self._reconciled = asyncio.Condition()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(
                follow_cluster_map(self.channel_for, self.endpoints, self.view, self._on_change)
            ),
            loop.create_task(self._reconcile_loop()),
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def _on_change(self, _view: ClusterMapView) -> None:
        self._changed.set()

    async def wait_reconciled(self, version: int, timeout_s: float) -> None:
        async def _wait() -> None:
            async with self._reconciled:
                await self._reconciled.wait_for(lambda: self.reconciled_version >= version)

        await asyncio.wait_for(_wait(), timeout_s)

    async def _reconcile_loop(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            try:
                await self.reconcile()
            except Exception:  # keep following the map; the next change retries
                log.exception(
                    "%s: could not apply cluster map v%d", self.node.cfg.name, self.view.version
                )
                await asyncio.sleep(1.0)
                self._changed.set()

    async def reconcile(self) -> None:
        """Make the hosted groups and known peers match the map (idempotent)."""
        node, view = self.node, self.view
        assert node.host is not None and node.registry is not None and node.engine is not None
        version = view.version
        before = set(node.shards)
        for n in view.nodes.values():
            if n.id != node.id:
                node.registry.learn(Member(n.id, n.name, n.peer_address, n.client_address))
        if view.initialized:
            if self.shard_count != view.shard_count:
                self._persist_shard_count(view.shard_count)
            mine = view.shards_of_node(node.id)
            for sid in sorted(mine):
                if sid not in node.shards:
                    s = mine[sid]
                    first = s.epoch == 1 and node.id in s.voters
                    bootstrap = ConfState.of(list(s.voters), list(s.learners)) if first else None
                    self._persist_hosted(sid, True)
                    node.host_shard(sid, bootstrap)
                    log.info(
                        "%s: hosting shard %d (%s)",
                        node.cfg.name,
                        sid,
                        "initial replica" if first else "new replica, catching up from leader",
                    )
            for sid in sorted(node.shards):
                if sid in view.shards and sid not in mine:
                    log.info("%s: shard %d moved away; dropping its data", node.cfg.name, sid)
                    node.shards.pop(sid, None)
                    await node.host.remove_group(sid)
                    self._persist_hosted(sid, False)
            if set(node.shards) != before:
                # The start line could not say it (the map comes later): one summary line.
                log.info(
                    "%s: hosting %d of %d shard(s) (cluster map v%d)",
                    node.cfg.name,
                    len(node.shards),
                    view.shard_count,
                    version,
                )
        async with self._reconciled:
            self.reconciled_version = version
            self._reconciled.notify_all()

    def _persist_hosted(self, sid: int, hosted: bool) -> None:
        engine = self.node.engine
        assert engine is not None
        b = engine.batch()
        if hosted:
            b.put(CF_RAFT_STATE, _HOSTED + _U64.pack(sid), b"")
        else:
            b.delete(CF_RAFT_STATE, _HOSTED + _U64.pack(sid))
        engine.write(b, sync=True)

    def _persist_shard_count(self, count: int) -> None:
        engine = self.node.engine
        assert engine is not None
        b = engine.batch()
        b.put(CF_RAFT_STATE, _SHARD_COUNT, _U64.pack(count))
        engine.write(b, sync=True)
        self.shard_count = count
