"""The HTTP API: blueprints that parse a request, call one service function and dump a
schema. Nothing here touches a backend's driver or decides what the service decides."""

from __future__ import annotations

import functools
import re

from flask import Flask, Request, g, request
from flask_cors import CORS
from werkzeug.routing import BaseConverter

from .. import deadline, logs
from ..config import HOST_PATTERN, PORT_PATTERN, Settings, fits
from ..errors import BadRequest, ReadOnly
from ..limits import WRITES, RateLimits
from ..records import ID_PATTERN
from ..service import EXTENSION, current_service
from . import docs, downloads, gallery, health, images
from .auth import authenticate
from .openapi import current_operation


class ApiRequest(Request):
    """Flask's request, except that a multipart body that does not parse is an error, not
    an empty form (which would pass for a missing file)."""

    def make_form_data_parser(self):
        parser = super().make_form_data_parser()
        parser.silent = False
        return parser


class ImageIdConverter(BaseConverter):
    """`<id:image_id>`: only an id can name an image, so `PUT /api/images/upload` is a 405
    (the upload route's path), not a 404 for an image called "upload"."""

    regex = ID_PATTERN


def check_host(req: Request, settings: Settings) -> None:
    """Links are built from the Host a request names: it must be a well-formed host[:port],
    one of ALLOWED_HOSTS when that is set, and present (HTTP/1.0 may send none). Probes
    (`/healthz`, `/readyz`) answer whatever the Host: load balancers often send none."""
    if settings.public_url or req.blueprint == "health":
        return
    problem = _host_problem(req.environ.get("HTTP_HOST"), settings.allowed_hosts)
    if problem is not None:
        raise BadRequest(problem)


@functools.lru_cache(maxsize=256)
def _host_problem(host: str | None, allowed: tuple[str, ...]) -> str | None:
    """What is wrong with a Host header, if anything (judged once per name: clients send
    the same few)."""
    if not host:
        return "A Host header is required"
    if not fits(_HOST, host):
        return "The Host header is not a host[:port] (port 1 to 65535)"
    named = host.lower()
    if allowed and named not in allowed and named.rpartition(":")[0] not in allowed:
        return f"Host {host!r} is not served here"
    return None


#: A host and an optional port.
_HOST = re.compile(rf"{HOST_PATTERN}(?::(?P<port>{PORT_PATTERN}))?")


def start_budget(req: Request, settings: Settings) -> None:
    """Every request gets one time budget for all its backend calls."""
    # Kept with the request, not in `g`, which requests share when one runs inside another's
    # app context (a test client in a request, say).
    req.environ[_BUDGET] = deadline.start(settings.request_timeout)


def end_budget(_error=None) -> None:
    token = request.environ.pop(_BUDGET, None)
    if token is not None:
        deadline.stop(token)


_BUDGET = "image_api.budget"


#: What a browser on an allowed origin may send and read (CORS_ORIGINS).
CORS_ALLOW_HEADERS = [
    "Authorization",
    "X-API-Key",
    "If-Match",
    "If-None-Match",
    "If-Modified-Since",
    "If-Unmodified-Since",
    "Idempotency-Key",
    "Range",
    "If-Range",
    "Content-Type",
    "X-Request-ID",
]
CORS_EXPOSE_HEADERS = [
    "ETag",
    "Location",
    "Link",
    "Content-Disposition",
    "Content-Range",  # a 206's total size
    "X-Request-ID",  # to tell the service which request went wrong
    "Retry-After",
    "RateLimit-Limit",
    "RateLimit-Remaining",
    "RateLimit-Reset",
]


def refuse_writes_when_read_only(req: Request, settings: Settings) -> None:
    """READ_ONLY=true: the API's writes get 503 `read_only` with Retry-After; reads (and
    the variants they render into the cache) go on."""
    if (
        settings.read_only
        and req.method in WRITES
        and req.url_rule is not None  # an unknown route or method: its own 404 or 405
    ):
        raise ReadOnly()


def note_for_log(req: Request) -> None:
    """What the request's log line needs from the app (see `logs.RequestLog`)."""
    info = req.environ.get(logs.ENVIRON_INFO)
    if info is not None:
        key = g.get("api_key")
        info["route"] = req.url_rule.rule if req.url_rule else None
        info["key"] = None if key is None else key.name
        info["client"] = req.remote_addr


def vary_by_origin(response):
    """Allowed origins get CORS headers and others none: a cache must keep them apart
    (flask-cors leaves this out when only one origin is allowed)."""
    response.vary.add("Origin")
    return response


def init_app(app: Flask, rate_limits: RateLimits) -> None:
    app.request_class = ApiRequest
    # `//api/images//<id>` is not a route: Werkzeug would answer a 308 to a URL built from
    # the request's Host.
    app.url_map.merge_slashes = False
    app.url_map.converters["id"] = ImageIdConverter
    app.register_blueprint(images.bp)
    app.register_blueprint(downloads.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(docs.bp)
    app.register_blueprint(gallery.bp)

    # One hook each way, in this order (Flask's per-hook dispatch costs more than some of
    # the steps): the host first; authentication reads the repository, so within the
    # budget; the rate limit once the key is known; and a refused key or signature only
    # after the limit, so that guessing them spends the client's budget too.
    def before() -> None:
        # The request, the service and the operation, looked up once (each proxy access
        # costs about as much as a step below).
        req = request._get_current_object()
        service = current_service()
        settings = service.settings
        operation = current_operation(req)
        check_host(req, settings)
        start_budget(req, settings)
        refusal = authenticate(req, service, operation)
        rate_limits.check(req, operation)
        if refusal is not None:
            raise refusal
        refuse_writes_when_read_only(req, settings)

    def after(response):
        note_for_log(request._get_current_object())
        return response

    app.before_request(before)
    app.teardown_request(end_budget)
    app.after_request(after)
    origins = app.extensions[EXTENSION].settings.cors_origins
    if origins:
        app.after_request(vary_by_origin)
        # flask-cors answers preflights and adds the headers to allowed origins only.
        CORS(
            app,
            origins=list(origins),
            allow_headers=CORS_ALLOW_HEADERS,
            expose_headers=CORS_EXPOSE_HEADERS,
            methods=["GET", "HEAD", "POST", "PUT", "DELETE"],
            max_age=600,
            always_send=False,  # no Origin, no CORS headers
        )
