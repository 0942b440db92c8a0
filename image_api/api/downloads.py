"""Downloads, by RFC 9110: validators (304), single byte ranges (206/416), HEAD, and a
302 to the bucket in redirect mode."""

from __future__ import annotations

import unicodedata
from urllib.parse import quote

from flask import Blueprint, Response, request
from werkzeug.datastructures import ContentRange
from werkzeug.http import is_resource_modified
from werkzeug.wsgi import wrap_file

from ..errors import BadRequest, RangeNotSatisfiable
from ..records import ImageRecord
from ..service import current_service

bp = Blueprint("downloads", __name__, url_prefix="/api/images")

_CHUNK = 256 * 1024
_HEADERS = {
    "Accept-Ranges": "bytes",
    # Never let a browser run stored bytes as anything but the sniffed image type.
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; sandbox",
}


@bp.get("/<image_id>/download")
def download_image(image_id: str):
    """The image's bytes (attachment, or inline with ?disposition=inline)."""
    disposition = request.args.get("disposition", "attachment")
    if disposition not in ("attachment", "inline"):
        raise BadRequest("disposition must be 'attachment' or 'inline'")
    service = current_service()
    record = service.get(image_id)
    response = Response(mimetype=record.content_type)
    response.set_etag(record.sha256)
    response.last_modified = record.updated_at
    response.cache_control.no_cache = True  # the content changes when the image is replaced
    response.headers.set("Content-Disposition", disposition, **_filename_options(record.filename))
    response.headers.update(_HEADERS)
    if not is_resource_modified(
        request.environ, etag=record.sha256, last_modified=record.updated_at
    ):
        response.status_code = 304
        return response

    download = service.download(record, response.headers["Content-Disposition"])
    if download.redirect is not None:
        response.status_code = 302
        response.location = download.redirect
        return response
    byte_range = requested_range(record)
    if byte_range is None:
        response.content_length = record.size
    else:
        start, stop = byte_range
        response.status_code = 206
        response.content_range = ContentRange("bytes", start, stop, record.size)
        response.content_length = stop - start
    if request.method == "HEAD":
        return response  # the same headers, and no call to the storage
    # wsgi.file_wrapper lets gunicorn sendfile() a real file; other streams go in chunks,
    # and the server closes the stream (and its S3 connection) however the response ends.
    response.response = wrap_file(request.environ, download.open(byte_range), buffer_size=_CHUNK)
    response.direct_passthrough = True
    return response


def requested_range(record: ImageRecord) -> tuple[int, int] | None:
    """The single byte range to send, `(start, stop)`, or None for the whole image.

    Several ranges, other units and a failed If-Range get the whole image, as RFC 9110
    allows; an unsatisfiable single range is a 416.
    """
    ranges = request.range
    if ranges is None or ranges.units != "bytes" or len(ranges.ranges) != 1:
        return None
    if_range = request.if_range
    if if_range.etag is not None or if_range.date is not None:
        same_etag = if_range.etag == record.sha256
        same_date = if_range.date == record.updated_at.replace(microsecond=0)
        if not (same_etag or same_date):
            return None
    bounds = ranges.range_for_length(record.size)
    if bounds is None:
        raise RangeNotSatisfiable(headers={"Content-Range": f"bytes */{record.size}"})
    return bounds


def _filename_options(filename: str) -> dict[str, str]:
    """`filename` (ASCII fallback) and, for other names, RFC 6266's `filename*`."""
    try:
        filename.encode("ascii")
    except UnicodeEncodeError:
        fallback = unicodedata.normalize("NFKD", filename).encode("ascii", "ignore").decode()
        return {
            "filename": fallback or "image",
            "filename*": "UTF-8''" + quote(filename, safe="!#$&+-.^_`|~"),
        }
    return {"filename": filename}
