"""Stock tritonclient against a modelfleet router: run as its own process by tests/test_oip.py.

tritonclient registers its own `grpc_service.proto` (package `inference`) in protobuf's default
descriptor pool, as modelfleet.oip does, so the two cannot be imported into one process: this
script never imports modelfleet. It uses `tritonclient.grpc.InferenceServerClient` unchanged.

    python tests/tritonclient_check.py SPEC.json

SPEC: {"url": "127.0.0.1:PORT",
       "tenants": {"<tenant>": {"version": "v1", "num_features": 8, "num_classes": 1,
                                "rows": [[...], ...], "expected": [...]}},
       "descriptor": {"<message full name>": [[field, number, type, repeated, message type], ...]}}
Exit 0 and a last line "tritonclient ok" when everything matched; otherwise a traceback.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException


def descriptor_fields(module) -> dict[str, list[list]]:
    """{message full name: sorted [name, number, type, repeated, message type]} for every message."""
    out: dict[str, list[list]] = {}

    def walk(message) -> None:
        out[message.full_name] = sorted([f.name, f.number, f.type, f.is_repeated,
                                         f.message_type.full_name if f.message_type else ""] for f in message.fields)
        for nested in message.nested_types:
            walk(nested)

    for message in module.DESCRIPTOR.message_types_by_name.values():
        walk(message)
    return out


def check_descriptor(ours: dict[str, list[list]]) -> None:
    """Every message of modelfleet's proto has exactly tritonclient's fields, numbers and types."""
    theirs = descriptor_fields(service_pb2)
    for name, fields in ours.items():
        assert name in theirs, f"tritonclient has no message {name}"
        assert theirs[name] == fields, f"{name} differs:\n tritonclient {theirs[name]}\n modelfleet   {fields}"


def expect_error(call, code: str) -> InferenceServerException:
    try:
        call()
    except InferenceServerException as exc:
        assert exc.status() == f"StatusCode.{code}", (exc.status(), exc.message())
        return exc
    raise AssertionError(f"expected {code}")


def main(spec_path: str) -> int:
    with open(spec_path) as fh:
        spec = json.load(fh)
    check_descriptor(spec["descriptor"])

    client = grpcclient.InferenceServerClient(url=spec["url"])
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.get_server_metadata().name == "modelfleet"
    assert not client.is_model_ready("no-such-tenant")
    for tenant, case in spec["tenants"].items():
        assert client.is_model_ready(tenant)
        assert client.is_model_ready(tenant, case["version"])
        assert not client.is_model_ready(tenant, "v999")

        metadata = client.get_model_metadata(tenant)
        assert metadata.name == tenant and case["version"] in metadata.versions
        assert [(t.datatype, list(t.shape)) for t in metadata.inputs] == [("FP64", [-1, case["num_features"]])]
        classes = case["num_classes"]
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
            ("predict", "FP64", [-1, classes] if classes > 1 else [-1])]

        rows = np.array(case["rows"], dtype=np.float64)
        expected = np.array(case["expected"], dtype=np.float64)
        for batch in (rows[:1], rows):
            tensor = grpcclient.InferInput(metadata.inputs[0].name, list(batch.shape), "FP64")
            tensor.set_data_from_numpy(batch)
            for outputs in (None, [grpcclient.InferRequestedOutput("predict")]):
                result = client.infer(tenant, [tensor], model_version=case["version"], request_id="req-7",
                                      outputs=outputs)
                got = result.as_numpy("predict")
                want = expected[:len(batch)]
                assert got.dtype == np.float64 and got.shape == want.shape, (got.shape, want.shape)
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
                response = result.get_response()
                assert (response.model_name, response.model_version, response.id) == (tenant, case["version"], "req-7")
        serving = client.infer(tenant, [tensor]).get_response().model_version
        assert serving == case["version"], serving

    tensor = grpcclient.InferInput("features", [1, 8], "FP64")
    tensor.set_data_from_numpy(np.zeros((1, 8)))
    expect_error(lambda: client.infer("no-such-tenant", [tensor]), "NOT_FOUND")
    wrong = grpcclient.InferInput("features", [1, 3], "FP64")
    wrong.set_data_from_numpy(np.zeros((1, 3)))
    expect_error(lambda: client.infer(next(iter(spec["tenants"])), [wrong]), "INVALID_ARGUMENT")
    client.close()
    print("tritonclient ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
