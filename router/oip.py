"""The Open Inference Protocol (KServe V2, `inference.GRPCInferenceService`) on the router.

A thin translator in front of the Predictor servicer, nothing more: a V2 request becomes a
`PredictRequest` (model_name = tenant id, model_version = version, empty = the serving one), goes
down the very same route -> shard -> forward path (rollouts, failover, deadlines, errors), and the
`PredictResponse` becomes a V2 response.

ModelInfer reads nothing from etcd, so it serves through an etcd outage as Predict does: the
input's row width travels with the request (`features_per_row`) and the worker that holds the
model refuses a width its model does not take; the output's shape follows from the answer
(values / rows). Only ModelMetadata and ModelReady for a version the route does not name read a
version record: from etcd each time (control-plane calls, so a version gc removed is NOT_FOUND at
once), and while etcd is unreachable the last one read (a version name means the same artifact
while gc's tombstone of it lasts, --tombstone-days: the registry reuses a name only after that).

The tensor contract:
- exactly one input, FP64 (or FP32), shape [rows, num_features] (or [num_features]: one row), as
  typed contents (fp64_contents / fp32_contents) or as raw little-endian `raw_input_contents`;
- one output, `predict`, FP64, shape [rows] (multiclass: [rows, num_classes]), raw when the
  request was raw, typed otherwise.
Anything else is INVALID_ARGUMENT; an unknown model or version is NOT_FOUND.

A large input is decoded and converted in a thread, not on the event loop (see OFFLOAD_VALUES):
500k rows x 5 features took 0.15-0.25 s of Python (a list of 2.5M floats, then the repeated
field), during which every other caller of the router waited. Measured on 2 cores, small Predicts
through the router while such ModelInfers ran: slowest 0.42-0.49 s before, 0.10-0.20 s after
(p99 0.31-0.45 s before, 0.09-0.13 s after). What stays on the loop is gRPC's: parsing the
20 MB request and serialising it to the worker (the loop's longest stall in-process: 40-50 ms,
against 0.2-0.28 s with the conversion inline); the rest is the two cores' other work (the
worker predicting, the copies) and the GIL passing between the threads.
"""
from __future__ import annotations

import asyncio
import math
from importlib import metadata
from typing import Any, Callable, Iterable

import grpc
import numpy as np
from cachetools import LRUCache

from modelfleet.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from modelfleet.oip import grpc_service_pb2 as pb
from modelfleet.oip import grpc_service_pb2_grpc
from modelfleet.rpc import MAX_PAYLOAD_BYTES, translate_errors
from modelfleet.v1 import predictor_pb2
from router.servicer import PredictorServicer
from version_service.routing_cache import RoutingCache
from version_service.schema import RouteRecord, VersionRecord, validate_id

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
PLATFORM = "lightgbm"
INPUT_NAME = "features"  # what ModelMetadata advertises; ModelInfer accepts any name
OUTPUT_NAME = "predict"
OUTPUT_DATATYPE = "FP64"
# datatype -> (little-endian numpy dtype of raw contents, the InferTensorContents field)
INPUT_DATATYPES = {"FP64": (np.dtype("<f8"), "fp64_contents"), "FP32": (np.dtype("<f4"), "fp32_contents")}
VERSION_CACHE_SIZE = 4096
# What one request may carry to a worker (modelfleet.rpc).
MAX_FEATURE_BYTES = MAX_PAYLOAD_BYTES
# An input of more values than this is decoded and converted in a thread (asyncio.to_thread), in
# chunks of this many. Converting costs ~35-75 ns a value on a 2-core box, so 16k values hold the
# event loop ~0.6-1.2 ms: more than that stalls the router's other callers, less is not worth a
# thread hop (~60 µs on uvloop, ~150 µs on asyncio), which every multi-row Predict would pay.
# The chunks matter as much as the thread: a chunk's tolist() and extend() are one C call each,
# holding the GIL throughout, and only between them does the loop's thread get it back (within
# sys.getswitchinterval()). Chunked is no slower: 2.5M values ~115 ms against ~220 ms at once.
OFFLOAD_VALUES = 16_384

VersionInfo = Callable[[str, str], VersionRecord]
VersionList = Callable[[str], Iterable[Any]]


def _server_version() -> str:
    try:
        return metadata.version("modelfleet")
    except metadata.PackageNotFoundError:
        return "unknown"


class InferenceServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """`predictor` is the router's PredictorServicer; `version_info(tenant, version)` reads a version
    record (blocking, e.g. Registry.version); `versions(tenant)`, optional, lists the registered
    versions (VersionRecords or strings, e.g. Registry.versions) for ModelMetadata; without it the
    versions the route names are reported (also while etcd is unreachable)."""

    def __init__(self, predictor: PredictorServicer, routes: RoutingCache, version_info: VersionInfo,
                 versions: VersionList | None = None, *, cache_size: int = VERSION_CACHE_SIZE) -> None:
        self.predictor = predictor
        self.routes = routes
        self._version_info = version_info
        self._versions = versions
        self._records: LRUCache = LRUCache(maxsize=cache_size)
        self._server_version = _server_version()

    # -- health and metadata ---------------------------------------------------------------
    @translate_errors
    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext):
        return pb.ServerLiveResponse(live=True)

    @translate_errors
    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext):
        ready = self.routes.resyncs > 0 and bool(self.routes.live_members())
        return pb.ServerReadyResponse(ready=ready)

    @translate_errors
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext):
        return pb.ServerMetadataResponse(name="modelfleet", version=self._server_version, extensions=[])

    @translate_errors
    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext):
        """Ready: the tenant has a route, the version (if one is named) is registered, and there is a
        live worker to answer (what ModelInfer needs; the KServe V2 "ready for inferencing")."""
        tenant = validate_id("tenant id", request.name)
        route = self.routes.route(tenant)
        if route is None or not self.routes.live_members():
            return pb.ModelReadyResponse(ready=False)
        if request.version and request.version not in _named_versions(route):
            try:
                await self._record(tenant, request.version)
            except NotFound:
                return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @translate_errors
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext):
        tenant = request.name
        route = self._route(tenant)
        record = await self._record(tenant, request.version or route.serving)
        versions = _named_versions(route)
        if self._versions is not None:
            try:
                listed = await asyncio.get_running_loop().run_in_executor(None, self._versions, tenant)
                versions = [getattr(v, "version", v) for v in listed]
            except Unavailable:
                pass  # etcd unreachable: the versions the route names
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=tenant, versions=versions, platform=PLATFORM,
            inputs=[tensor(name=INPUT_NAME, datatype="FP64", shape=[-1, record.num_features])],
            outputs=[tensor(name=OUTPUT_NAME, datatype=OUTPUT_DATATYPE, shape=_output_shape(-1, record))])

    # -- inference -------------------------------------------------------------------------
    @translate_errors
    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext):
        tenant = request.model_name
        self._route(tenant)
        raw = len(request.raw_input_contents) > 0
        for output in request.outputs:
            if output.name != OUTPUT_NAME:
                raise InvalidArgument(f"model {tenant!r} has no output {output.name!r}; its one output is "
                                      f"{OUTPUT_NAME!r}")
        if _declared_values(request) > OFFLOAD_VALUES:
            rows, predict = await asyncio.to_thread(_predict_request, request)
        else:
            rows, predict = _predict_request(request)
        answer = await self.predictor.Predict(predict, context)

        predictions = np.asarray(answer.predictions, dtype="<f8")
        if predictions.size == 0 or predictions.size % rows:
            raise FailedPrecondition(f"model {tenant!r} version {answer.model_version!r} answered "
                                     f"{predictions.size} values for {rows} rows")
        classes = predictions.size // rows
        shape = [rows, classes] if classes > 1 else [rows]
        output = pb.ModelInferResponse.InferOutputTensor(name=OUTPUT_NAME, datatype=OUTPUT_DATATYPE, shape=shape)
        response = pb.ModelInferResponse(model_name=tenant, model_version=answer.model_version, id=request.id)
        if raw:
            response.raw_output_contents.append(predictions.tobytes())
        else:
            output.contents.fp64_contents.extend(answer.predictions)
        response.outputs.append(output)
        return response

    # -- internals -------------------------------------------------------------------------
    def _route(self, tenant: str) -> RouteRecord:
        route = self.routes.route(tenant)
        if route is None:
            validate_id("tenant id", tenant)
            raise NotFound(f"unknown model {tenant!r}: no model registered for this tenant")
        return route

    async def _record(self, tenant: str, version: str) -> VersionRecord:
        """The version record, read (blocking, off the event loop); while etcd is unreachable, the
        one last read, if any."""
        key = (tenant, version)
        try:
            record = await asyncio.get_running_loop().run_in_executor(None, self._version_info, tenant, version)
        except NotFound:
            self._records.pop(key, None)
            raise
        except Unavailable:
            if key not in self._records:
                raise
            return self._records[key]
        self._records[key] = record
        return record


def _named_versions(route: RouteRecord) -> list[str]:
    """The versions a route names, each registered while the route names it (registry writes check)."""
    return list(dict.fromkeys(v for v in (route.newest, route.serving, route.canary, route.shadow) if v))


def _output_shape(rows: int, record: VersionRecord) -> list[int]:
    return [rows, record.num_classes] if record.num_classes > 1 else [rows]


def _declared_values(request: pb.ModelInferRequest) -> int:
    """The values its one input's shape declares: what decoding and converting it will cost, read
    in O(1) (taking a raw content's length would copy it: 3 ms for 20 MB). _decode_input refuses
    contents of another size, or a shape that is no shape, before converting anything."""
    if len(request.inputs) != 1:
        return 0
    return math.prod(request.inputs[0].shape)


def _predict_request(request: pb.ModelInferRequest) -> tuple[int, predictor_pb2.PredictRequest]:
    """(rows, the PredictRequest that carries the input down the Predict path), converted in
    chunks of OFFLOAD_VALUES (see there: in a thread, the event loop gets the GIL between them)."""
    rows, features = _decode_input(request)
    predict = predictor_pb2.PredictRequest(tenant_id=request.model_name, version=request.model_version,
                                           features_per_row=features.shape[1])
    flat = features.reshape(-1)
    for start in range(0, flat.size, OFFLOAD_VALUES):
        predict.features.extend(flat[start:start + OFFLOAD_VALUES].tolist())
    return rows, predict


def _decode_input(request: pb.ModelInferRequest) -> tuple[int, np.ndarray]:
    """(rows, float64 array [rows, features]) from the request's one input tensor."""
    if len(request.inputs) != 1:
        raise InvalidArgument(f"expected exactly one input tensor [rows, features], got {len(request.inputs)}")
    tensor = request.inputs[0]
    if tensor.datatype not in INPUT_DATATYPES:
        raise InvalidArgument(f"input {tensor.name!r} has datatype {tensor.datatype!r}; expected FP64 or FP32")
    shape = list(tensor.shape)
    if len(shape) == 1:
        shape = [1, *shape]
    if len(shape) != 2 or any(d < 1 for d in shape):
        raise InvalidArgument(f"input {tensor.name!r} has shape {list(tensor.shape)}; expected [rows, features] "
                              f"(or [features] for one row), every dimension at least 1")
    rows, width = shape
    count = rows * width
    if count * 8 > MAX_FEATURE_BYTES:
        raise ResourceExhausted(f"input {tensor.name!r} of shape {list(tensor.shape)} is {count * 8} bytes as FP64, "
                                f"over the {MAX_FEATURE_BYTES} a request may carry to a worker; send fewer rows "
                                f"per request")
    dtype, field = INPUT_DATATYPES[tensor.datatype]
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise InvalidArgument(f"raw_input_contents has {len(request.raw_input_contents)} entries for one input")
        if tensor.HasField("contents"):
            raise InvalidArgument(f"input {tensor.name!r} has both typed contents and raw_input_contents")
        data = request.raw_input_contents[0]
        if len(data) != count * dtype.itemsize:
            raise InvalidArgument(f"input {tensor.name!r} of shape {list(tensor.shape)} and datatype "
                                  f"{tensor.datatype} needs {count * dtype.itemsize} raw bytes, got {len(data)}")
        values = np.frombuffer(data, dtype=dtype)
    else:
        contents = getattr(tensor.contents, field)
        if len(contents) != count:
            raise InvalidArgument(f"input {tensor.name!r} of shape {list(tensor.shape)} needs {count} values in "
                                  f"{field}, got {len(contents)}")
        values = np.asarray(contents, dtype=dtype)
    return rows, values.astype(np.float64, copy=False).reshape(rows, width)  # FP64 as it came: no copy
