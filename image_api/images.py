"""The `images` blueprint: HTTP in, one service call, a schema out."""

from __future__ import annotations

import unicodedata
from urllib.parse import quote

from flask import Blueprint, Response, current_app, request, url_for
from werkzeug.datastructures import ContentRange
from werkzeug.http import is_resource_modified, quote_etag
from werkzeug.wsgi import wrap_file

from .errors import BadRequest, MissingFile, RangeNotSatisfiable
from .repository import Filters, ImageRecord
from .schemas import dump_image, dump_images, list_query_schema
from .service import ImageService

bp = Blueprint("images", __name__, url_prefix="/api/images")

_DOWNLOAD_CHUNK = 256 * 1024
_DOWNLOAD_HEADERS = {
    "Accept-Ranges": "bytes",
    # Never let a browser run stored bytes as anything but the sniffed image type.
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; sandbox",
}


def images() -> ImageService:
    """The image service the app factory built for this app."""
    return current_app.extensions["image_api"]


def uploaded_file():
    """The file in multipart field `image`, or `MissingFile`."""
    file = request.files.get("image")
    if file is None:
        others = ", ".join(f"'{name}'" for name in request.files)
        hint = f" (got {others})" if others else ""
        raise MissingFile(f"No file in multipart field 'image'{hint}")
    return file


def if_match():
    """The `If-Match` header's entity tags (`*` matches any), or None without the header."""
    return request.if_match if "If-Match" in request.headers else None


def idempotency_key() -> str | None:
    """The `Idempotency-Key` header, checked to be a short printable token."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= 255 or not key.isprintable() or not key.isascii():
        raise BadRequest("Idempotency-Key must be 1 to 255 printable ASCII characters")
    return key


@bp.post("/upload")
def create_image():
    """Upload a new image."""
    file = uploaded_file()
    record = images().create(file.stream, file.filename, idempotency_key())
    location = url_for(".get_image", image_id=record.id, _external=True)
    body = {"message": "Image uploaded successfully", "image": dump_image(record)}
    return body, 201, {"Location": location, "ETag": quote_etag(record.sha256)}


@bp.get("")
def list_images():
    """List images, newest first, a page at a time."""
    query = list_query_schema.load(request.args)
    filters = Filters(query["content_type"], query["uploaded_after"], query["uploaded_before"])
    page = images().list(query["limit"], query["cursor"], filters)
    body = {
        "message": "Images fetched successfully",
        "total": page.total,
        "images": dump_images(page.images),
        "nextCursor": page.next_cursor,
    }
    headers = {}
    if page.next_cursor:
        next_url = url_for(
            ".list_images", **{**request.args, "cursor": page.next_cursor}, _external=True
        )
        headers["Link"] = f'<{next_url}>; rel="next"'
    return body, 200, headers


@bp.get("/<image_id>")
def get_image(image_id: str):
    """One image's metadata."""
    record = images().get(image_id)
    return dump_image(record), 200, {"ETag": quote_etag(record.sha256)}


@bp.put("/<image_id>")
def replace_image(image_id: str):
    """Replace an image's file."""
    service = images()
    service.get(image_id)  # a missing image is a 404 before a missing or bad file
    file = uploaded_file()
    record = service.replace(image_id, file.stream, file.filename, if_match(), idempotency_key())
    body = {"message": "Image updated successfully", "image": dump_image(record)}
    return body, 200, {"ETag": quote_etag(record.sha256)}


@bp.delete("/<image_id>")
def delete_image(image_id: str):
    """Delete an image and its file."""
    images().delete(image_id, if_match())
    return {"message": "Image deleted successfully"}


@bp.get("/<image_id>/download")
def download_image(image_id: str):
    """The image's bytes (attachment, or inline with ?disposition=inline)."""
    return blob_response(images().get(image_id), request.args.get("disposition", "attachment"))


def blob_response(record: ImageRecord, disposition: str) -> Response:
    """The bytes of a stored image, with what RFC 9110 gives a browser, a CDN and curl:
    validators (304), single byte ranges (206/416) and HEAD; or a 302 to S3 in redirect
    mode."""
    if disposition not in ("attachment", "inline"):
        raise BadRequest("disposition must be 'attachment' or 'inline'")
    response = Response(mimetype=record.content_type)
    response.set_etag(record.sha256)
    response.last_modified = record.updated_at
    response.cache_control.no_cache = True  # the content changes when the image is replaced
    response.headers.set("Content-Disposition", disposition, **_filename_options(record.filename))
    response.headers.update(_DOWNLOAD_HEADERS)

    if not is_resource_modified(
        request.environ, etag=record.sha256, last_modified=record.updated_at
    ):
        response.status_code = 304
        return response

    service = images()
    if service.settings.download_mode == "redirect":
        url = service.download_url(record, response.headers["Content-Disposition"])
        response.status_code = 302
        response.location = url
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
    stream = service.open_blob(record, byte_range)
    # wsgi.file_wrapper lets gunicorn sendfile() a real file; other streams go in chunks,
    # and the server closes the stream (and its S3 connection) however the response ends.
    response.response = wrap_file(request.environ, stream, buffer_size=_DOWNLOAD_CHUNK)
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
