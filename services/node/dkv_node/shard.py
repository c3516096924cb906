"""A KV shard as the host sees it: the :class:`dkv.host.StateMachine` of one Raft group."""

from __future__ import annotations

from collections.abc import Iterator

from dkv.storage import Batch, Engine
from dkv.v1 import kv_pb2
from dkv_node.kv_state import KvStateMachine
from dkv_node.kv_store import RocksKvStore

__all__ = ["KvShard"]


class KvShard:
    """Binds the KV state machine to the node's RocksDB for one shard (group)."""

    def __init__(self, engine: Engine, shard_id: int, member_id: int) -> None:
        self.store = RocksKvStore(engine, shard_id)
        self.kv = KvStateMachine(self.store, shard_id=shard_id, member_id=member_id)

    def begin(self, batch: Batch) -> None:
        self.store.begin(batch)

    def apply(self, index: int, data: bytes) -> kv_pb2.PutResponse | kv_pb2.DeleteResponse:
        return self.kv.apply(index, data)

    def end(self) -> None:
        self.store.end()

    def snapshot_view(self) -> Iterator[bytes]:
        return self.store.snapshot_view()

    def restore(self, data: bytes) -> None:
        self.store.load(data)
