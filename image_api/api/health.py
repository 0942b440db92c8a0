"""Liveness and readiness probes, and the metrics."""

from __future__ import annotations

from flask import Blueprint, Response

from .. import metrics
from ..access import Scope
from ..service import current_service
from .openapi import Reply, describe
from .schemas import health_schema, ready_schema

bp = Blueprint("health", __name__)


@bp.get("/healthz")
@describe(
    scope=None,
    backends=False,
    limited=False,
    replies={200: Reply("The process answers", health_schema)},
)
def liveness():
    """The process answers; no backend is called."""
    return health_schema.dump({})


@bp.get("/readyz")
@describe(scope=None, limited=False, replies={200: Reply("Both backends answer", ready_schema)})
def readiness():
    """Both backends answer and take writes (under READ_ONLY=true: answer); 503 naming the
    one that does not."""
    return ready_schema.dump({"backends": current_service().ping()})


@bp.get("/metrics")
@describe(
    scope=Scope.ADMIN,
    backends=False,
    limited=False,
    replies={200: Reply("Prometheus text format, every worker's counts", text="text/plain")},
)
def prometheus_metrics():
    """Requests, bytes, backend calls, variants, decode waits and rate limits, for
    Prometheus (an admin key: never public). Behind the rendered nginx config it is a 404
    on the public server: Prometheus scrapes gunicorn directly."""
    body, content_type = metrics.exposition()
    return Response(body, content_type=content_type)
