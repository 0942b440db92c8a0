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


class ListQuerySchema(Schema):
    """Query parameters of `GET /api/images`."""

    class Meta:
        unknown = EXCLUDE

    limit = fields.Integer(load_default=50, validate=validate.Range(min=1, max=1000))
    cursor = fields.String(load_default=None, validate=validate.Length(max=200))
    content_type = fields.String(
        data_key="contentType", load_default=None, validate=validate.OneOf(CONTENT_TYPES.values())
    )
    # A bare date-time is taken as UTC.
    uploaded_after = fields.AwareDateTime(
        data_key="uploadedAfter", load_default=None, default_timezone=UTC
    )
    uploaded_before = fields.AwareDateTime(
        data_key="uploadedBefore", load_default=None, default_timezone=UTC
    )

    @post_load
    def make_filters(self, data: dict, **kwargs) -> dict:
        """`limit`, `cursor` and the service's `Filters`."""
        filters = Filters(
            data.pop("content_type"), data.pop("uploaded_after"), data.pop("uploaded_before")
        )
        return {**data, "filters": filters}


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
