"""Liveness and readiness probes."""

from __future__ import annotations

from flask import Blueprint

from ..service import current_service

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def liveness():
    """The process answers; no backend is called."""
    return {"status": "ok"}


@bp.get("/readyz")
def readiness():
    """Both backends answer; 503 naming the one that does not."""
    return {"status": "ready", "backends": current_service().ping()}
