from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class RolloutStatusRequest(_message.Message):
    __slots__ = ("tenant_id",)
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    def __init__(self, tenant_id: _Optional[str] = ...) -> None: ...

class RolloutStatusResponse(_message.Message):
    __slots__ = ("tenant_id", "router_id", "serving_version", "canary_version", "canary_percent", "shadow_version", "serving_requests", "canary_requests", "shadow_requests", "shadow_errors", "shadow_dropped", "shadow_max_abs_diff", "shadow_mean_abs_diff", "shadow_latency_ms", "serving_errors", "canary_errors", "rollout_id", "revision")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUTER_ID_FIELD_NUMBER: _ClassVar[int]
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANARY_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANARY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    SHADOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    CANARY_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    SHADOW_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    SHADOW_ERRORS_FIELD_NUMBER: _ClassVar[int]
    SHADOW_DROPPED_FIELD_NUMBER: _ClassVar[int]
    SHADOW_MAX_ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    SHADOW_MEAN_ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    SHADOW_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    SERVING_ERRORS_FIELD_NUMBER: _ClassVar[int]
    CANARY_ERRORS_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    router_id: str
    serving_version: str
    canary_version: str
    canary_percent: float
    shadow_version: str
    serving_requests: int
    canary_requests: int
    shadow_requests: int
    shadow_errors: int
    shadow_dropped: int
    shadow_max_abs_diff: float
    shadow_mean_abs_diff: float
    shadow_latency_ms: _containers.RepeatedScalarFieldContainer[float]
    serving_errors: int
    canary_errors: int
    rollout_id: str
    revision: int
    def __init__(self, tenant_id: _Optional[str] = ..., router_id: _Optional[str] = ..., serving_version: _Optional[str] = ..., canary_version: _Optional[str] = ..., canary_percent: _Optional[float] = ..., shadow_version: _Optional[str] = ..., serving_requests: _Optional[int] = ..., canary_requests: _Optional[int] = ..., shadow_requests: _Optional[int] = ..., shadow_errors: _Optional[int] = ..., shadow_dropped: _Optional[int] = ..., shadow_max_abs_diff: _Optional[float] = ..., shadow_mean_abs_diff: _Optional[float] = ..., shadow_latency_ms: _Optional[_Iterable[float]] = ..., serving_errors: _Optional[int] = ..., canary_errors: _Optional[int] = ..., rollout_id: _Optional[str] = ..., revision: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("revision", "tenants", "workers", "live_workers", "etcd_connected", "seconds_since_change", "resyncs", "router_id")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    LIVE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    ETCD_CONNECTED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_CHANGE_FIELD_NUMBER: _ClassVar[int]
    RESYNCS_FIELD_NUMBER: _ClassVar[int]
    ROUTER_ID_FIELD_NUMBER: _ClassVar[int]
    revision: int
    tenants: int
    workers: int
    live_workers: int
    etcd_connected: bool
    seconds_since_change: float
    resyncs: int
    router_id: str
    def __init__(self, revision: _Optional[int] = ..., tenants: _Optional[int] = ..., workers: _Optional[int] = ..., live_workers: _Optional[int] = ..., etcd_connected: _Optional[bool] = ..., seconds_since_change: _Optional[float] = ..., resyncs: _Optional[int] = ..., router_id: _Optional[str] = ...) -> None: ...
