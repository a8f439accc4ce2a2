from modelfleet.v1 import predictor_pb2 as _predictor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PredictFrames(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[PredictFrame]
    def __init__(self, frames: _Optional[_Iterable[_Union[PredictFrame, _Mapping]]] = ...) -> None: ...

class PredictOutcomes(_message.Message):
    __slots__ = ("outcomes",)
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    outcomes: _containers.RepeatedCompositeFieldContainer[PredictOutcome]
    def __init__(self, outcomes: _Optional[_Iterable[_Union[PredictOutcome, _Mapping]]] = ...) -> None: ...

class PredictFrame(_message.Message):
    __slots__ = ("id", "request", "timeout_ms", "metadata", "cancel")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    id: int
    request: _predictor_pb2.PredictRequest
    timeout_ms: float
    metadata: _containers.ScalarMap[str, str]
    cancel: bool
    def __init__(self, id: _Optional[int] = ..., request: _Optional[_Union[_predictor_pb2.PredictRequest, _Mapping]] = ..., timeout_ms: _Optional[float] = ..., metadata: _Optional[_Mapping[str, str]] = ..., cancel: _Optional[bool] = ...) -> None: ...

class PredictOutcome(_message.Message):
    __slots__ = ("id", "response", "code", "details", "trailing_metadata")
    class TrailingMetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    TRAILING_METADATA_FIELD_NUMBER: _ClassVar[int]
    id: int
    response: _predictor_pb2.PredictResponse
    code: int
    details: str
    trailing_metadata: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[int] = ..., response: _Optional[_Union[_predictor_pb2.PredictResponse, _Mapping]] = ..., code: _Optional[int] = ..., details: _Optional[str] = ..., trailing_metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class WarmRequest(_message.Message):
    __slots__ = ("tenant_id", "version", "artifact_sha256")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_SHA256_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    version: str
    artifact_sha256: str
    def __init__(self, tenant_id: _Optional[str] = ..., version: _Optional[str] = ..., artifact_sha256: _Optional[str] = ...) -> None: ...

class WarmResponse(_message.Message):
    __slots__ = ("loaded", "load_ms")
    LOADED_FIELD_NUMBER: _ClassVar[int]
    LOAD_MS_FIELD_NUMBER: _ClassVar[int]
    loaded: bool
    load_ms: float
    def __init__(self, loaded: _Optional[bool] = ..., load_ms: _Optional[float] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("include_models", "active_within_s")
    INCLUDE_MODELS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_WITHIN_S_FIELD_NUMBER: _ClassVar[int]
    include_models: bool
    active_within_s: float
    def __init__(self, include_models: _Optional[bool] = ..., active_within_s: _Optional[float] = ...) -> None: ...

class ModelStats(_message.Message):
    __slots__ = ("tenant_id", "version", "bytes", "loads", "idle_s")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    LOADS_FIELD_NUMBER: _ClassVar[int]
    IDLE_S_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    version: str
    bytes: int
    loads: int
    idle_s: float
    def __init__(self, tenant_id: _Optional[str] = ..., version: _Optional[str] = ..., bytes: _Optional[int] = ..., loads: _Optional[int] = ..., idle_s: _Optional[float] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("worker_id", "bytes_used", "bytes_budget", "models_loaded", "loads_total", "load_failures_total", "evictions_total", "hits_total", "misses_total", "predictions_total", "models", "shed_total", "negative_cache_hits_total", "artifact_mismatches_total", "admission_rejections_total", "requests_total")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    BYTES_BUDGET_FIELD_NUMBER: _ClassVar[int]
    MODELS_LOADED_FIELD_NUMBER: _ClassVar[int]
    LOADS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    LOAD_FAILURES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    HITS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MISSES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    SHED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_CACHE_HITS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_MISMATCHES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ADMISSION_REJECTIONS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    bytes_used: int
    bytes_budget: int
    models_loaded: int
    loads_total: int
    load_failures_total: int
    evictions_total: int
    hits_total: int
    misses_total: int
    predictions_total: int
    models: _containers.RepeatedCompositeFieldContainer[ModelStats]
    shed_total: int
    negative_cache_hits_total: int
    artifact_mismatches_total: int
    admission_rejections_total: int
    requests_total: int
    def __init__(self, worker_id: _Optional[str] = ..., bytes_used: _Optional[int] = ..., bytes_budget: _Optional[int] = ..., models_loaded: _Optional[int] = ..., loads_total: _Optional[int] = ..., load_failures_total: _Optional[int] = ..., evictions_total: _Optional[int] = ..., hits_total: _Optional[int] = ..., misses_total: _Optional[int] = ..., predictions_total: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ModelStats, _Mapping]]] = ..., shed_total: _Optional[int] = ..., negative_cache_hits_total: _Optional[int] = ..., artifact_mismatches_total: _Optional[int] = ..., admission_rejections_total: _Optional[int] = ..., requests_total: _Optional[int] = ...) -> None: ...
