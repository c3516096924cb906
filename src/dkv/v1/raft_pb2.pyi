from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EntryType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENTRY_TYPE_NORMAL: _ClassVar[EntryType]
    ENTRY_TYPE_CONF_CHANGE: _ClassVar[EntryType]

class MessageType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MESSAGE_TYPE_HUP: _ClassVar[MessageType]
    MESSAGE_TYPE_BEAT: _ClassVar[MessageType]
    MESSAGE_TYPE_PROP: _ClassVar[MessageType]
    MESSAGE_TYPE_APP: _ClassVar[MessageType]
    MESSAGE_TYPE_APP_RESP: _ClassVar[MessageType]
    MESSAGE_TYPE_VOTE: _ClassVar[MessageType]
    MESSAGE_TYPE_VOTE_RESP: _ClassVar[MessageType]
    MESSAGE_TYPE_SNAP: _ClassVar[MessageType]
    MESSAGE_TYPE_HEARTBEAT: _ClassVar[MessageType]
    MESSAGE_TYPE_HEARTBEAT_RESP: _ClassVar[MessageType]
    MESSAGE_TYPE_UNREACHABLE: _ClassVar[MessageType]
    MESSAGE_TYPE_SNAP_STATUS: _ClassVar[MessageType]
    MESSAGE_TYPE_CHECK_QUORUM: _ClassVar[MessageType]
    MESSAGE_TYPE_TRANSFER_LEADER: _ClassVar[MessageType]
    MESSAGE_TYPE_TIMEOUT_NOW: _ClassVar[MessageType]
    MESSAGE_TYPE_READ_INDEX: _ClassVar[MessageType]
    MESSAGE_TYPE_READ_INDEX_RESP: _ClassVar[MessageType]
    MESSAGE_TYPE_PRE_VOTE: _ClassVar[MessageType]
    MESSAGE_TYPE_PRE_VOTE_RESP: _ClassVar[MessageType]
    MESSAGE_TYPE_SNAP_RESP: _ClassVar[MessageType]

class ConfChangeType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONF_CHANGE_TYPE_ADD_NODE: _ClassVar[ConfChangeType]
    CONF_CHANGE_TYPE_ADD_LEARNER: _ClassVar[ConfChangeType]
    CONF_CHANGE_TYPE_REMOVE_NODE: _ClassVar[ConfChangeType]
ENTRY_TYPE_NORMAL: EntryType
ENTRY_TYPE_CONF_CHANGE: EntryType
MESSAGE_TYPE_HUP: MessageType
MESSAGE_TYPE_BEAT: MessageType
MESSAGE_TYPE_PROP: MessageType
MESSAGE_TYPE_APP: MessageType
MESSAGE_TYPE_APP_RESP: MessageType
MESSAGE_TYPE_VOTE: MessageType
MESSAGE_TYPE_VOTE_RESP: MessageType
MESSAGE_TYPE_SNAP: MessageType
MESSAGE_TYPE_HEARTBEAT: MessageType
MESSAGE_TYPE_HEARTBEAT_RESP: MessageType
MESSAGE_TYPE_UNREACHABLE: MessageType
MESSAGE_TYPE_SNAP_STATUS: MessageType
MESSAGE_TYPE_CHECK_QUORUM: MessageType
MESSAGE_TYPE_TRANSFER_LEADER: MessageType
MESSAGE_TYPE_TIMEOUT_NOW: MessageType
MESSAGE_TYPE_READ_INDEX: MessageType
MESSAGE_TYPE_READ_INDEX_RESP: MessageType
MESSAGE_TYPE_PRE_VOTE: MessageType
MESSAGE_TYPE_PRE_VOTE_RESP: MessageType
MESSAGE_TYPE_SNAP_RESP: MessageType
CONF_CHANGE_TYPE_ADD_NODE: ConfChangeType
CONF_CHANGE_TYPE_ADD_LEARNER: ConfChangeType
CONF_CHANGE_TYPE_REMOVE_NODE: ConfChangeType

class Entry(_message.Message):
    __slots__ = ("term", "index", "type", "data")
    TERM_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    term: int
    index: int
    type: EntryType
    data: bytes
    def __init__(self, term: _Optional[int] = ..., index: _Optional[int] = ..., type: _Optional[_Union[EntryType, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Message(_message.Message):
    __slots__ = ("type", "to", "term", "log_term", "index", "entries", "commit", "snapshot", "reject", "reject_hint", "context")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    FROM_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    LOG_TERM_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    REJECT_FIELD_NUMBER: _ClassVar[int]
    REJECT_HINT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    type: MessageType
    to: int
    term: int
    log_term: int
    index: int
    entries: _containers.RepeatedCompositeFieldContainer[Entry]
    commit: int
    snapshot: SnapshotChunk
    reject: bool
    reject_hint: int
    context: bytes
    def __init__(self, type: _Optional[_Union[MessageType, str]] = ..., to: _Optional[int] = ..., term: _Optional[int] = ..., log_term: _Optional[int] = ..., index: _Optional[int] = ..., entries: _Optional[_Iterable[_Union[Entry, _Mapping]]] = ..., commit: _Optional[int] = ..., snapshot: _Optional[_Union[SnapshotChunk, _Mapping]] = ..., reject: _Optional[bool] = ..., reject_hint: _Optional[int] = ..., context: _Optional[bytes] = ..., **kwargs) -> None: ...

class HardState(_message.Message):
    __slots__ = ("term", "vote", "commit")
    TERM_FIELD_NUMBER: _ClassVar[int]
    VOTE_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    term: int
    vote: int
    commit: int
    def __init__(self, term: _Optional[int] = ..., vote: _Optional[int] = ..., commit: _Optional[int] = ...) -> None: ...

class ConfState(_message.Message):
    __slots__ = ("voters", "learners")
    VOTERS_FIELD_NUMBER: _ClassVar[int]
    LEARNERS_FIELD_NUMBER: _ClassVar[int]
    voters: _containers.RepeatedScalarFieldContainer[int]
    learners: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, voters: _Optional[_Iterable[int]] = ..., learners: _Optional[_Iterable[int]] = ...) -> None: ...

class SnapshotMetadata(_message.Message):
    __slots__ = ("index", "term", "conf_state")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    CONF_STATE_FIELD_NUMBER: _ClassVar[int]
    index: int
    term: int
    conf_state: ConfState
    def __init__(self, index: _Optional[int] = ..., term: _Optional[int] = ..., conf_state: _Optional[_Union[ConfState, _Mapping]] = ...) -> None: ...

class SnapshotChunk(_message.Message):
    __slots__ = ("metadata", "offset", "data", "done", "total_bytes")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    metadata: SnapshotMetadata
    offset: int
    data: bytes
    done: bool
    total_bytes: int
    def __init__(self, metadata: _Optional[_Union[SnapshotMetadata, _Mapping]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., done: _Optional[bool] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class ConfChange(_message.Message):
    __slots__ = ("type", "node_id", "context")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    type: ConfChangeType
    node_id: int
    context: bytes
    def __init__(self, type: _Optional[_Union[ConfChangeType, str]] = ..., node_id: _Optional[int] = ..., context: _Optional[bytes] = ...) -> None: ...

class MessageBatch(_message.Message):
    __slots__ = ("messages", "from_node", "group_ids", "cluster_id")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    FROM_NODE_FIELD_NUMBER: _ClassVar[int]
    GROUP_IDS_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[Message]
    from_node: int
    group_ids: _containers.RepeatedScalarFieldContainer[int]
    cluster_id: str
    def __init__(self, messages: _Optional[_Iterable[_Union[Message, _Mapping]]] = ..., from_node: _Optional[int] = ..., group_ids: _Optional[_Iterable[int]] = ..., cluster_id: _Optional[str] = ...) -> None: ...

class PeerHello(_message.Message):
    __slots__ = ("cluster_id", "from_node", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_NODE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    cluster_id: str
    from_node: int
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, cluster_id: _Optional[str] = ..., from_node: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class StreamAck(_message.Message):
    __slots__ = ("batches",)
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    batches: int
    def __init__(self, batches: _Optional[int] = ...) -> None: ...

class PeerRefusal(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...
