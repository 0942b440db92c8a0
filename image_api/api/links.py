"""The links an image's metadata holds (imageUrl, thumbnailUrl: signed when downloads take
signed URLs), and its ETag, which their expiry is part of."""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import g, request, url_for

from ..service import current_service
from ..signing import query_string


def _download_url(record, parameters: tuple[tuple[str, str], ...] = ()) -> str:
    # Absolute, and right behind a proxy once ProxyFix trusts its X-Forwarded-* headers;
    # signed when downloads take signed URLs (the parameters too: they cannot be changed).
    url = url_for("downloads.download_image", image_id=record.id, _external=True)
    expires = url_expiry()
    if expires is None:
        return f"{url}?{query_string(list(parameters))}" if parameters else url
    # The path the download will see (without SCRIPT_NAME), taken from the URL just built.
    path = urlsplit(url).path[len(request.script_root) :]
    return f"{url}?{current_service().signer.sign(path, expires, parameters)}"


#: The variant `thumbnailUrl` names: a square of 256 pixels, in the best format the
#: browser asking for it takes (AVIF, WebP or the original's).
THUMBNAIL = (("w", "256"), ("h", "256"), ("fit", "cover"), ("format", "auto"))


def image_url(record) -> str:
    """The signed URL of an image's bytes (its `imageUrl`)."""
    # With the version (which the download ignores), so that a browser that holds the
    # picture of one version does not show it for the next: a page that showed an image
    # kept showing it after a replace, however its cache was told to revalidate.
    return _download_url(record, (("v", str(record.version)),))


def thumbnail_url(record) -> str:
    """The signed URL of its 256-pixel square (its `thumbnailUrl`)."""
    return _download_url(record, (*THUMBNAIL, ("v", str(record.version))))


def url_expiry() -> int | None:
    """When the signed URLs this request hands out expire (None: they are not signed).
    One moment per request, so that a page's URLs, its memo and its ETag agree."""
    signer = current_service().signer
    if signer is None:
        return None
    if "url_expiry" not in g:
        g.url_expiry = signer.expiry()
    return g.url_expiry


def image_etag(record) -> str:
    """The ETag of an image's metadata: its `version_tag`, and `.<expires>` of the signed
    imageUrl it holds (which changes the JSON); writes' If-Match ignores the expiry."""
    expires = url_expiry()
    return record.version_tag if expires is None else f"{record.version_tag}.{expires}"
