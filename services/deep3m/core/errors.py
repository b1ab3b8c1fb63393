"""The domain error hierarchy.

Every error a user can cause or meet is one of these. The gRPC layer maps each
class to one status code (see ``deep3m.runtime.interceptor``); anything else is
an internal error whose details stay in the log.
"""

from __future__ import annotations


def clip(value: object, limit: int = 64) -> str:
    """``repr(value)`` cut to ``limit`` characters: messages echo what they refuse, briefly."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


_NO_CREDENTIALS = frozenset({"NoCredentialsError", "PartialCredentialsError"})


def storage_access_error(exc: BaseException) -> Deep3mError | None:
    """A domain error for an object store that refused us for want of credentials, or
    that could not be reached (UNAVAILABLE: worth retrying).

    botocore raises ``NoCredentialsError`` deep inside s3fs; s3fs turns an
    ``AccessDenied`` into ``PermissionError``. Both are a setup problem to name,
    not an internal error (matched by class name: core does not import botocore).
    """
    chain: BaseException | None = exc
    while chain is not None:
        if type(chain).__name__ in _NO_CREDENTIALS:
            return FailedPreconditionError(
                "the object store asked for credentials and none were found: set "
                "DEEP3M_S3_ACCESS_KEY_ID and DEEP3M_S3_SECRET_ACCESS_KEY (or AWS_* variables, "
                "a profile, IRSA)",
                field="store_url",
            )
        if isinstance(chain, PermissionError):
            return FailedPreconditionError(
                f"the store refused access: {str(chain)[:200]}; check the credentials and "
                "the bucket policy",
                field="store_url",
            )
        chain = chain.__cause__ or chain.__context__
    if store_unreachable(exc):
        return UnavailableError(
            f"the object store could not be reached ({type(exc).__name__}: {str(exc)[:200]}); "
            "retry once it is back",
            field="store_url",
        )
    return None


# Errors of a store that did not answer (refused, reset, timed out): botocore's and
# aiohttp's by class name, the built-in ones by type.
_UNREACHABLE = frozenset(
    {
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "HTTPClientError",
        "ClientConnectionError",
        "ServerDisconnectedError",
    }
)
# S3 error codes that mean "the server is there but cannot serve now".
_BUSY_CODES = frozenset({"ServiceUnavailable", "SlowDown", "InternalError", "RequestTimeout"})


def store_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says the store could not be reached or was
    too busy to answer: an outage to wait out, not a fault of the request."""
    chain: BaseException | None = exc
    seen = 0
    while chain is not None and seen < 32:
        if isinstance(chain, ConnectionError | TimeoutError):
            return True
        if _UNREACHABLE & {cls.__name__ for cls in type(chain).__mro__}:
            return True
        response = getattr(chain, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            code = response.get("Error", {}).get("Code", "")
            if (isinstance(status, int) and status >= 500) or code in _BUSY_CODES:
                return True
        chain = chain.__cause__ or chain.__context__
        seen += 1
    return False


class Deep3mError(Exception):
    """Base of all domain errors.

    ``field`` names the offending file, field or value, so a user can fix it.
    ``retryable`` tells a worker whether another attempt could succeed.
    """

    grpc_code_name = "INTERNAL"
    retryable = False

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return self.message


class InvalidArgumentError(Deep3mError, ValueError):
    """The request or its input data is malformed (bad shape, corrupt file, ...)."""

    grpc_code_name = "INVALID_ARGUMENT"


class NotFoundError(Deep3mError, LookupError):
    """A referenced file, volume, model or job does not exist."""

    grpc_code_name = "NOT_FOUND"


class AlreadyExistsError(Deep3mError):
    """The target exists and holds something else."""

    grpc_code_name = "ALREADY_EXISTS"


class FailedPreconditionError(Deep3mError):
    """The system is not in a state that allows the operation (stale lease, ...)."""

    grpc_code_name = "FAILED_PRECONDITION"


class ResourceExhaustedError(Deep3mError):
    """A limit was hit (region too large, out of memory, queue full)."""

    grpc_code_name = "RESOURCE_EXHAUSTED"
    retryable = True


class UnavailableError(Deep3mError):
    """A dependency (store, scheduler) cannot be reached right now."""

    grpc_code_name = "UNAVAILABLE"
    retryable = True


class UnauthenticatedError(Deep3mError):
    """The caller presented no credentials, or credentials this server does not know."""

    grpc_code_name = "UNAUTHENTICATED"


class PermissionDeniedError(Deep3mError):
    """The caller is known but may not do this (a client leasing, a worker of another role)."""

    grpc_code_name = "PERMISSION_DENIED"


class CancelledError(Deep3mError):
    """The job was cancelled while the work was running."""

    grpc_code_name = "CANCELLED"
