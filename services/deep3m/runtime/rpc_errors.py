"""gRPC errors back into domain errors, on the calling side.

The server's interceptor turns a ``Deep3mError`` into a status with an
``ErrorDetail``; ``from_rpc_error`` reverses that, so callers catch the same
exception classes whether they call a module directly or over the network.
"""

from __future__ import annotations

import grpc

from deep3m.core.errors import (
    AlreadyExistsError,
    CancelledError,
    Deep3mError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from deep3m.runtime.interceptor import error_detail
from deep3m.v1 import common_pb2

_BY_CODE: dict[grpc.StatusCode, type[Deep3mError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: UnavailableError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
}


def status_code(err: grpc.RpcError) -> grpc.StatusCode:
    code = err.code() if isinstance(err, grpc.Call) else None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def from_rpc_error(err: grpc.RpcError, *, address: str = "") -> Deep3mError:
    """The domain error matching ``err``'s status, with the server's message and field."""
    code = status_code(err)
    detail = None
    try:
        detail = error_detail(err)
    except Exception:  # a status without (valid) details: fall back to the plain message
        detail = None
    details = err.details() if isinstance(err, grpc.Call) else ""
    message = detail.message if detail is not None and detail.message else str(details or code)
    field = detail.field if detail is not None else ""
    cls = _BY_CODE.get(code, Deep3mError)
    if (
        code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        and address
        and not field
    ):
        message = f"{address}: {message}"
        field = "address"
    return cls(message, field=field)


def from_error_detail(detail: common_pb2.ErrorDetail) -> Deep3mError:
    """The domain error an ``ErrorDetail`` names (one item of a batch reply)."""
    code = grpc.StatusCode.__members__.get(detail.code, grpc.StatusCode.UNKNOWN)
    return _BY_CODE.get(code, Deep3mError)(detail.message or detail.code, field=detail.field)
