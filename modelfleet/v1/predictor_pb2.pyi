from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class PredictRequest(_message.Message):
    __slots__ = ("tenant_id", "features", "version", "artifact_sha256", "features_per_row")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_SHA256_FIELD_NUMBER: _ClassVar[int]
    FEATURES_PER_ROW_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    features: _containers.RepeatedScalarFieldContainer[float]
    version: str
    artifact_sha256: str
    features_per_row: int
    def __init__(self, tenant_id: _Optional[str] = ..., features: _Optional[_Iterable[float]] = ..., version: _Optional[str] = ..., artifact_sha256: _Optional[str] = ..., features_per_row: _Optional[int] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("predictions", "model_version", "worker_id")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedScalarFieldContainer[float]
    model_version: str
    worker_id: str
    def __init__(self, predictions: _Optional[_Iterable[float]] = ..., model_version: _Optional[str] = ..., worker_id: _Optional[str] = ...) -> None: ...
