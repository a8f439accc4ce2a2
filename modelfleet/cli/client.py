"""`modelfleet predict`: one Predict through a router, for people and scripts; and how every
command reaches routers and workers (their TLS, the caller's API key; many at once: modelfleet.fanout)."""
from __future__ import annotations

import argparse
import json

import grpc

from modelfleet import tls
from modelfleet.errors import InvalidArgument
from modelfleet.v1 import predictor_pb2, predictor_pb2_grpc


def parse_features(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise InvalidArgument(f"--features must be comma-separated numbers: {exc}") from None


def call_metadata(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    return (("x-api-key", args.api_key),) if getattr(args, "api_key", "") else ()


def channel_credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """TLS to routers and workers when --tls-ca / --tls-cert are given; None for plaintext."""
    return tls.channel_credentials(getattr(args, "tls_ca", ""), getattr(args, "tls_cert", ""),
                                   getattr(args, "tls_key", ""))


def router_channel(args: argparse.Namespace, address: str):
    """A blocking channel to a router, with TLS when --tls-ca / --tls-cert are given."""
    return tls.channel(address, channel_credentials(args), aio=False)


def predict(args: argparse.Namespace) -> int:
    request = predictor_pb2.PredictRequest(tenant_id=args.tenant, features=parse_features(args.features),
                                           version=args.version)
    with router_channel(args, args.router) as channel:
        response = predictor_pb2_grpc.PredictorStub(channel).Predict(request, timeout=args.timeout,
                                                                      metadata=call_metadata(args))
    print(json.dumps({"tenant": args.tenant, "model_version": response.model_version,
                      "worker_id": response.worker_id, "predictions": list(response.predictions)}))
    return 0
