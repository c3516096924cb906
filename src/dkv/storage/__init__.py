"""Durable storage: one RocksDB per process (rocksdict), shared by every Raft group.

:class:`Engine` owns the database and its column families (a :class:`ReadView` reads some of
them as of one moment); :class:`RocksRaftStorage` is one group's Raft log and state on top of
it, implementing :class:`dkv.raft.Storage`.
"""

from dkv.storage.engine import (
    CF_DATA,
    CF_RAFT_LOG,
    CF_RAFT_STATE,
    CF_WATCH,
    COLUMN_FAMILIES,
    Batch,
    Engine,
    Identity,
    ReadView,
)
from dkv.storage.raft_log import RocksRaftStorage, group_prefix

__all__ = [
    "CF_DATA",
    "CF_RAFT_LOG",
    "CF_RAFT_STATE",
    "CF_WATCH",
    "COLUMN_FAMILIES",
    "Batch",
    "Engine",
    "Identity",
    "ReadView",
    "RocksRaftStorage",
    "group_prefix",
]
