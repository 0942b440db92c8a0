"""The `images` blueprint: upload, list, get, replace and delete."""

from __future__ import annotations

from urllib.parse import urlencode

from flask import Blueprint, request, url_for
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.http import quote_etag

from ..access import Scope
from ..errors import (
    BadRequest,
    Conflict,
    DecoderBusy,
    EmptyFile,
    FileTooLarge,
    Forbidden,
    FormTooLarge,
    IdempotencyInProgress,
    IdempotencyKeyReused,
    InvalidImage,
    MissingFile,
    NotFound,
    PreconditionFailed,
    ReadOnly,
    TooManyFiles,
    TooManyPixels,
    UnsupportedMediaType,
)
from ..media import Upload
from ..service import Page, current_service
from .auth import caller
from .conditions import etags, preconditions, read_preconditions
from .links import image_etag
from .openapi import Reply, describe
from .schemas import (
    deleted_schema,
    image_response,
    image_schema,
    list_query_schema,
    next_page_query,
    page_schema,
    updated_schema,
    uploaded_schema,
)

bp = Blueprint("images", __name__, url_prefix="/api/images")


def uploaded_file(required: bool = True) -> Upload | None:
    """The file in multipart field `image`; `MissingFile` if absent and `required`."""
    if request.content_encoding is not None and request.content_encoding.lower() != "identity":
        raise UnsupportedMediaType(
            f"Request bodies with Content-Encoding {request.content_encoding!r} are not accepted"
        )
    try:
        files = request.files.getlist("image")
    except RequestEntityTooLarge:
        limit, length = request.max_content_length, request.content_length
        if length is None or length > limit:
            # The whole body counts (other fields too), not only the file.
            size = f"{length} bytes" if length is not None else "larger than that"
            per_file = current_service().settings.max_upload_bytes
            raise FileTooLarge(
                f"The request body is {size}; the limit is {limit} bytes: {per_file} for "
                f"the file (MAX_UPLOAD_BYTES) and {limit - per_file} for the rest of the form"
            ) from None
        raise FormTooLarge() from None  # Werkzeug's limits on parts and text fields
    except (ValueError, OSError):
        # A multipart body that does not parse (part headers must be UTF-8), or a chunked
        # body that does not (gunicorn raises OSErrors for bad chunk sizes, terminators and
        # trailers while the form is read).
        raise BadRequest(
            "The request body is not valid multipart/form-data"
            " (cut short, or with part headers that are not UTF-8)"
        ) from None
    if len(files) > 1:
        # Not the first of them, silently: the client meant something the API does not do.
        raise TooManyFiles(f"One file per request in field 'image'; got {len(files)}")
    if not files:
        if not required:
            return None
        others = ", ".join(f"'{name}'" for name in request.files)
        hint = f" (got {others})" if others else ""
        raise MissingFile(f"No file in multipart field 'image'{hint}")
    return Upload(files[0].stream, files[0].filename)


def idempotency_key() -> str | None:
    """The `Idempotency-Key` header, checked to be a short printable token."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= 255 or not key.isprintable() or not key.isascii():
        raise BadRequest("Idempotency-Key must be 1 to 255 printable ASCII characters")
    return key


#: What an uploaded file can be refused for.
UPLOAD_ERRORS = (
    MissingFile,
    TooManyFiles,
    EmptyFile,
    FileTooLarge,
    FormTooLarge,
    UnsupportedMediaType,
    InvalidImage,
    TooManyPixels,
    DecoderBusy,
    IdempotencyKeyReused,
    IdempotencyInProgress,
    ReadOnly,
)


@bp.post("/upload")
@describe(
    scope=Scope.WRITE,
    upload=True,
    headers=("Idempotency-Key", "Content-Encoding"),
    replies={
        201: Reply(
            "Stored; Location is its metadata",
            uploaded_schema,
            headers=("Location", "ETag"),
            image_id="/image/_id",
        )
    },
    errors=UPLOAD_ERRORS,
)
def create_image():
    """Upload a new image."""
    record = current_service().create(uploaded_file(), idempotency_key(), caller())
    location = url_for(".get_image", image_id=record.id, _external=True)
    body = uploaded_schema.dump({"image": record})
    return body, 201, {"Location": location, "ETag": quote_etag(image_etag(record))}


@bp.get("")
@describe(
    scope=Scope.READ,
    query=list_query_schema,
    replies={200: Reply("One page, newest first", page_schema, headers=("Link",))},
    errors=(Forbidden,),  # another owner's list, asked for without admin
)
def list_images():
    """List images, newest first, a page at a time."""
    query = list_query_schema.load(request.args)
    page = current_service().list(query["limit"], query["cursor"], query["filters"], caller())
    return page_schema.dump(page), 200, _link_to_next(query, page)


def _link_to_next(query: dict, page: Page) -> dict[str, str]:
    """The `Link` header to the page after this one, when there is one."""
    if not page.next_cursor:
        return {}
    query_string = urlencode(next_page_query(query, page.next_cursor))
    return {"Link": f'<{url_for(".list_images", _external=True)}?{query_string}>; rel="next"'}


@bp.get("/<id:image_id>")
@describe(
    scope=Scope.READ,
    headers=("If-Match", "If-None-Match", "If-Unmodified-Since"),
    replies={
        200: Reply("The image's metadata", image_schema, headers=("ETag",), image_id="/_id"),
        304: Reply("If-None-Match names the current ETag", headers=("ETag",)),
    },
    errors=(NotFound, PreconditionFailed),
)
def get_image(image_id: str):
    """One image's metadata."""
    record = current_service().get(image_id, caller())
    read_preconditions(record)
    etag = image_etag(record)
    headers = {"ETag": quote_etag(etag)}
    if_none_match = etags("If-None-Match")
    if if_none_match is not None and if_none_match.contains_weak(etag):
        return "", 304, headers
    return image_response(record, headers)


@bp.put("/<id:image_id>")
@describe(
    scope=Scope.WRITE,
    upload=True,
    headers=(
        "If-Match",
        "If-None-Match",
        "If-Unmodified-Since",
        "Idempotency-Key",
        "Content-Encoding",
    ),
    replies={
        200: Reply(
            "Replaced; version is one up", updated_schema, headers=("ETag",), image_id="/image/_id"
        )
    },
    errors=(NotFound, PreconditionFailed, Conflict, *UPLOAD_ERRORS),
)
def replace_image(image_id: str):
    """Replace an image's file."""
    record = current_service().replace(
        image_id, uploaded_file(required=False), preconditions(), idempotency_key(), caller()
    )
    body = updated_schema.dump({"image": record})
    return body, 200, {"ETag": quote_etag(image_etag(record))}


@bp.delete("/<id:image_id>")
@describe(
    scope=Scope.WRITE,
    headers=("If-Match", "If-None-Match", "If-Unmodified-Since"),
    replies={200: Reply("Deleted, with its file", deleted_schema)},
    errors=(NotFound, PreconditionFailed, Conflict, ReadOnly),
)
def delete_image(image_id: str):
    """Delete an image and its file."""
    current_service().delete(image_id, preconditions(), caller())
    return deleted_schema.dump({})
