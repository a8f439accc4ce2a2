"""Many gRPC calls at once under one deadline: how the admin tools and a joining worker read
every member of the fleet.

Asked one after another, each down or hung member (SIGSTOP, a dead host) costs its own timeout:
`status` stalled 2 s per hung member, `rollout --status` 5 s per hung router, and a joining
worker's read of what the others serve spent its warm-up budget on them. Asked at once, they cost
the deadline once, and come back as DEADLINE_EXCEEDED (or UNAVAILABLE) by key.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Hashable, Mapping, TypeVar

import grpc

from modelfleet import tls

Key = TypeVar("Key", bound=Hashable)
# Starts one call on a channel with a deadline in seconds: a stub method's `.future(request, timeout=...)`.
StartCall = Callable[[grpc.Channel, float], grpc.Future]


def ask_all(asks: Mapping[Key, tuple[str, StartCall]], timeout: float,
            credentials: grpc.ChannelCredentials | None = None) -> tuple[dict[Key, Any], dict[Key, grpc.RpcError]]:
    """Every {key: (address, call)} started at once with the same deadline, then all awaited:
    (answers, errors) by key; a channel each, closed before this returns."""
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
