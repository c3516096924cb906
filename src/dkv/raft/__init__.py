"""The Raft consensus core: pure, synchronous and deterministic.

No I/O, no clock, no threads, no global randomness (``tests/raft/test_purity.py`` enforces the
imports). A host drives a :class:`RawNode` with ``tick``/``step``/``propose``/... and executes
the :class:`Ready` it returns. See ``docs/raft.md``.
"""

from dkv.raft.config import Config, ReadOnlyOption
from dkv.raft.core import CampaignType, Logger, NullLogger, Raft, RandomSource
from dkv.raft.rawnode import PeerStatus, RawNode, Status
from dkv.raft.storage import MemoryStorage, Storage
from dkv.raft.types import (
    NONE,
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    ReadState,
    Ready,
    Role,
    Snapshot,
    SnapshotChunk,
    SnapshotMetadata,
    SoftState,
)

__all__ = [
    "NONE",
    "CampaignType",
    "Config",
    "ConfChange",
    "ConfChangeType",
    "ConfState",
    "Entry",
    "EntryType",
    "HardState",
    "Logger",
    "MemoryStorage",
    "Message",
    "MessageType",
    "NullLogger",
    "PeerStatus",
    "Raft",
    "RandomSource",
    "RawNode",
    "ReadOnlyOption",
    "ReadState",
    "Ready",
    "Role",
    "Snapshot",
    "SnapshotChunk",
    "SnapshotMetadata",
    "SoftState",
    "Status",
    "Storage",
]
