"""The HTTP API: blueprints that parse a request, call one service function and dump a
schema. Nothing here touches a backend's driver or decides what the service decides."""

from __future__ import annotations

from flask import Flask, g

from .. import deadline
from ..service import current_service
from . import downloads, health, images


def start_budget() -> None:
    """Every request gets one time budget for all its backend calls."""
    g.budget = deadline.start(current_service().settings.request_timeout)


def end_budget(_error=None) -> None:
    token = g.pop("budget", None)
    if token is not None:
        deadline.stop(token)


def init_app(app: Flask) -> None:
    app.register_blueprint(images.bp)
    app.register_blueprint(downloads.bp)
    app.register_blueprint(health.bp)
    app.before_request(start_budget)
    app.teardown_request(end_budget)
