"""Prometheus metrics, served at `GET /metrics` to admin keys.

Under gunicorn every worker counts in files under PROMETHEUS_MULTIPROC_DIR
(gunicorn.conf.py sets it and empties it at start), and a scrape adds them all up;
without it (tests, `flask run`) the process counts alone.

Metrics are module-level, as prometheus_client expects: a metric is registered once per
process, whatever the number of apps built in it.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

from .errors import ApiError, BackendUnavailable, Conflict, NotFound

REQUESTS = Counter(
    "image_api_requests_total", "HTTP requests answered", ["route", "method", "status"]
)
REQUEST_SECONDS = Histogram(
    "image_api_request_duration_seconds",
    "Time to the response's start",
    ["route", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BYTES_IN = Counter("image_api_request_bytes_total", "Request body bytes", ["route"])
BYTES_OUT = Counter("image_api_response_bytes_total", "Response body bytes", ["route"])
BACKEND_CALLS = Counter(
    "image_api_backend_calls_total",
    "Calls to the blob storage and the metadata repository",
    ["backend", "operation", "outcome"],
)
BACKEND_SECONDS = Histogram(
    "image_api_backend_call_duration_seconds",
    "Time of a backend call, retries included",
    ["backend", "operation"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
VARIANTS = Counter(
    "image_api_variants_total", "Variant downloads, rendered or from the cache", ["source"]
)
DECODE_WAITS = Counter(
    "image_api_decode_waits_total", "Decodes and renders that waited for memory or a slot"
)
DECODE_REFUSALS = Counter(
    "image_api_decode_refusals_total", "Decodes and renders refused with 503 decoder_busy"
)
RATE_LIMITED = Counter("image_api_rate_limited_total", "Requests refused with 429", ["budget"])


#: Methods counted by name; a client may send any token, and each would be a new series.
_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"}


def observe_request(fields: dict, seconds: float) -> None:
    """One answered request, from its log line's fields (an unrouted one counts as route
    `none`, an unknown method as `other`: a client could otherwise add label values
    without end)."""
    route = fields["route"] or "none"
    method = fields["method"] if fields["method"] in _METHODS else "other"
    count, duration = _request_series(route, method, fields["status"])
    count.inc()
    duration.observe(seconds)
    if fields["bytes_in"]:
        BYTES_IN.labels(route).inc(fields["bytes_in"])
    if fields["bytes_out"]:
        BYTES_OUT.labels(route).inc(fields["bytes_out"])


@functools.cache
def _request_series(route: str, method: str, status: int) -> tuple:
    """The count and duration series of one route, method and status, looked up once: a
    `labels()` lookup costs more than the update. (Routes are the app's own, methods
    and statuses a fixed set: the cache stays small.)"""
    return REQUESTS.labels(route, method, str(status)), REQUEST_SECONDS.labels(route, method)


def exposition() -> tuple[bytes, str]:
    """The metrics of every worker (multiprocess mode) or of this process."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


def _outcome(error: BaseException | None) -> str:
    if error is None:
        return "ok"
    if isinstance(error, NotFound):
        return "not_found"
    if isinstance(error, Conflict):
        return "conflict"
    if isinstance(error, BackendUnavailable):
        return "unavailable"
    if isinstance(error, ApiError):
        return "refused"
    return "error"


class Measured:
    """A backend (storage or repository) whose every public method call is counted and
    timed under its `name` (`filesystem`, `s3`, `sqlite`, `mongodb`)."""

    def __init__(self, inner, clock: Callable[[], float] = time.perf_counter):
        self.inner = inner
        self._clock = clock

    def __getattr__(self, name):
        attribute = getattr(self.inner, name)
        if name.startswith("_") or not callable(attribute):
            return attribute
        backend, clock = self.inner.name, self._clock
        duration = BACKEND_SECONDS.labels(backend, name)
        outcomes: dict[str, object] = {}

        def measured(*args, **kwargs):
            started, error = clock(), None
            try:
                return attribute(*args, **kwargs)
            except BaseException as failure:
                error = failure
                raise
            finally:
                outcome = _outcome(error)
                if (count := outcomes.get(outcome)) is None:
                    count = outcomes[outcome] = BACKEND_CALLS.labels(backend, name, outcome)
                count.inc()
                duration.observe(clock() - started)

        # Kept: the next call finds it without __getattr__ and its label lookups.
        self.__dict__[name] = measured
        return measured
