"""One place that maps domain errors to gRPC status codes.

Servicers raise ``Deep3mError`` subclasses; this interceptor turns them into a
status with the message (and a rich ``ErrorDetail`` naming the field). A call
to a downstream service that failed as UNAVAILABLE or DEADLINE_EXCEEDED becomes
UNAVAILABLE (worth retrying). Anything else becomes INTERNAL with a generic
message; the traceback goes to the log. A servicer that aborts the context
itself keeps its status. Every request is first held to the limits of
``deep3m.runtime.limits`` (string lengths, list sizes, finite numbers).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, status_pb2
from grpc_status import rpc_status

from deep3m.core.errors import (
    Deep3mError,
    InvalidArgumentError,
    UnavailableError,
    storage_access_error,
)
from deep3m.runtime.limits import check_request
from deep3m.runtime.metrics import RPC_ERRORS

log = logging.getLogger("deep3m.rpc")

INTERNAL_MESSAGE = "internal error; see the server log"
_DEPENDENCY_DOWN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _status_for(exc: Deep3mError) -> status_pb2.Status:
    from deep3m.v1 import common_pb2

    code = getattr(code_pb2, exc.grpc_code_name, code_pb2.INTERNAL)
    detail = any_pb2.Any()
    detail.Pack(
        common_pb2.ErrorDetail(code=exc.grpc_code_name, message=exc.message, field=exc.field)
    )
    return status_pb2.Status(code=code, message=exc.message, details=[detail])


def _as_domain_error(exc: BaseException) -> Deep3mError | None:
    if isinstance(exc, Deep3mError):
        return exc
    access = storage_access_error(exc)
    if access is not None:
        return access
    if (
        isinstance(exc, grpc.RpcError)
        and isinstance(exc, grpc.Call)
        and exc.code() in _DEPENDENCY_DOWN
    ):
        return UnavailableError(f"a service this call depends on failed: {exc.details()}")
    return None


def abort_with(context: grpc.ServicerContext, exc: BaseException, method: str) -> None:
    """Abort the RPC with the status for ``exc``; always raises."""
    domain = _as_domain_error(exc)
    if domain is not None:
        RPC_ERRORS.labels(code=domain.grpc_code_name).inc()
        log.info(
            "rpc error",
            extra={
                "method": method,
                "code": domain.grpc_code_name,
                "error": domain.message,
                "field": domain.field,
            },
        )
        context.abort_with_status(rpc_status.to_status(_status_for(domain)))
    RPC_ERRORS.labels(code="INTERNAL").inc()
    log.error("internal error in %s", method, exc_info=exc, extra={"method": method})
    context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)


def error_detail(err: grpc.RpcError) -> Any:
    """The ``ErrorDetail`` a deep3m server attached to ``err``, or None."""
    from deep3m.v1 import common_pb2

    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(common_pb2.ErrorDetail.DESCRIPTOR):
            out = common_pb2.ErrorDetail()
            detail.Unpack(out)
            return out
    return None


def _already_aborted(context: grpc.ServicerContext) -> bool:
    # context.abort() raises a bare Exception after recording the status, so the
    # recorded code is the only way to tell an abort from a failure.
    code = context.code()  # type: ignore[attr-defined]
    return code is not None and code != grpc.StatusCode.OK


class _Undecodable:
    """A request whose bytes do not parse: refused as INVALID_ARGUMENT, not INTERNAL."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # gRPC would answer INTERNAL
            return _Undecodable(exc)

    return parse


def _check(request: Any) -> None:
    if isinstance(request, _Undecodable):
        raise InvalidArgumentError(
            f"the request is not a valid message of its type: {request.error}"[:200],
            field="request",
        )
    check_request(request)


Wrap = Callable[[Callable[..., Any]], Callable[..., Any]]


def rewrap_handler(
    handler: grpc.RpcMethodHandler,
    unary: Wrap,
    stream: Wrap,
    *,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour wrapped: ``unary`` for single replies, ``stream``
    for streamed ones (the server interceptors' one way to decorate a method)."""
    kwargs = {
        "request_deserializer": request_deserializer or handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream), **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **kwargs)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(stream(handler.stream_stream), **kwargs)
    return handler


class ErrorMappingInterceptor(grpc.ServerInterceptor):
    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        def wrap_unary(fn: Callable[..., Any]) -> Callable[..., Any]:
            def call(request: Any, context: grpc.ServicerContext) -> Any:
                try:
                    _check(request)
                    return fn(request, context)
                except Exception as exc:  # the one place errors become statuses
                    if _already_aborted(context):
                        raise
                    abort_with(context, exc, method)
                    raise  # unreachable: abort raises

            return call

        def wrap_stream(fn: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
            def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                try:
                    _check(request)
                    yield from fn(request, context)
                except Exception as exc:
                    if _already_aborted(context):
                        raise
                    abort_with(context, exc, method)
                    raise

            return call

        return rewrap_handler(
            handler,
            wrap_unary,
            wrap_stream,
            request_deserializer=_tolerant(handler.request_deserializer),
        )
