"""`modelfleet predict`: one Predict through a router, for people and scripts; and how every
command reaches routers and workers (their TLS, the caller's API key, many asked at once)."""
from __future__ import annotations

import argparse
import contextlib
import json
from typing import Any, Callable, Hashable, Mapping, TypeVar

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


Key = TypeVar("Key", bound=Hashable)
# Starts one call on a channel with a deadline in seconds: a stub method's `.future(request, timeout=...)`.
StartCall = Callable[[grpc.Channel, float], grpc.Future]


def ask_all(args: argparse.Namespace, asks: Mapping[Key, tuple[str, StartCall]],
            timeout: float) -> tuple[dict[Key, Any], dict[Key, grpc.RpcError]]:
    """Every {key: (address, call)} started at once with the same deadline, then all awaited:
    (answers, errors) by key. Members that are down or hung cost `timeout` once, not once each,
    so a fleet with a few hung ones is still read within one deadline (DEADLINE_EXCEEDED for them)."""
    credentials = channel_credentials(args)  # read and checked once, not once per member
    with contextlib.ExitStack() as channels:
        calls = {key: start(channels.enter_context(tls.channel(address, credentials, aio=False)), timeout)
                 for key, (address, start) in asks.items()}
        answers, errors = {}, {}
        for key, call in calls.items():
            try:
                answers[key] = call.result()
            except grpc.RpcError as exc:
                errors[key] = exc
    return answers, errors


def predict(args: argparse.Namespace) -> int:
    request = predictor_pb2.PredictRequest(tenant_id=args.tenant, features=parse_features(args.features),
                                           version=args.version)
    with router_channel(args, args.router) as channel:
        response = predictor_pb2_grpc.PredictorStub(channel).Predict(request, timeout=args.timeout,
                                                                      metadata=call_metadata(args))
    print(json.dumps({"tenant": args.tenant, "model_version": response.model_version,
                      "worker_id": response.worker_id, "predictions": list(response.predictions)}))
    return 0
