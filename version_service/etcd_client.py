"""Connecting to etcd, and turning its failures into modelfleet errors.

pyetcd (etcd-sdk-python) marks an endpoint failed for 300 s after one UNAVAILABLE, which would
keep a router or worker off etcd for minutes after a short outage; endpoints here retry after
`retry_after` seconds instead.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import grpc
import pyetcd
from pyetcd import exceptions as etcd_exceptions

from modelfleet.config import etcd_endpoints
from modelfleet.errors import FailedPrecondition, Unavailable
from modelfleet.rpc import RECONNECT_OPTIONS

EtcdClient = pyetcd.MultiEndpointEtcd3Client

# etcd's --max-txn-ops default: a transaction holds at most this many operations (and, apart,
# this many compares); more is refused INVALID_ARGUMENT.
MAX_TXN_OPS = 128

# A ranged read of every route at 100k+ tenants is tens of MB: gRPC's 4 MB default is too small.
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 512 << 20), ("grpc.max_send_message_length", 64 << 20),
                    *RECONNECT_OPTIONS]

_UNAVAILABLE = (
    etcd_exceptions.ConnectionFailedError,
    etcd_exceptions.ConnectionTimeoutError,
    etcd_exceptions.NoServerAvailableError,
    etcd_exceptions.InternalServerError,
)


def connect(spec: str, timeout: float = 5.0, retry_after: float = 0.2, user: str | None = None,
            password: str | None = None, credentials: grpc.ChannelCredentials | None = None) -> EtcdClient:
    """A client for the endpoints in spec ('host:port[,host:port]'); connects lazily.

    With `user` the client authenticates at once (etcd auth); with `credentials` it speaks TLS.
    """
    endpoints = [pyetcd.Endpoint(host, port, secure=credentials is not None, creds=credentials,
                                 time_retry=retry_after, opts=_CHANNEL_OPTIONS)
                 for host, port in etcd_endpoints(spec)]
    try:
        client = pyetcd.MultiEndpointEtcd3Client(endpoints=endpoints, timeout=timeout, user=user or None,
                                                 password=password if user else None, failover=True)
    except grpc.RpcError as exc:
        raise _auth_error(spec, exc) from None
    if credentials is None:
        # gRPC refuses call credentials on a plaintext channel; the token also travels as metadata.
        client.call_credentials = None
    return client


def connect_args(args) -> EtcdClient:
    """The one way commands and servers connect: --etcd plus the optional auth and TLS flags."""
    return connect(args.etcd, **etcd_access(args))


def etcd_access(args) -> dict:
    """The optional auth and TLS flags as the keywords `connect` and the etcd watches take."""
    return {"user": getattr(args, "etcd_user", "") or None, "password": getattr(args, "etcd_password", "") or None,
            "credentials": etcd_credentials(args)}


def etcd_credentials(args) -> grpc.ChannelCredentials | None:
    from modelfleet.tls import channel_credentials

    return channel_credentials(getattr(args, "etcd_ca", ""), getattr(args, "etcd_cert", ""),
                               getattr(args, "etcd_key", ""))


def _auth_error(spec: str, exc: grpc.RpcError):
    from modelfleet.errors import PermissionDenied, Unauthenticated

    code = exc.code() if isinstance(exc, grpc.Call) else None
    detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDenied(f"etcd at {spec} refused: {detail}")
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
        return Unauthenticated(f"etcd at {spec} did not accept the credentials: {detail}")
    return Unavailable(f"etcd at {spec} unavailable: {detail}")


def describe(client: EtcdClient) -> str:
    return ",".join(client.endpoints)


@contextlib.contextmanager
def etcd_errors(client: EtcdClient, doing: str) -> Iterator[None]:
    """Maps an unreachable etcd to Unavailable('etcd at ... unavailable while <doing>')."""
    try:
        yield
    except _UNAVAILABLE as exc:
        raise Unavailable(f"etcd at {describe(client)} unavailable while {doing}: {exc}") from exc
    except ValueError as exc:  # pyetcd: "Trying to use a failed node"
        raise Unavailable(f"etcd at {describe(client)} unavailable while {doing}: {exc}") from exc
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        if code == grpc.StatusCode.INVALID_ARGUMENT and "authentication failed" not in (exc.details() or ""):
            # etcd's own word for a request it will not take (a duplicate key in a transaction,
            # too many operations): a bug to report, not a credentials problem to chase
            raise FailedPrecondition(f"etcd at {describe(client)} refused {doing}: {exc.details()}") from None
        if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
                    grpc.StatusCode.INVALID_ARGUMENT):
            raise _auth_error(describe(client), exc) from None
        raise Unavailable(f"etcd at {describe(client)} failed while {doing}: {exc.code().name}") from exc
