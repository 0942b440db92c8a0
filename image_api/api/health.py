"""Liveness and readiness probes."""

from __future__ import annotations

from flask import Blueprint

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
    """Both backends answer; 503 naming the one that does not."""
    return ready_schema.dump({"backends": current_service().ping()})
