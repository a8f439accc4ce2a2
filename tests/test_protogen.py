"""The committed stubs in modelfleet/v1 must be exactly what `make proto` generates from proto/."""
from __future__ import annotations

from modelfleet import protogen


def test_generated_stubs_match_the_proto_files(tmp_path):
    written = protogen.generate(tmp_path)
    assert written, "protoc generated nothing"
    committed_dir = protogen.REPO_ROOT
    for path in written:
        rel = path.relative_to(tmp_path)
        committed = committed_dir / rel
        assert committed.exists(), f"{rel} is generated but not committed: run `make proto`"
        assert committed.read_text() == path.read_text(), f"{rel} drifted from proto/: run `make proto`"
    generated = {p.relative_to(tmp_path) for p in written}
    stale = {p.relative_to(committed_dir) for p in (committed_dir / "modelfleet" / "v1").glob("*_pb2*.py*")}
    assert stale <= generated, f"stubs without a .proto: {stale - generated}"


def test_public_contract_names_and_numbers():
    from modelfleet.v1 import predictor_pb2

    req = predictor_pb2.PredictRequest.DESCRIPTOR
    resp = predictor_pb2.PredictResponse.DESCRIPTOR
    assert req.full_name == "modelfleet.v1.PredictRequest"
    assert {f.name: f.number for f in req.fields} == {"tenant_id": 1, "features": 2, "version": 3, "artifact_sha256": 4,
                                                       "features_per_row": 5}
    assert {f.name: f.number for f in resp.fields} == {"predictions": 1, "model_version": 2, "worker_id": 3}
    service = predictor_pb2.DESCRIPTOR.services_by_name["Predictor"]
    assert service.full_name == "modelfleet.v1.Predictor" and "Predict" in service.methods_by_name
