"""Who the other members are and where to reach them: the node's member registry.

Raft configurations hold member ids only. Addresses come from three places:

- ``--initial-cluster`` (name and peer address of the founding members);
- the context of an applied membership change (``dkvctl member add`` names the new member's
  peer address; every replica learns it when it applies the change);
- the hello a peer sends when it opens its Raft stream (name, peer and client address), which
  also teaches members that caught up by snapshot (and so never saw the change entries) and
  tells followers where the leader's clients connect (for NOT_LEADER answers).

The registry is persisted under the reserved group id 0 of the ``raft_state`` column family,
in the batch that applies the change, so a restarted node reaches members that joined after
``--initial-cluster`` was written.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace

from dkv.storage import CF_RAFT_STATE, Batch, Engine, group_prefix

__all__ = [
    "Member",
    "MemberRegistry",
    "decode_context",
    "encode_context",
    "hello_metadata",
    "member_from_hello",
    "member_id",
]

_PREFIX = group_prefix(0) + b"member/"
_ID = struct.Struct(">Q")


@dataclass(frozen=True)
class Member:
    id: int
    name: str
    peer_address: str
    client_address: str = ""


def member_id(cluster_token: str, name: str) -> int:
    """A member's id: a stable 63-bit hash of the cluster token and its name, as etcd derives
    ids from its token and peer URLs, so every member computes the same ids from the same
    ``--initial-cluster`` without talking to anyone."""
    digest = hashlib.blake2b(f"{cluster_token}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFF_FFFF_FFFF_FFFF or 1


def hello_metadata(member: Member) -> tuple[tuple[str, str], ...]:
    """What a member says about itself when it opens a Raft stream (see the module doc)."""
    return (
        ("dkv-member-id", str(member.id)),
        ("dkv-name", member.name),
        ("dkv-peer-address", member.peer_address),
        ("dkv-client-address", member.client_address),
    )


def member_from_hello(hello: dict[str, str], cluster_token: str) -> Member | None:
    """The member a peer's hello describes, or None when its id is not the one this cluster's
    token gives its name (another cluster, or garbage)."""
    try:
        mid = int(hello.get("dkv-member-id", ""))
    except ValueError:
        return None
    name = hello.get("dkv-name", "")
    if not name or mid != member_id(cluster_token, name):
        return None
    return Member(mid, name, hello.get("dkv-peer-address", ""), hello.get("dkv-client-address", ""))


def encode_context(name: str, peer_address: str) -> bytes:
    """The context of a membership change: enough for every replica to reach the member."""
    return json.dumps({"name": name, "peer_address": peer_address}, sort_keys=True).encode()


def decode_context(member_id: int, context: bytes) -> Member | None:
    if not context:
        return None
    try:
        d = json.loads(context)
        return Member(member_id, str(d["name"]), str(d["peer_address"]))
    except (ValueError, KeyError, TypeError):
        return None  # a change proposed by something else: the address stays unknown


class MemberRegistry:
    """See the module docstring. ``on_peer(id, peer_address)`` is told of every address change
    (the node points its transport there)."""

    def __init__(self, engine: Engine, self_member: Member, on_peer: Callable[[int, str], None]):
        self.engine = engine
        self.self_id = self_member.id
        self._on_peer = on_peer
        self._members: dict[int, Member] = {}
        for key, blob in engine.scan(CF_RAFT_STATE, _PREFIX, _PREFIX + b"\xff"):
            m = Member(**json.loads(blob))
            self._members[_ID.unpack(key[len(_PREFIX) :])[0]] = m
        self._members[self_member.id] = self_member

    def __iter__(self) -> Iterator[Member]:
        return iter(sorted(self._members.values(), key=lambda m: m.name))

    def get(self, member_id: int) -> Member | None:
        return self._members.get(member_id)

    def by_name(self, name: str) -> Member | None:
        return next((m for m in self._members.values() if m.name == name), None)

    def name(self, member_id: int) -> str:
        m = self._members.get(member_id)
        return m.name if m is not None else ""

    def client_address(self, member_id: int) -> str:
        m = self._members.get(member_id)
        return m.client_address if m is not None else ""

    def seed(self, member: Member) -> None:
        """A founding member from ``--initial-cluster`` (not persisted: flags say it again)."""
        known = self._members.get(member.id)
        if known is None:
            self._members[member.id] = member
            self._on_peer(member.id, member.peer_address)
        else:
            self._on_peer(known.id, known.peer_address)

    def learn(self, member: Member, batch: Batch | None = None) -> None:
        """Record what a change context or a peer's hello says, keeping known fields that the
        source does not carry (a change context has no client address)."""
        known = self._members.get(member.id)
        if known is not None:
            member = replace(
                member,
                name=member.name or known.name,
                peer_address=member.peer_address or known.peer_address,
                client_address=member.client_address or known.client_address,
            )
            if member == known:
                return
        self._members[member.id] = member
        if member.id != self.self_id and member.peer_address:
            self._on_peer(member.id, member.peer_address)
        blob = json.dumps(asdict(member), sort_keys=True).encode()
        if batch is not None:
            batch.put(CF_RAFT_STATE, _PREFIX + _ID.pack(member.id), blob)
        else:
            b = self.engine.batch()
            b.put(CF_RAFT_STATE, _PREFIX + _ID.pack(member.id), blob)
            self.engine.write(b, sync=False)  # rediscovered from hellos if lost

    def forget(self, member_id: int, batch: Batch) -> None:
        if member_id == self.self_id:
            return
        self._members.pop(member_id, None)
        batch.delete(CF_RAFT_STATE, _PREFIX + _ID.pack(member_id))
