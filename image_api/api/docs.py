"""The API's description: the OpenAPI document and Swagger UI, served from this process.

Swagger UI's files come from the pinned `flask-swagger-ui` wheel (its `dist/` is the
upstream swagger-ui-dist build), so the page works with no network; our page and start-up
script are static files of our own, so that the page's CSP allows no inline script.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from flask import Blueprint, current_app

from ..errors import NotFound
from .files import serve_file
from .openapi import Reply, build_document, describe, undocumented

bp = Blueprint("docs", __name__, url_prefix="/api")

_OURS = Path(__file__).parent / "static"
_SWAGGER_UI = Path(str(files("flask_swagger_ui") / "dist"))
#: The Swagger UI files the page loads; nothing else of the wheel is served.
_SWAGGER_FILES = {
    "swagger-ui.css",
    "swagger-ui-bundle.js",
    "swagger-ui-standalone-preset.js",
    "favicon-16x16.png",
    "favicon-32x32.png",
}
#: Swagger UI sets inline styles and shows icons as data: URLs and images as blob: URLs;
#: it calls the API from the page ("Try it out"). Nothing may come from elsewhere.
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; connect-src 'self'; font-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_DOCUMENT = "image_api.openapi"
_OPENAPI_OBJECT = {"type": "object", "required": ["openapi", "info", "paths"]}


@bp.get("/openapi.json")
@describe(scope=None, backends=False, replies={200: Reply("This document", _OPENAPI_OBJECT)})
def openapi_document():
    """The OpenAPI 3.1 description of this API."""
    document = current_app.extensions.get(_DOCUMENT)
    if document is None:
        document = current_app.extensions[_DOCUMENT] = build_document(current_app)
    return document


@bp.get("/docs")
@undocumented
def docs_page():
    """Swagger UI for the document."""
    return serve_file(_OURS, "docs.html", PAGE_POLICY)


@bp.get("/docs/<path:name>")
@undocumented
def docs_asset(name: str):
    """Swagger UI's files and our start-up script; nothing else."""
    if name in _SWAGGER_FILES:
        return serve_file(_SWAGGER_UI, name, PAGE_POLICY)
    if name == "docs.js":
        return serve_file(_OURS, name, PAGE_POLICY)
    raise NotFound("Resource not found")
