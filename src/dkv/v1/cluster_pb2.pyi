from dkv.v1 import admin_pb2 as _admin_pb2
from dkv.v1 import membership_pb2 as _membership_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClusterStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeReport(_message.Message):
    __slots__ = ("node_id", "status", "error")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    node_id: int
    status: _admin_pb2.StatusResponse
    error: str
    def __init__(self, node_id: _Optional[int] = ..., status: _Optional[_Union[_admin_pb2.StatusResponse, _Mapping]] = ..., error: _Optional[str] = ...) -> None: ...

class ClusterStatusResponse(_message.Message):
    __slots__ = ("map", "map_age_ms", "nodes")
    MAP_FIELD_NUMBER: _ClassVar[int]
    MAP_AGE_MS_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    map: _membership_pb2.ClusterMap
    map_age_ms: int
    nodes: _containers.RepeatedCompositeFieldContainer[NodeReport]
    def __init__(self, map: _Optional[_Union[_membership_pb2.ClusterMap, _Mapping]] = ..., map_age_ms: _Optional[int] = ..., nodes: _Optional[_Iterable[_Union[NodeReport, _Mapping]]] = ...) -> None: ...
