"""Errors that say exactly what went wrong, each bound to the gRPC status a caller sees.

Every layer raises these; the gRPC front ends translate them into a status and message and
the CLI prints the message on one line. Anything else escaping a handler is a bug.
"""
from __future__ import annotations

import grpc


class ModelfleetError(Exception):
    """Base class: `code` is the gRPC status the error maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(ModelfleetError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ModelfleetError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ModelfleetError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ModelfleetError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Conflict(ModelfleetError):
    """A compare-and-swap write lost a race: someone else changed the record first."""

    code = grpc.StatusCode.ABORTED


class Unavailable(ModelfleetError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(ModelfleetError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ModelfleetError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(ModelfleetError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ModelfleetError):
    code = grpc.StatusCode.PERMISSION_DENIED
