"""Rate limits, through Flask-Limiter: per API key (per client address when anonymous), one
budget for reads and one for writes across all endpoints.

Counters live in memory (per gunicorn worker) unless RATE_LIMIT_STORAGE_URI names a Redis
shared by all workers and machines. If that store is down, requests are served without
limits and a warning is logged (at most once a minute), never a 500 or a traceback.
"""

from __future__ import annotations

import logging
import time

from flask import Flask, g, request
from flask_limiter import HeaderNames, Limiter

from .api.openapi import current_operation
from .config import Settings

#: The IETF RateLimit header fields, and Retry-After in seconds.
HEADERS = {
    HeaderNames.LIMIT: "RateLimit-Limit",
    HeaderNames.REMAINING: "RateLimit-Remaining",
    HeaderNames.RESET: "RateLimit-Reset",
    HeaderNames.RETRY_AFTER: "Retry-After",
}
WRITES = {"POST", "PUT", "DELETE", "PATCH"}


def client_key() -> str:
    """Whose budget a request spends: its API key's, else its client address (which
    PROXY_HOPS alone decides: with 0, X-Forwarded-For changes nothing)."""
    key = g.get("api_key")
    return f"key:{key.id}" if key is not None else f"address:{request.remote_addr}"


def init_app(app: Flask, settings: Settings) -> Limiter:
    """Limit every route but the probes; call after the API's own before-request hooks,
    so that the key is known when the limit is checked."""
    # Before the Limiter: Flask runs after-request hooks last-registered first, and this one
    # must see the headers the Limiter adds.
    app.after_request(_reset_in_seconds)
    logger = logging.getLogger("flask-limiter")
    if not any(isinstance(f, _StorageDown) for f in logger.filters):
        logger.addFilter(_StorageDown())
    limiter = Limiter(
        key_func=client_key,
        app=app,
        storage_uri=settings.rate_limit_storage_uri,
        storage_options=_storage_options(settings.rate_limit_storage_uri),
        # Exact over any 60 s, not per calendar minute (where 2x the limit fits across a
        # boundary); Redis keeps it in a sorted set.
        strategy="moving-window",
        headers_enabled=True,
        header_name_mapping=HEADERS,
        retry_after="delta-seconds",
        swallow_errors=True,
    )
    # One shared limit on every blueprint, its budget chosen per request: checked once, in
    # Flask-Limiter's before-request hook (a per-view decorator would check twice).
    budget = limiter.shared_limit(
        lambda: settings.rate_limit_write if _writes() else settings.rate_limit_read,
        scope=lambda _endpoint: "write" if _writes() else "read",
        exempt_when=_exempt,
    )
    for blueprint in app.blueprints.values():
        budget(blueprint)
    return limiter


def _writes() -> bool:
    return request.method in WRITES


def _exempt() -> bool:
    """Preflights, and operations declared unlimited (the probes: they must answer
    whatever the load)."""
    if request.method == "OPTIONS":
        return True
    operation = current_operation()
    return operation is not None and not operation.limited


def _storage_options(uri: str) -> dict:
    if uri.startswith("redis"):
        # A Redis that stalls must not hold requests: give up fast and serve unlimited.
        return {"socket_connect_timeout": 0.5, "socket_timeout": 0.5}
    return {}


def _reset_in_seconds(response):
    """RateLimit-Reset as seconds from now (the IETF draft), not Flask-Limiter's epoch; and
    Retry-After only where it means something (a 429, or a 503 that set its own)."""
    reset = response.headers.get("RateLimit-Reset")
    if reset is not None and reset.isdigit():
        response.headers["RateLimit-Reset"] = str(max(int(reset) - int(time.time()), 0))
        if response.status_code not in (429, 503):
            response.headers.pop("Retry-After", None)
    return response


class _StorageDown(logging.Filter):
    """Flask-Limiter logs a traceback on every request while its store is down: keep one
    warning a minute, without the traceback."""

    def __init__(self):
        super().__init__()
        self.last = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info is None:
            return True
        now = time.monotonic()
        if now - self.last < 60:
            return False
        self.last = now
        record.msg = "Rate limit storage unavailable, serving without limits: %r"
        record.args = (record.exc_info[1],)
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True
