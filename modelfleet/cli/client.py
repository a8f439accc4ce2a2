"""`modelfleet predict`: one Predict through a router, for people and scripts."""
from __future__ import annotations

import argparse
import json

import grpc

from modelfleet.errors import InvalidArgument
from modelfleet.v1 import predictor_pb2, predictor_pb2_grpc


def parse_features(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise InvalidArgument(f"--features must be comma-separated numbers: {exc}") from None


def predict(args: argparse.Namespace) -> int:
    request = predictor_pb2.PredictRequest(tenant_id=args.tenant, features=parse_features(args.features),
                                           version=args.version)
    with grpc.insecure_channel(args.router) as channel:
        response = predictor_pb2_grpc.PredictorStub(channel).Predict(request, timeout=args.timeout)
    print(json.dumps({"tenant": args.tenant, "model_version": response.model_version,
                      "worker_id": response.worker_id, "predictions": list(response.predictions)}))
    return 0
