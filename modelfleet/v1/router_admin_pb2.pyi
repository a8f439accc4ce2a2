from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ShardRequest(_message.Message):
    __slots__ = ("tenant_id",)
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    def __init__(self, tenant_id: _Optional[str] = ...) -> None: ...

class ShardResponse(_message.Message):
    __slots__ = ("tenant_id", "workers", "shard_size", "serving_version", "revision")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    SHARD_SIZE_FIELD_NUMBER: _ClassVar[int]
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    workers: _containers.RepeatedScalarFieldContainer[str]
    shard_size: int
    serving_version: str
    revision: int
    def __init__(self, tenant_id: _Optional[str] = ..., workers: _Optional[_Iterable[str]] = ..., shard_size: _Optional[int] = ..., serving_version: _Optional[str] = ..., revision: _Optional[int] = ...) -> None: ...

class RouterStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RouterStatusResponse(_message.Message):
    __slots__ = ("revision", "tenants", "workers", "live_workers", "etcd_connected", "seconds_since_change", "resyncs")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    LIVE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    ETCD_CONNECTED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_CHANGE_FIELD_NUMBER: _ClassVar[int]
    RESYNCS_FIELD_NUMBER: _ClassVar[int]
    revision: int
    tenants: int
    workers: int
    live_workers: int
    etcd_connected: bool
    seconds_since_change: float
    resyncs: int
    def __init__(self, revision: _Optional[int] = ..., tenants: _Optional[int] = ..., workers: _Optional[int] = ..., live_workers: _Optional[int] = ..., etcd_connected: _Optional[bool] = ..., seconds_since_change: _Optional[float] = ..., resyncs: _Optional[int] = ...) -> None: ...
