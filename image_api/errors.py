"""Service exceptions and the one place that turns any error into a JSON response."""

from __future__ import annotations

import json
import logging

from flask import Flask, jsonify
from marshmallow import Schema, ValidationError, fields
from werkzeug.exceptions import HTTPException

from .middleware import ResponseHeaders

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error a client can see: a status, a stable code and a message."""

    status = 500
    code = "internal_error"
    message = "Internal server error"

    def __init__(self, message: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message or self.message)
        self.message = message or self.message
        self.headers = headers or {}


class NotFound(ApiError):
    status, code, message = 404, "not_found", "Image not found"


class MissingFile(ApiError):
    status, code, message = 400, "missing_file", "No file in multipart field 'image'"


class TooManyFiles(ApiError):
    status, code = 400, "too_many_files"
    message = "One file per request, in multipart field 'image'"


class EmptyFile(ApiError):
    status, code, message = 400, "empty_file", "The uploaded file is empty"


class BadRequest(ApiError):
    status, code, message = 400, "bad_request", "Bad request"


class FileTooLarge(ApiError):
    status, code, message = 413, "file_too_large", "The file is too large"


class FormTooLarge(ApiError):
    status, code = 413, "form_too_large"
    message = "The multipart form has too many parts or too large a text field"


class UnsupportedMediaType(ApiError):
    status, code = 415, "unsupported_media_type"
    message = "Not an accepted image type"


class InvalidImage(ApiError):
    status, code, message = 422, "invalid_image", "The image is corrupt or cannot be decoded"


class TooManyPixels(ApiError):
    status, code, message = 422, "image_too_large", "The image has too many pixels"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"
    message = "A valid API key is required (Authorization: Bearer <key>, or X-API-Key)"

    def __init__(self, message: str | None = None):
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="image-api"'})


class Forbidden(ApiError):
    status, code = 403, "forbidden"
    message = "This API key does not have the scope this request needs"


class InvalidSignature(Forbidden):
    code = "invalid_signature"
    message = "The signed URL is not valid: altered, cut short, or signed with another SECRET_KEY"


class SignatureExpired(Forbidden):
    code = "url_expired"
    message = "The signed URL has expired: fetch the image's metadata for a fresh imageUrl"


class Conflict(ApiError):
    status, code = 409, "conflict"
    message = "The image was changed by another request; retry"


class RangeNotSatisfiable(ApiError):
    status, code = 416, "range_not_satisfiable"
    message = "The requested range is outside the image"


class PreconditionFailed(ApiError):
    status, code = 412, "precondition_failed"
    message = "The image's ETag does not match If-Match; nothing was changed"


class IdempotencyKeyReused(ApiError):
    status, code = 422, "idempotency_key_reused"
    message = "This Idempotency-Key was used for a different request"


class IdempotencyInProgress(ApiError):
    status, code = 409, "idempotency_in_progress"
    message = "A request with this Idempotency-Key is still running; retry later"


class BackendUnavailable(ApiError):
    """A backend failed or timed out.

    `in_doubt` says whether a write may have been applied anyway (its acknowledgement lost);
    backends clear it when they know the request never took effect.
    """

    status, code = 503, "backend_unavailable"
    message = "A storage backend is unavailable; retry later"

    def __init__(self, message: str | None = None, *, in_doubt: bool = True):
        super().__init__(message, headers={"Retry-After": "5"})
        self.in_doubt = in_doubt


class ReadOnly(ApiError):
    """READ_ONLY=true (a migration or maintenance): writes wait, reads go on."""

    status, code = 503, "read_only"
    message = "The service is read-only for maintenance; retry the write later"

    def __init__(self, message: str | None = None):
        super().__init__(message, headers={"Retry-After": "60"})


class DecoderBusy(ApiError):
    """Too many large images are being decoded in this worker: retry shortly."""

    status, code = 503, "decoder_busy"
    message = "The server is busy decoding other images; retry shortly"

    def __init__(self, message: str | None = None):
        super().__init__(message, headers={"Retry-After": "2"})


class RateLimited(ApiError):
    """Over RATE_LIMIT_READ or RATE_LIMIT_WRITE (see `limits`), with Retry-After."""

    status, code = 429, "rate_limited"
    message = "Rate limit exceeded; retry after Retry-After seconds"


# Codes for errors Werkzeug raises before a view runs (routing, multipart parsing), and
# that nginx in front answers with itself (deploy/nginx.conf: a URI too long for it,
# gunicorn down).
_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    412: "precondition_failed",
    413: "file_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    417: "expectation_failed",
    429: "rate_limited",
    431: "headers_too_large",
    501: "not_implemented",
    503: "service_unavailable",
    505: "http_version_not_supported",
}


def api_errors() -> list[type[ApiError]]:
    """`ApiError` and every subclass of it, base first."""
    found, todo = [], [ApiError]
    while todo:
        cls = todo.pop(0)
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def error_codes() -> list[str]:
    """Every `code` an error response can carry, from the classes above and Werkzeug's."""
    codes = [cls.code for cls in api_errors()] + [*_HTTP_CODES.values(), "http_error"]
    return sorted(set(codes))


class ErrorSchema(Schema):
    """Every error's body: a message for people and a stable code for programs."""

    message = fields.String(required=True)
    code = fields.String(required=True, metadata={"description": "One of `error_codes()`"})


error_schema = ErrorSchema()


def error_response(status: int, code: str, message: str):
    response = jsonify(error_schema.dump({"message": message, "code": code}))
    response.status_code = status
    return response


def server_refusal(status: int, reason: str, detail: str) -> bytes:
    """The whole HTTP response for a request gunicorn refuses before the app sees it (a
    request line or header that is not valid HTTP or is over gunicorn's limits, an
    unsupported Expect or Transfer-Encoding): the service's JSON shape and security headers
    in place of gunicorn's HTML page, and the connection closed, as gunicorn closes it.
    gunicorn.conf.py installs it."""
    code = _HTTP_CODES.get(status, "http_error")
    message = (detail or reason)[:_MAX_REFUSAL_DETAIL]
    body = json.dumps({"message": message, "code": code}, separators=(",", ":")).encode()
    headers = [
        ("Connection", "close"),
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        *ResponseHeaders.HEADERS,
        ("Content-Security-Policy", ResponseHeaders.JSON_POLICY),
    ]
    head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers)
    return (head + "\r\n").encode("latin-1") + body


#: gunicorn's detail quotes what the client sent (a request line of up to 4094 bytes).
_MAX_REFUSAL_DETAIL = 200


def handle_api_error(error: ApiError):
    if isinstance(error, BackendUnavailable):
        log.warning("backend unavailable: %s", error.__cause__ or error)
    response = error_response(error.status, error.code, error.message)
    response.headers.update(error.headers)
    return response


def handle_validation_error(error: ValidationError):
    fields = "; ".join(
        f"{name}: {' '.join(problems) if isinstance(problems, list) else problems}"
        for name, problems in error.normalized_messages().items()
    )
    return error_response(400, "bad_request", f"Invalid parameters: {fields}")


def handle_http_exception(error: HTTPException):
    status = error.code or 500
    code = _HTTP_CODES.get(status, "http_error")
    message = "Resource not found" if status == 404 else error.description or error.name
    if status == 429:
        message = f"Rate limit exceeded ({error.description}); retry after Retry-After seconds"
    response = error_response(status, code, message)
    # Keep what Werkzeug adds beside its HTML body, such as `Allow` on a 405.
    for name, value in error.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


def handle_unexpected(error: Exception):
    log.exception("unhandled error", exc_info=error)
    return error_response(500, "internal_error", "Internal server error")


def init_app(app: Flask) -> None:
    """Register the handlers: every error leaves as `{"message", "code"}` JSON."""
    app.register_error_handler(ApiError, handle_api_error)
    app.register_error_handler(ValidationError, handle_validation_error)
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(Exception, handle_unexpected)
