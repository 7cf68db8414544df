"""The API's errors: each carries its HTTP status and a stable code, rendered by one middleware as
`{"error": {"code": "...", "message": "..."}}`."""

from __future__ import annotations


class ApiError(Exception):
    status = 500
    code = "internal"
    retry_after_s: float | None = None  # sent as Retry-After when set

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


class BadRequest(ApiError):
    status, code = 400, "bad_request"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class NotFound(ApiError):
    status, code = 404, "not_found"


class Conflict(ApiError):
    status, code = 409, "conflict"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ApiError):
    status, code = 415, "unsupported_media_type"


class ValidationFailed(ApiError):
    status, code = 422, "validation_error"


class RateLimited(ApiError):
    status, code = 429, "rate_limited"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(ApiError):
    status, code = 503, "unavailable"
    retry_after_s = 1.0


class InsufficientStorage(ApiError):
    status, code = 507, "insufficient_storage"
