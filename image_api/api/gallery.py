"""The gallery at `/`: one page (HTML, CSS and a script of ours, no build step, nothing from
elsewhere) to try the service by hand, and to show front-end developers how to use the API.
The page is public; everything it shows comes from the API with the key it asks for."""

from __future__ import annotations

import functools
from pathlib import Path
from urllib.parse import urlsplit

from flask import Blueprint

from ..errors import NotFound
from ..service import current_service
from .files import serve_file, serve_page
from .openapi import undocumented

bp = Blueprint("gallery", __name__)

_STATIC = Path(__file__).parent / "static"
_FILES = {"gallery.js", "gallery.css"}


def page_policy() -> str:
    """Images from this origin (data: and blob: for previews), from PUBLIC_URL's (which
    the API's links name, whatever host the page was opened by), and in redirect mode
    from the bucket downloads are sent to; scripts, styles and calls from this origin."""
    images = "'self' data: blob:"
    service = current_service()
    if service.settings.public_url:
        parts = urlsplit(service.settings.public_url)
        images += f" {parts.scheme}://{parts.netloc}"
    if origin := service.redirect_origin:
        images += f" {origin}"
    return (
        f"default-src 'none'; script-src 'self'; style-src 'self'; img-src {images}; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


@bp.get("/")
@undocumented
def gallery_page():
    """The gallery. It says whether the API asks for keys (`data-auth`), so that a first
    visit asks for one without a refused request to find out (a console error)."""
    return serve_page(_page(current_service().settings.auth), page_policy())


@functools.cache
def _page(auth: bool) -> bytes:
    html = (_STATIC / "gallery.html").read_bytes()
    return html.replace(b"<body>", f'<body data-auth="{"on" if auth else "off"}">'.encode(), 1)


@bp.get("/gallery/<name>")
@undocumented
def gallery_asset(name: str):
    """The gallery's script and style sheet; nothing else."""
    if name not in _FILES:
        raise NotFound("Resource not found")
    return serve_file(_STATIC, name, page_policy())
