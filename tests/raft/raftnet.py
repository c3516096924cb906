"""A tiny lossless network of MemoryHosts for the core's unit tests (no randomness but the
seeded Raft RNG). Scenario files and the simulator have richer networks of their own."""

from __future__ import annotations

import random
from collections.abc import Iterable

from dkv.raft import Config, ConfState, MemoryStorage, Message, Role
from dkv.testing.memhost import MemoryHost


class Net:
    def __init__(self, ids: Iterable[int], learners: Iterable[int] = (), **cfg: object) -> None:
        ids = list(ids)
        learners = list(learners)
        cs = ConfState.of(ids, learners)
        self.rng = random.Random(42)
        self.cfg = cfg
        self.hosts: dict[int, MemoryHost] = {}
        for i in [*ids, *learners]:
            self.add(i, MemoryStorage(cs))
        self.cut: set[int] = set()  # isolated nodes: all their traffic is dropped
        self.dropped: list[Message] = []

    def add(self, nid: int, storage: MemoryStorage | None = None) -> MemoryHost:
        host = MemoryHost(Config(id=nid, **self.cfg), storage or MemoryStorage(), self.rng)  # type: ignore[arg-type]
        self.hosts[nid] = host
        return host

    def __getitem__(self, nid: int) -> MemoryHost:
        return self.hosts[nid]

    def stabilize(self, max_rounds: int = 1000) -> list[Message]:
        """Process readies and deliver messages until nothing moves. Returns all delivered."""
        delivered: list[Message] = []
        for _ in range(max_rounds):
            moved = False
            for h in list(self.hosts.values()):
                if not h.alive:
                    continue
                if h.raw().has_ready():
                    moved = True  # a Ready without messages can still commit (one voter)
                for m in h.process_ready():
                    moved = True
                    dst = self.hosts.get(m.to)
                    if m.frm in self.cut or m.to in self.cut or dst is None or not dst.alive:
                        self.dropped.append(m)
                        continue
                    delivered.append(m)
                    dst.raw().step(m)
            if not moved:
                return delivered
        raise AssertionError("network did not quiesce")

    def tick(self, n: int = 1, only: Iterable[int] | None = None) -> None:
        targets = set(only) if only is not None else set(self.hosts)
        for _ in range(n):
            for nid in sorted(targets):
                if self.hosts[nid].alive:
                    self.hosts[nid].raw().tick()
            self.stabilize()

    def elect(self, nid: int) -> None:
        self.hosts[nid].raw().campaign()
        self.stabilize()
        assert self.role(nid) is Role.LEADER, f"{nid} did not win: {self.roles()}"

    def role(self, nid: int) -> Role:
        return self.hosts[nid].raw().status().role

    def roles(self) -> dict[int, Role]:
        return {i: h.raw().status().role for i, h in self.hosts.items() if h.alive}

    def leaders(self) -> list[int]:
        return [i for i, r in self.roles().items() if r is Role.LEADER]
