from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_STATE_UNSPECIFIED: _ClassVar[NodeState]
    NODE_STATE_UP: _ClassVar[NodeState]
    NODE_STATE_DOWN: _ClassVar[NodeState]
    NODE_STATE_LEAVING: _ClassVar[NodeState]
NODE_STATE_UNSPECIFIED: NodeState
NODE_STATE_UP: NodeState
NODE_STATE_DOWN: NodeState
NODE_STATE_LEAVING: NodeState

class Node(_message.Message):
    __slots__ = ("id", "name", "peer_address", "client_address", "labels", "zone", "state", "last_heartbeat_unix_ms")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PEER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    id: int
    name: str
    peer_address: str
    client_address: str
    labels: _containers.ScalarMap[str, str]
    zone: str
    state: NodeState
    last_heartbeat_unix_ms: int
    def __init__(self, id: _Optional[int] = ..., name: _Optional[str] = ..., peer_address: _Optional[str] = ..., client_address: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., zone: _Optional[str] = ..., state: _Optional[_Union[NodeState, str]] = ..., last_heartbeat_unix_ms: _Optional[int] = ...) -> None: ...

class Shard(_message.Message):
    __slots__ = ("id", "epoch", "voters", "learners")
    ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    VOTERS_FIELD_NUMBER: _ClassVar[int]
    LEARNERS_FIELD_NUMBER: _ClassVar[int]
    id: int
    epoch: int
    voters: _containers.RepeatedScalarFieldContainer[int]
    learners: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, id: _Optional[int] = ..., epoch: _Optional[int] = ..., voters: _Optional[_Iterable[int]] = ..., learners: _Optional[_Iterable[int]] = ...) -> None: ...

class SlotRange(_message.Message):
    __slots__ = ("start", "end", "shard_id")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    shard_id: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ..., shard_id: _Optional[int] = ...) -> None: ...

class LeaderEntry(_message.Message):
    __slots__ = ("shard_id", "leader_id", "term")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    leader_id: int
    term: int
    def __init__(self, shard_id: _Optional[int] = ..., leader_id: _Optional[int] = ..., term: _Optional[int] = ...) -> None: ...

class ClusterMap(_message.Message):
    __slots__ = ("version", "nodes", "shards", "slot_ranges", "leaders", "retired_node_ids")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    SLOT_RANGES_FIELD_NUMBER: _ClassVar[int]
    LEADERS_FIELD_NUMBER: _ClassVar[int]
    RETIRED_NODE_IDS_FIELD_NUMBER: _ClassVar[int]
    version: int
    nodes: _containers.RepeatedCompositeFieldContainer[Node]
    shards: _containers.RepeatedCompositeFieldContainer[Shard]
    slot_ranges: _containers.RepeatedCompositeFieldContainer[SlotRange]
    leaders: _containers.RepeatedCompositeFieldContainer[LeaderEntry]
    retired_node_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, version: _Optional[int] = ..., nodes: _Optional[_Iterable[_Union[Node, _Mapping]]] = ..., shards: _Optional[_Iterable[_Union[Shard, _Mapping]]] = ..., slot_ranges: _Optional[_Iterable[_Union[SlotRange, _Mapping]]] = ..., leaders: _Optional[_Iterable[_Union[LeaderEntry, _Mapping]]] = ..., retired_node_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class JoinNodeRequest(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: Node
    def __init__(self, node: _Optional[_Union[Node, _Mapping]] = ...) -> None: ...

class JoinNodeResponse(_message.Message):
    __slots__ = ("node", "version")
    NODE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    node: Node
    version: int
    def __init__(self, node: _Optional[_Union[Node, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class LeaveNodeRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    def __init__(self, node_id: _Optional[int] = ...) -> None: ...

class LeaveNodeResponse(_message.Message):
    __slots__ = ("node", "version")
    NODE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    node: Node
    version: int
    def __init__(self, node: _Optional[_Union[Node, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "leaders")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LEADERS_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    leaders: _containers.RepeatedCompositeFieldContainer[LeaderEntry]
    def __init__(self, node_id: _Optional[int] = ..., leaders: _Optional[_Iterable[_Union[LeaderEntry, _Mapping]]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes", "version")
    NODES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[Node]
    version: int
    def __init__(self, nodes: _Optional[_Iterable[_Union[Node, _Mapping]]] = ..., version: _Optional[int] = ...) -> None: ...

class GetClusterMapRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetClusterMapResponse(_message.Message):
    __slots__ = ("map", "replica_name", "replica_id", "leader_name", "leader_id")
    MAP_FIELD_NUMBER: _ClassVar[int]
    REPLICA_NAME_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    LEADER_NAME_FIELD_NUMBER: _ClassVar[int]
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    map: ClusterMap
    replica_name: str
    replica_id: int
    leader_name: str
    leader_id: int
    def __init__(self, map: _Optional[_Union[ClusterMap, _Mapping]] = ..., replica_name: _Optional[str] = ..., replica_id: _Optional[int] = ..., leader_name: _Optional[str] = ..., leader_id: _Optional[int] = ...) -> None: ...

class WatchClusterMapRequest(_message.Message):
    __slots__ = ("from_version",)
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    from_version: int
    def __init__(self, from_version: _Optional[int] = ...) -> None: ...

class WatchClusterMapResponse(_message.Message):
    __slots__ = ("version", "full", "map", "nodes", "removed_node_ids", "shards", "slot_ranges", "leaders")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    MAP_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    REMOVED_NODE_IDS_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    SLOT_RANGES_FIELD_NUMBER: _ClassVar[int]
    LEADERS_FIELD_NUMBER: _ClassVar[int]
    version: int
    full: bool
    map: ClusterMap
    nodes: _containers.RepeatedCompositeFieldContainer[Node]
    removed_node_ids: _containers.RepeatedScalarFieldContainer[int]
    shards: _containers.RepeatedCompositeFieldContainer[Shard]
    slot_ranges: _containers.RepeatedCompositeFieldContainer[SlotRange]
    leaders: _containers.RepeatedCompositeFieldContainer[LeaderEntry]
    def __init__(self, version: _Optional[int] = ..., full: _Optional[bool] = ..., map: _Optional[_Union[ClusterMap, _Mapping]] = ..., nodes: _Optional[_Iterable[_Union[Node, _Mapping]]] = ..., removed_node_ids: _Optional[_Iterable[int]] = ..., shards: _Optional[_Iterable[_Union[Shard, _Mapping]]] = ..., slot_ranges: _Optional[_Iterable[_Union[SlotRange, _Mapping]]] = ..., leaders: _Optional[_Iterable[_Union[LeaderEntry, _Mapping]]] = ...) -> None: ...

class Replica(_message.Message):
    __slots__ = ("id", "name", "peer_address", "client_address", "is_learner")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PEER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    IS_LEARNER_FIELD_NUMBER: _ClassVar[int]
    id: int
    name: str
    peer_address: str
    client_address: str
    is_learner: bool
    def __init__(self, id: _Optional[int] = ..., name: _Optional[str] = ..., peer_address: _Optional[str] = ..., client_address: _Optional[str] = ..., is_learner: _Optional[bool] = ...) -> None: ...

class AddReplicaRequest(_message.Message):
    __slots__ = ("name", "peer_address")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PEER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    name: str
    peer_address: str
    def __init__(self, name: _Optional[str] = ..., peer_address: _Optional[str] = ...) -> None: ...

class AddReplicaResponse(_message.Message):
    __slots__ = ("replicas",)
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    replicas: _containers.RepeatedCompositeFieldContainer[Replica]
    def __init__(self, replicas: _Optional[_Iterable[_Union[Replica, _Mapping]]] = ...) -> None: ...

class RemoveReplicaRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RemoveReplicaResponse(_message.Message):
    __slots__ = ("replicas",)
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    replicas: _containers.RepeatedCompositeFieldContainer[Replica]
    def __init__(self, replicas: _Optional[_Iterable[_Union[Replica, _Mapping]]] = ...) -> None: ...

class MembershipCommand(_message.Message):
    __slots__ = ("register_node", "heartbeat", "mark_down", "leave", "remove_node", "set_shard_replicas", "report_leader", "init_cluster")
    REGISTER_NODE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    MARK_DOWN_FIELD_NUMBER: _ClassVar[int]
    LEAVE_FIELD_NUMBER: _ClassVar[int]
    REMOVE_NODE_FIELD_NUMBER: _ClassVar[int]
    SET_SHARD_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    REPORT_LEADER_FIELD_NUMBER: _ClassVar[int]
    INIT_CLUSTER_FIELD_NUMBER: _ClassVar[int]
    register_node: RegisterNodeCommand
    heartbeat: HeartbeatCommand
    mark_down: MarkDownCommand
    leave: LeaveCommand
    remove_node: RemoveNodeCommand
    set_shard_replicas: SetShardReplicasCommand
    report_leader: ReportLeaderCommand
    init_cluster: InitClusterCommand
    def __init__(self, register_node: _Optional[_Union[RegisterNodeCommand, _Mapping]] = ..., heartbeat: _Optional[_Union[HeartbeatCommand, _Mapping]] = ..., mark_down: _Optional[_Union[MarkDownCommand, _Mapping]] = ..., leave: _Optional[_Union[LeaveCommand, _Mapping]] = ..., remove_node: _Optional[_Union[RemoveNodeCommand, _Mapping]] = ..., set_shard_replicas: _Optional[_Union[SetShardReplicasCommand, _Mapping]] = ..., report_leader: _Optional[_Union[ReportLeaderCommand, _Mapping]] = ..., init_cluster: _Optional[_Union[InitClusterCommand, _Mapping]] = ...) -> None: ...

class RegisterNodeCommand(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: Node
    def __init__(self, node: _Optional[_Union[Node, _Mapping]] = ...) -> None: ...

class HeartbeatCommand(_message.Message):
    __slots__ = ("node_id", "unix_ms")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    unix_ms: int
    def __init__(self, node_id: _Optional[int] = ..., unix_ms: _Optional[int] = ...) -> None: ...

class MarkDownCommand(_message.Message):
    __slots__ = ("node_id", "last_heartbeat_unix_ms")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    last_heartbeat_unix_ms: int
    def __init__(self, node_id: _Optional[int] = ..., last_heartbeat_unix_ms: _Optional[int] = ...) -> None: ...

class LeaveCommand(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    def __init__(self, node_id: _Optional[int] = ...) -> None: ...

class RemoveNodeCommand(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    def __init__(self, node_id: _Optional[int] = ...) -> None: ...

class SetShardReplicasCommand(_message.Message):
    __slots__ = ("shard_id", "expected_epoch", "voters", "learners")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_EPOCH_FIELD_NUMBER: _ClassVar[int]
    VOTERS_FIELD_NUMBER: _ClassVar[int]
    LEARNERS_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    expected_epoch: int
    voters: _containers.RepeatedScalarFieldContainer[int]
    learners: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, shard_id: _Optional[int] = ..., expected_epoch: _Optional[int] = ..., voters: _Optional[_Iterable[int]] = ..., learners: _Optional[_Iterable[int]] = ...) -> None: ...

class ReportLeaderCommand(_message.Message):
    __slots__ = ("shard_id", "leader_id", "term")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    leader_id: int
    term: int
    def __init__(self, shard_id: _Optional[int] = ..., leader_id: _Optional[int] = ..., term: _Optional[int] = ...) -> None: ...

class InitClusterCommand(_message.Message):
    __slots__ = ("shard_count", "shards")
    SHARD_COUNT_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    shard_count: int
    shards: _containers.RepeatedCompositeFieldContainer[Shard]
    def __init__(self, shard_count: _Optional[int] = ..., shards: _Optional[_Iterable[_Union[Shard, _Mapping]]] = ...) -> None: ...

class MembershipSnapshot(_message.Message):
    __slots__ = ("map", "changes")
    MAP_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    map: ClusterMap
    changes: _containers.RepeatedCompositeFieldContainer[MapChange]
    def __init__(self, map: _Optional[_Union[ClusterMap, _Mapping]] = ..., changes: _Optional[_Iterable[_Union[MapChange, _Mapping]]] = ...) -> None: ...

class MapChange(_message.Message):
    __slots__ = ("version", "node_ids", "shard_ids", "leader_shard_ids", "slots")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_IDS_FIELD_NUMBER: _ClassVar[int]
    SHARD_IDS_FIELD_NUMBER: _ClassVar[int]
    LEADER_SHARD_IDS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    version: int
    node_ids: _containers.RepeatedScalarFieldContainer[int]
    shard_ids: _containers.RepeatedScalarFieldContainer[int]
    leader_shard_ids: _containers.RepeatedScalarFieldContainer[int]
    slots: bool
    def __init__(self, version: _Optional[int] = ..., node_ids: _Optional[_Iterable[int]] = ..., shard_ids: _Optional[_Iterable[int]] = ..., leader_shard_ids: _Optional[_Iterable[int]] = ..., slots: _Optional[bool] = ...) -> None: ...
