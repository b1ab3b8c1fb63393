"""One place that maps domain errors to gRPC status codes.

Servicers raise ``Deep3mError`` subclasses; this interceptor turns them into a
status with the message (and a rich ``ErrorDetail`` naming the field). Anything
else becomes INTERNAL with a generic message; the traceback goes to the log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, status_pb2
from grpc_status import rpc_status

from deep3m.core.errors import Deep3mError

log = logging.getLogger("deep3m.rpc")


def _status_for(exc: Deep3mError) -> status_pb2.Status:
    from deep3m.v1 import common_pb2

    code = getattr(code_pb2, exc.grpc_code_name, code_pb2.INTERNAL)
    detail = any_pb2.Any()
    detail.Pack(common_pb2.ErrorDetail(code=exc.grpc_code_name, message=exc.message,
                                       field=exc.field))
    return status_pb2.Status(code=code, message=exc.message, details=[detail])


def abort_with(context: grpc.ServicerContext, exc: BaseException, method: str) -> None:
    if isinstance(exc, Deep3mError):
        log.info("rpc error", extra={"method": method, "code": exc.grpc_code_name,
                                     "error": exc.message})
        context.abort_with_status(rpc_status.to_status(_status_for(exc)))
    log.exception("internal error in %s", method)
    context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")


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
                    return fn(request, context)
                except Exception as exc:  # the one place errors become statuses
                    if isinstance(exc, grpc.RpcError) or _is_abort(exc):
                        raise
                    abort_with(context, exc, method)
                    raise  # unreachable: abort raises

            return call

        def wrap_stream(fn: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
            def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                try:
                    yield from fn(request, context)
                except Exception as exc:
                    if isinstance(exc, grpc.RpcError) or _is_abort(exc):
                        raise
                    abort_with(context, exc, method)
                    raise

            return call

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                wrap_unary(handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                wrap_stream(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def _is_abort(exc: BaseException) -> bool:
    # context.abort raises a bare Exception subclass private to grpc.
    return type(exc).__module__.startswith("grpc")
