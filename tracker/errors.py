"""Domain errors: an exception with a code and a status, turned into the API's JSON error
(`{"error": code, "message": ...}`, docs/api.md) by one middleware."""
from __future__ import annotations


class DomainError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}


class BadRequest(DomainError):
    status, code = 400, "bad_request"


class Unauthorized(DomainError):
    status, code = 401, "unauthorized"


class Forbidden(DomainError):
    status, code = 403, "forbidden"


class NotFound(DomainError):
    status, code = 404, "not_found"


class RequestTimeout(DomainError):
    status, code = 408, "timeout"


class TooLarge(DomainError):
    status, code = 413, "too_large"


class RateLimited(DomainError):
    status, code = 429, "rate_limited"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, retry_after))})


class Unavailable(DomainError):
    """Something this service needs cannot take the request now (a click neither PostgreSQL nor the
    spool can store): 503, and when to try again."""

    status, code = 503, "unavailable"

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, retry_after))})
