"""Marshmallow schemas: the JSON clients send and see."""

from __future__ import annotations

import functools
from datetime import UTC

from flask import request, url_for
from marshmallow import EXCLUDE, Schema, fields, post_load, validate

from ..media import CONTENT_TYPES
from ..records import Filters


def _download_url(record) -> str:
    # Absolute, and right behind a proxy once ProxyFix trusts its X-Forwarded-* headers.
    return url_for("downloads.download_image", image_id=record.id, _external=True)


class ImageSchema(Schema):
    """An image's metadata, in the seed's camelCase shape."""

    id = fields.String(data_key="_id")
    image_url = fields.Function(_download_url, data_key="imageUrl")
    uploaded_at = fields.AwareDateTime(data_key="uploadedAt")
    updated_at = fields.AwareDateTime(data_key="updatedAt")
    filename = fields.String()
    content_type = fields.String(data_key="contentType")
    size = fields.Integer()
    width = fields.Integer()
    height = fields.Integer()
    sha256 = fields.String()
    version = fields.Integer()


class UtcDateTime(fields.AwareDateTime):
    """An ISO 8601 date-time in UTC (a bare one is taken as UTC); one that cannot be told
    in UTC (`9999-12-31T23:59:59-23:59`) is invalid, not an overflow."""

    def __init__(self, **kwargs):
        super().__init__(default_timezone=UTC, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            value = value.upper()  # RFC 3339 allows a lower-case "t" and "z"
        try:
            return super()._deserialize(value, attr, data, **kwargs).astimezone(UTC)
        except OverflowError:
            raise self.make_error("invalid", input=value, obj_type=self.OBJ_TYPE) from None


class Digits(fields.Integer):
    """A whole number written in ASCII digits only: not `5_0`, `+5`, ` 1` or `٣`, which
    Python's int() would take."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not (isinstance(value, str) and value.isascii() and value.isdigit()):
            raise self.make_error("invalid", input=value)
        return super()._deserialize(value, attr, data, **kwargs)


class ListQuerySchema(Schema):
    """Query parameters of `GET /api/images`."""

    class Meta:
        unknown = EXCLUDE

    limit = Digits(load_default=50, validate=validate.Range(min=1, max=1000))
    cursor = fields.String(load_default=None, validate=validate.Length(max=200))
    content_type = fields.String(
        data_key="contentType", load_default=None, validate=validate.OneOf(CONTENT_TYPES.values())
    )
    uploaded_after = UtcDateTime(data_key="uploadedAfter", load_default=None)
    uploaded_before = UtcDateTime(data_key="uploadedBefore", load_default=None)

    @post_load
    def make_filters(self, data: dict, **kwargs) -> dict:
        """`limit`, `cursor` and the service's `Filters`."""
        filters = Filters(
            data.pop("content_type"), data.pop("uploaded_after"), data.pop("uploaded_before")
        )
        return {**data, "filters": filters}


def next_page_query(query: dict, cursor: str) -> dict[str, str]:
    """The query string of the page after `query` (as `list_query_schema` loaded it), made
    from the loaded values alone: nothing a client added is echoed into the Link."""
    filters: Filters = query["filters"]
    args = {"limit": str(query["limit"]), "cursor": cursor}
    if filters.content_type:
        args["contentType"] = filters.content_type
    if filters.uploaded_after:
        args["uploadedAfter"] = filters.uploaded_after.isoformat()
    if filters.uploaded_before:
        args["uploadedBefore"] = filters.uploaded_before.isoformat()
    return args


image_schema = ImageSchema()
list_query_schema = ListQuerySchema()


def dump_image(record) -> dict:
    """`image_schema.dump(record)`, memoised: a record never changes (a replace makes a new
    one), so the JSON of one a client keeps fetching is made once per public URL root."""
    return dict(_dump(record, _url_root()))


def dump_images(records) -> list[dict]:
    return [dump_image(record) for record in records]


def _url_root() -> tuple:
    # What url_for(_external=True) builds from (after ProxyFix), read straight from the
    # environ: request.url_root would cost more than the dump it saves.
    environ = request.environ
    return tuple(
        environ.get(name)
        for name in ("wsgi.url_scheme", "HTTP_HOST", "SERVER_NAME", "SERVER_PORT", "SCRIPT_NAME")
    )


@functools.lru_cache(maxsize=4096)
def _dump(record, url_root: tuple) -> dict:
    # `url_root` is only a cache key: the imageUrl built inside depends on it.
    return image_schema.dump(record)
