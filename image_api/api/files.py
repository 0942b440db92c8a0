"""The static files of the pages the service ships (the gallery, Swagger UI), each under
its page's Content-Security-Policy."""

from __future__ import annotations

import hashlib
from pathlib import Path

from flask import Response, send_from_directory

from ..errors import PreconditionFailed
from .conditions import etags

_MAX_AGE = 3600


def serve_file(directory: Path, name: str, policy: str) -> Response:
    """A file of the page, revalidated by ETag. Ranges are not offered (nobody needs part
    of these files), and a failed If-Match is our JSON 412, not Werkzeug's page."""
    response = send_from_directory(directory, name, conditional=False, etag=True, max_age=_MAX_AGE)
    return _revalidated(response, policy)


def serve_page(html: bytes, policy: str) -> Response:
    """A page made here (not a file as it is), served as `serve_file` serves files."""
    response = Response(html, mimetype="text/html")
    response.set_etag(hashlib.sha256(html).hexdigest()[:32])
    response.cache_control.public = True
    response.cache_control.max_age = _MAX_AGE
    return _revalidated(response, policy)


def _revalidated(response: Response, policy: str) -> Response:
    """`response`, or the 304 or 412 its ETag and the request's conditions call for."""
    tag, _ = response.get_etag()
    if_match, if_none_match = etags("If-Match"), etags("If-None-Match")
    if if_match is not None and not if_match.contains(tag):
        response.close()
        raise PreconditionFailed("The file's ETag does not match If-Match")
    if if_none_match is not None and if_none_match.contains_weak(tag):
        response.close()
        response = Response(status=304, headers={"ETag": response.headers["ETag"]})
        response.cache_control.max_age = _MAX_AGE
    response.headers["Content-Security-Policy"] = policy
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers.pop("Content-Disposition", None)
    return response
