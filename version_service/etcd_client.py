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
from modelfleet.errors import Unavailable

EtcdClient = pyetcd.MultiEndpointEtcd3Client

# A ranged read of every route at 100k+ tenants is tens of MB: gRPC's 4 MB default is too small.
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 512 << 20), ("grpc.max_send_message_length", 64 << 20)]

_UNAVAILABLE = (
    etcd_exceptions.ConnectionFailedError,
    etcd_exceptions.ConnectionTimeoutError,
    etcd_exceptions.NoServerAvailableError,
    etcd_exceptions.InternalServerError,
)


def connect(spec: str, timeout: float = 5.0, retry_after: float = 0.2, user: str | None = None,
            password: str | None = None) -> EtcdClient:
    """A client for the endpoints in spec ('host:port[,host:port]'); connects lazily."""
    endpoints = [pyetcd.Endpoint(host, port, secure=False, time_retry=retry_after, opts=_CHANNEL_OPTIONS)
                 for host, port in etcd_endpoints(spec)]
    return pyetcd.MultiEndpointEtcd3Client(endpoints=endpoints, timeout=timeout, user=user,
                                           password=password, failover=True)


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
        raise Unavailable(f"etcd at {describe(client)} failed while {doing}: {exc.code().name}") from exc
