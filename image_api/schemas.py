"""Marshmallow schemas: the JSON clients send and see."""

from __future__ import annotations

from datetime import UTC

from flask import url_for
from marshmallow import EXCLUDE, Schema, fields, validate

from .media import CONTENT_TYPES


def _download_url(record) -> str:
    # Absolute, and right behind a proxy once ProxyFix trusts its X-Forwarded-* headers.
    return url_for("images.download_image", image_id=record.id, _external=True)


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


image_schema = ImageSchema()
images_schema = ImageSchema(many=True)
list_query_schema = ListQuerySchema()
