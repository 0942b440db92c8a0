"""Downloads of an image or of a variant of it (see `variants`), by RFC 9110: validators
(304), single byte ranges (206/416), HEAD, and a 302 to the bucket in redirect mode."""

from __future__ import annotations

import contextvars
import errno
import logging
import re
from typing import BinaryIO
from urllib.parse import quote

from flask import Blueprint, Response, request
from werkzeug.datastructures import ContentRange
from werkzeug.http import quote_etag
from werkzeug.wsgi import wrap_file

from .. import variants
from ..access import Scope
from ..errors import (
    BackendUnavailable,
    DecoderBusy,
    InvalidImage,
    NotFound,
    PreconditionFailed,
    RangeNotSatisfiable,
)
from ..media import ascii_filename, renamed
from ..records import ImageRecord, Variant
from ..service import ImageService, current_service
from ..signing import SIGNATURE_PARAMETERS
from .auth import caller
from .conditions import etags, http_date, is_imf_fixdate, parse_http_date
from .openapi import DOWNLOAD_HEADERS, Reply, describe
from .schemas import download_query_schema

log = logging.getLogger(__name__)
bp = Blueprint("downloads", __name__, url_prefix="/api/images")

#: A download's query with none of its own parameters (a signed URL's are checked before
#: the view): loaded once, so that such a request skips the schema.
PLAIN_DOWNLOAD = download_query_schema.load({})

_CHUNK = 256 * 1024
_HEADERS = {
    "Accept-Ranges": "bytes",
    # Never let a browser run stored bytes as anything but the sniffed image type.
    "X-Content-Type-Options": "nosniff",
    # Inline styles only: a browser's own page for an image in a tab styles itself so.
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; sandbox",
}


@bp.get("/<id:image_id>/download")
@describe(
    scope=Scope.READ,
    signed=True,
    query=download_query_schema,
    headers=(
        "If-Match",
        "If-None-Match",
        "If-Modified-Since",
        "If-Unmodified-Since",
        "Range",
        "If-Range",
        "Accept",
    ),
    head=True,
    replies={
        200: Reply("The whole image", binary=True, headers=DOWNLOAD_HEADERS),
        206: Reply(
            "The requested byte range", binary=True, headers=(*DOWNLOAD_HEADERS, "Content-Range")
        ),
        302: Reply(
            "In redirect mode (S3): a presigned URL to the bytes (a HEAD is answered here)",
            headers=(*DOWNLOAD_HEADERS, "Location"),
            to_head=False,
        ),
        304: Reply("The client's copy is current", headers=DOWNLOAD_HEADERS),
    },
    errors=(NotFound, PreconditionFailed, RangeNotSatisfiable, InvalidImage, DecoderBusy),
)
def download_image(image_id: str):
    """The image's bytes (attachment, or inline with ?disposition=inline), or a variant's
    with any of w, h, fit, format, q, upscale."""
    query = (
        download_query_schema.load(request.args)
        if request.args.keys() - SIGNATURE_PARAMETERS
        else PLAIN_DOWNLOAD
    )
    service = current_service()
    record = service.get(image_id, caller())
    blob, filename = _blob_asked_for(service, record, query["variant"])
    response = _described_download(service, record, blob, filename, query)
    _check_preconditions(record, blob)
    if _not_modified(record, blob):
        response.status_code = 304
        return response
    return _sent(service, response, blob, requested_range(record, blob))  # 416 before a redirect


def _blob_asked_for(
    service: ImageService, record: ImageRecord, requested: variants.Requested | None
) -> tuple[ImageRecord | Variant, str]:
    """The image itself, or the variant asked for (cached, or rendered now), with the
    filename it is downloaded under."""
    if requested is None:
        return record, record.filename
    spec = variants.plan(
        requested,
        (record.width, record.height),
        record.content_type,
        _accepts,
        service.settings.max_variant_dimension,
    )
    return service.variant(record, spec), renamed(record.filename, spec.format)


def _described_download(
    service: ImageService,
    record: ImageRecord,
    blob: ImageRecord | Variant,
    filename: str,
    query: dict,
) -> Response:
    """A response with the download's headers and no body yet."""
    response = Response(mimetype=blob.content_type)
    response.set_etag(blob.sha256)
    response.last_modified = record.updated_at
    response.cache_control.no_cache = True  # the content changes when the image is replaced
    if service.settings.signs_urls:
        # Only for whoever had a key or its signed URL: never stored by a shared cache.
        response.cache_control.private = True
    response.headers.set(
        "Content-Disposition",
        query["disposition"],
        **_filename_options(filename, blob.content_type),
    )
    response.headers.update(_HEADERS)
    requested = query["variant"]
    if requested is not None and requested.format == "auto":
        response.vary.add("Accept")
    return response


def _check_preconditions(record: ImageRecord, blob: ImageRecord | Variant) -> None:
    """If-Match, or without one If-Unmodified-Since: a 412 when they name another version."""
    if_match = etags("If-Match")
    if if_match is not None:
        if not if_match.contains(blob.sha256):
            raise PreconditionFailed("The image's ETag does not match If-Match")
    elif (since := http_date("If-Unmodified-Since")) is not None and not record.current_at(since):
        raise PreconditionFailed("The image was modified after If-Unmodified-Since")


def _sent(
    service: ImageService,
    response: Response,
    blob: ImageRecord | Variant,
    byte_range: tuple[int, int] | None,
) -> Response:
    """`response` with the bytes (all, or `byte_range`): a redirect to the bucket, nginx's
    to send (accel mode), or streamed from here, as DOWNLOAD_MODE says and each agrees."""
    download = service.download(
        blob,
        response.headers["Content-Disposition"],
        response.headers["Cache-Control"],  # the bucket's answer to a redirect says the same
        redirect=_bucket_agrees(byte_range),
    )
    if download.redirect is not None:
        response.status_code = 302
        response.location = download.redirect
        del response.headers["Content-Type"]  # of the image the bucket sends, not of this
        return response
    if service.settings.download_mode == "accel" and _nginx_agrees(byte_range):
        # nginx sends the bytes (all of them or the range decided here, or for HEAD none)
        # under these headers, with its own validators off. An If-Range date is judged by
        # a rule of ours alone (see `ImageRecord.current_at`): such a request is streamed from here.
        disposition = response.headers.pop("Content-Disposition")
        response.headers["X-Accel-Redirect"] = service.accel_path(blob, byte_range, disposition)
        # Passed under another name, which nginx sends as Content-Disposition with the
        # bytes only: on its own error (the file gone meanwhile) a `curl -OJ` would have
        # saved the JSON under the image's name.
        response.headers["X-Image-Disposition"] = disposition
        return response
    if byte_range is None:
        response.content_length = blob.size
    else:
        start, stop = byte_range
        response.status_code = 206
        response.content_range = ContentRange("bytes", start, stop, blob.size)
        response.content_length = stop - start
    stream = download.open(byte_range)  # a file gone since the record was read: 404
    if request.method == "HEAD":
        stream.close()  # opened to answer as GET would; the same headers, no bytes
        return response
    # wsgi.file_wrapper lets gunicorn sendfile() a real file; other streams go in chunks,
    # and the server closes the stream (and its S3 connection) however the response ends.
    body = _CutShort(stream, blob)
    response.response = wrap_file(request.environ, body, buffer_size=_CHUNK)
    response.direct_passthrough = True
    return response


class _CutShort:
    """A download's stream as the server reads it. Storage that fails once the headers
    are out cannot be answered with an error: it is logged here, and the connection is
    dropped (ECONNRESET, which gunicorn takes without a traceback), so the client sees
    fewer bytes than Content-Length, never the next response in their place. The rest,
    `fileno` (for sendfile) and `close`, is the stream's own.

    A stream that is not a file (S3's) has its first chunk read at once, in the view:
    storage that fails before any byte is sent is still a JSON 503."""

    def __init__(self, stream: BinaryIO, blob: ImageRecord | Variant):
        self._stream = stream
        self._blob = blob
        self._sent = 0
        self._first = b""
        # The server reads after the request's own code has returned: its log line is
        # made in the request's context, to carry its id.
        self._context = contextvars.copy_context()
        if not _is_file(stream):
            try:
                first = bytearray()
                while len(first) < _CHUNK and (data := stream.read(_CHUNK - len(first))):
                    first += data
            except BaseException:
                stream.close()
                raise
            self._first = bytes(first)

    def read(self, size: int = -1) -> bytes:
        if self._first:
            cut = len(self._first) if size is None or size < 0 else size
            data, self._first = self._first[:cut], self._first[cut:]
            self._sent += len(data)
            return data
        try:
            data = self._stream.read(size)
        except BackendUnavailable as error:
            self._context.run(
                log.error,
                "download of %s cut short after %d of %d bytes: %s",
                self._blob.key,
                self._sent,
                self._blob.size,
                error.__cause__ or error,
            )
            raise ConnectionResetError(errno.ECONNRESET, "the blob storage failed") from error
        self._sent += len(data)
        return data

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _is_file(stream: BinaryIO) -> bool:
    """Whether `stream` is a file (gunicorn sends those with sendfile)."""
    try:
        stream.fileno()
    except (AttributeError, OSError):  # io.UnsupportedOperation is an OSError
        return False
    return True


def _bucket_agrees(byte_range: tuple[int, int] | None) -> bool:
    """Whether the bucket, sent the request again by a redirect (clients follow one with
    the same headers), answers exactly as the service decided.

    It judges If-Match and If-Range against its own ETag (an MD5, never our sha256: a 412
    or the whole object for a request the service accepted or ranged), and takes Range
    headers the service ignores (several ranges, say). Such requests, rare, are streamed
    by the service instead. (If-None-Match never matches the bucket's ETag either: the
    service answered a match with 304 already.) So is HEAD: a presigned URL is signed for
    GET, and S3 refuses another method on it (SigV4 signs the method)."""
    if request.method == "HEAD":
        return False
    headers = request.headers
    if "If-Match" in headers or "If-Range" in headers:
        return False
    if any(name in headers and not is_imf_fixdate(headers[name]) for name in _DATES):
        # Invalid (ignored here), or in an obsolete form (RFC 850, asctime) that the
        # bucket may read otherwise (moto answers both with a 500).
        return False
    return byte_range is not None or "Range" not in headers


_DATES = ("If-Modified-Since", "If-Unmodified-Since")


def _nginx_agrees(byte_range: tuple[int, int] | None) -> bool:
    """Whether nginx, sending the bytes itself, answers exactly as the service decided.

    It judges some headers again: If-Match and If-Unmodified-Since against validators it
    does not have at that point (a 412 for a request the service accepted), an If-Range
    date by its own rule, and a Range whose numbers overflow it (a 416 for what the
    service clamps). Such requests, rare, are streamed by the service instead."""
    headers = request.headers
    if "If-Match" in headers or "If-Unmodified-Since" in headers:
        return False
    if_range = headers.get("If-Range")
    if if_range is not None and not if_range.strip().endswith('"'):
        return False
    return byte_range is None or not _HUGE_NUMBER.search(headers.get("Range", ""))


#: A number nginx's range parser overflows on (it takes up to 2^63 - 1).
_HUGE_NUMBER = re.compile(r"\d{19,}")


def _accepts(content_type: str) -> bool:
    """Whether the request's Accept names `content_type` itself (a wildcard such as
    curl's `*/*` does not count: it says nothing about AVIF support)."""
    return any(
        value.lower() == content_type and quality > 0 for value, quality in request.accept_mimetypes
    )


def requested_range(record: ImageRecord, blob: ImageRecord | Variant) -> tuple[int, int] | None:
    """The single byte range of `blob` (the image's or a variant's) to send, `(start, stop)`,
    or None for all of it.

    Several ranges, other units and a failed If-Range get the whole image, as RFC 9110
    allows; an unsatisfiable single range is a 416.
    """
    header = request.headers.get("Range")
    if header is None or not _RANGES.fullmatch(header):
        return None
    ranges = request.range
    # `bytes=-0`, the last zero bytes, is a valid range that no representation satisfies
    # (RFC 9110 14.1.2); Werkzeug does not parse it.
    empty_suffix = ranges is None and _EMPTY_SUFFIX.fullmatch(header) is not None
    single = ranges is not None and ranges.units == "bytes" and len(ranges.ranges) == 1
    if not (single or empty_suffix) or not _if_range_holds(record, blob):
        return None
    if empty_suffix:
        raise RangeNotSatisfiable(headers={"Content-Range": f"bytes */{blob.size}"})
    start = ranges.ranges[0][0]
    if start < 0:
        # A suffix longer than the image asks for all of it (RFC 9110 14.1.2).
        return max(blob.size + start, 0), blob.size
    bounds = ranges.range_for_length(blob.size)
    if bounds is None:
        raise RangeNotSatisfiable(headers={"Content-Range": f"bytes */{blob.size}"})
    return bounds


#: RFC 9110 14.1.1's `ranges-specifier` for bytes: no whitespace but around commas. Werkzeug
#: takes more (`bytes=\t0-9`, `bytes = 0-9`), and nginx, sending a range in accel mode,
#: would judge those differently (its HTML 416): such a header is ignored, as any other
#: Range the service does not take.
_RANGES = re.compile(r"(?i:bytes)=(\d+-\d*|-\d+)([ \t]*,[ \t]*(\d+-\d*|-\d+))*")
#: A single suffix range of length zero.
_EMPTY_SUFFIX = re.compile(r"(?i:bytes)=-0+")


def _if_range_holds(record: ImageRecord, blob: ImageRecord | Variant) -> bool:
    """Whether the Range applies: no If-Range, or one that names this version.

    Strong comparison only (RFC 9110 13.1.5): a weak tag never matches, and a date only
    when it is the Last-Modified and no other version can share it. A value that is
    neither matches nothing: the whole image."""
    if_range = request.headers.get("If-Range")
    if if_range is None:
        return True
    date = parse_http_date(if_range.strip())
    same_etag = if_range.strip() == quote_etag(blob.sha256)
    same_date = (
        date is not None
        and date == record.updated_at.replace(microsecond=0)
        and record.current_at(date)
    )
    return same_etag or same_date


def _not_modified(record: ImageRecord, blob: ImageRecord | Variant) -> bool:
    """Whether the client's copy is current (RFC 9110 13.2.2: If-None-Match, when sent,
    decides alone; else If-Modified-Since). Werkzeug's `is_resource_modified` also reads
    If-Match, and answered a matching or a stale one with 304."""
    if_none_match = etags("If-None-Match")
    if if_none_match is not None:
        return if_none_match.contains_weak(blob.sha256)
    since = http_date("If-Modified-Since")
    return since is not None and record.current_at(since)


def _filename_options(filename: str, content_type: str) -> dict[str, str]:
    """`filename` (an ASCII stand-in) and, for other names, RFC 6266's `filename*`."""
    fallback = ascii_filename(filename, content_type)
    if fallback == filename:
        return {"filename": fallback}
    return {
        "filename": fallback,
        "filename*": "UTF-8''" + quote(filename, safe="!#$&+-.^_`|~"),
    }
