"""Marshmallow schemas: the JSON clients send and see, and the memo of image JSON (a
record never changes, so the JSON of one a client keeps fetching is made once)."""

from __future__ import annotations

import functools
from datetime import UTC

from flask import Response, current_app, request
from marshmallow import (
    EXCLUDE,
    Schema,
    ValidationError,
    fields,
    post_dump,
    post_load,
    pre_load,
    validate,
    validates_schema,
)

from ..media import CONTENT_TYPES
from ..records import ID_PATTERN, Filters
from ..service import current_service
from ..variants import FITS, OUTPUT_FORMATS, Requested
from . import links


class ImageSchema(Schema):
    """An image's metadata, in the seed's camelCase shape."""

    id = fields.String(data_key="_id", required=True, metadata={"pattern": f"^{ID_PATTERN}$"})
    image_url = fields.Function(
        links.image_url,
        data_key="imageUrl",
        required=True,
        metadata={
            "type": "string",
            "format": "uri",
            "description": "Where to download it: a signed URL that needs no key, valid for "
            "SIGNED_URL_TTL (when API keys are on and PUBLIC_READ is not). Its `v` is the "
            "version, for browsers' caches: the URL still downloads the image after a "
            "replace, with the new bytes",
        },
    )
    thumbnail_url = fields.Function(
        links.thumbnail_url,
        data_key="thumbnailUrl",
        required=True,
        metadata={
            "type": "string",
            "format": "uri",
            "description": "A 256x256 variant (cover, format=auto) for a grid of thumbnails; "
            "signed like imageUrl",
        },
    )
    uploaded_at = fields.AwareDateTime(data_key="uploadedAt", required=True)
    updated_at = fields.AwareDateTime(
        data_key="updatedAt", required=True, metadata={"description": "The last replace"}
    )
    filename = fields.String(
        required=True, metadata={"description": "The client's name, sanitised, real extension"}
    )
    content_type = fields.String(
        data_key="contentType", required=True, validate=validate.OneOf(CONTENT_TYPES.values())
    )
    size = fields.Integer(required=True, validate=validate.Range(min=1))
    width = fields.Integer(required=True, validate=validate.Range(min=1))
    height = fields.Integer(required=True, validate=validate.Range(min=1))
    sha256 = fields.String(
        required=True,
        metadata={"pattern": "^[0-9a-f]{64}$", "description": "Of the bytes; also the ETag"},
    )
    version = fields.Integer(
        required=True, validate=validate.Range(min=1), metadata={"description": "+1 per replace"}
    )
    owner = fields.String(
        required=True, metadata={"description": "Whose image: the uploading key's owner"}
    )
    orientation = fields.Integer(
        validate=validate.Range(min=2, max=8),
        metadata={
            "description": "The EXIF orientation the stored file keeps (only when not 1); "
            "width and height are as displayed"
        },
    )
    placeholder = fields.String(
        required=True,
        allow_none=True,
        metadata={
            "pattern": "^#[0-9a-f]{6}$",
            "description": "The average colour of the picture, to paint before it loads "
            "(null: fully transparent, or stored before placeholders existed)",
        },
    )

    @post_dump
    def _orientation_when_turned(self, data: dict, **kwargs) -> dict:
        if data.get("orientation") == 1:
            del data["orientation"]
        return data


def constant(value: str) -> fields.Constant:
    """A string field that always dumps `value` (and is documented as that one value)."""
    return fields.Constant(value, required=True, metadata={"type": "string", "enum": [value]})


class ImageField(fields.Nested):
    """An `ImageSchema` inside an envelope, dumped through `dump_image`'s memo."""

    def __init__(self, **kwargs):
        super().__init__(ImageSchema, **kwargs)

    def _serialize(self, nested_obj, attr, obj, **kwargs):
        if nested_obj is None:
            return None
        if self.many:
            return dump_images(nested_obj)
        return dump_image(nested_obj)


class UploadedSchema(Schema):
    """The body of a 201 from `POST /api/images/upload`."""

    message = constant("Image uploaded successfully")
    image = ImageField(required=True)


class UpdatedSchema(Schema):
    """The body of a 200 from `PUT /api/images/<id>`."""

    message = constant("Image updated successfully")
    image = ImageField(required=True)


class DeletedSchema(Schema):
    """The body of a 200 from `DELETE /api/images/<id>`."""

    message = constant("Image deleted successfully")


class PageSchema(Schema):
    """One page of `GET /api/images`."""

    message = constant("Images fetched successfully")
    total = fields.Integer(required=True, metadata={"description": "How many images match"})
    images = ImageField(many=True, required=True)
    next_cursor = fields.String(
        data_key="nextCursor",
        required=True,
        allow_none=True,
        metadata={"description": "Pass as `cursor` for the next page; null on the last"},
    )


class HealthSchema(Schema):
    status = constant("ok")


class ReadySchema(Schema):
    status = constant("ready")
    backends = fields.Dict(
        keys=fields.String(),
        values=fields.String(),
        required=True,
        metadata={"description": "The backend behind each role, e.g. sqlite and filesystem"},
    )


class UtcDateTime(fields.AwareDateTime):
    """An ISO 8601 date-time in UTC (a bare one is taken as UTC); one that cannot be told
    in UTC (`9999-12-31T23:59:59-23:59`) is invalid, not an overflow."""

    #: Longer than any date-time written sensibly: a bound the document can state.
    MAX_LENGTH = 64

    def __init__(self, **kwargs):
        metadata = {"maxLength": self.MAX_LENGTH, **kwargs.pop("metadata", {})}
        super().__init__(default_timezone=UTC, metadata=metadata, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            if len(value) > self.MAX_LENGTH:
                raise self.make_error("invalid", input=value, obj_type=self.OBJ_TYPE)
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


class DownloadQuerySchema(Schema):
    """Query parameters of `GET /api/images/<id>/download`."""

    class Meta:
        unknown = EXCLUDE

    disposition = fields.String(
        load_default="attachment",
        validate=validate.OneOf(["attachment", "inline"]),
        metadata={"description": "`inline` to show the image in a browser tab"},
    )
    # Read by the signature check, before the view (see `signing`).
    expires = fields.String(
        load_default=None,
        metadata={"pattern": "^[0-9]{1,12}$", "description": "A signed URL's expiry (Unix s)"},
    )
    signature = fields.String(
        load_default=None, metadata={"description": "A signed URL's signature"}
    )
    # A variant: none of these, the original.
    w = Digits(
        validate=validate.Range(min=0),
        metadata={
            "x-maximum-setting": "max_variant_dimension",
            "description": "A variant's width in pixels (0 or absent: follows the height); "
            "at most MAX_VARIANT_DIMENSION (4096 by default), and one of VARIANT_SIZES if set",
        },
    )
    h = Digits(
        validate=validate.Range(min=0),
        metadata={
            "x-maximum-setting": "max_variant_dimension",
            "description": "A variant's height in pixels (0 or absent: follows the width)",
        },
    )
    fit = fields.String(
        validate=validate.OneOf(FITS),
        metadata={
            "description": "With w and h, as CSS object-fit: `contain` keeps the whole picture "
            "inside w x h, `cover` fills w x h and crops the centre, `fill` stretches"
        },
    )
    format = fields.String(
        validate=validate.OneOf([*OUTPUT_FORMATS, "auto"]),
        metadata={
            "description": "A variant's type (default: the original's); `auto` picks AVIF, "
            "then WebP, from what Accept lists, else the original's type (Vary: Accept)"
        },
    )
    q = Digits(
        validate=validate.Range(min=1, max=100),
        metadata={"description": "JPEG, WebP and AVIF quality (ignored for PNG and GIF)"},
    )
    upscale = fields.Boolean(
        truthy={"true", "1"},
        falsy={"false", "0"},
        metadata={"description": "Allow a variant larger than the original (default false)"},
    )

    @pre_load
    def _each_once(self, data, **kwargs):
        """A parameter given twice (`w=1&w=2`) is refused: a cache or proxy in front that
        took the other value would store another picture under the same URL."""
        return _refuse_repeats(data, ("disposition", *VARIANT_PARAMETERS))

    @validates_schema
    def _within_bounds(self, data: dict, **kwargs) -> None:
        if not _asks_variant(data):
            return  # the original: no bound applies
        settings = current_service().settings
        for name in ("w", "h"):
            if data.get(name, 0) > settings.max_variant_dimension:
                raise ValidationError(
                    f"Must be at most {settings.max_variant_dimension} pixels.", name
                )
        allowed = settings.variant_sizes
        size = (data.get("w", 0), data.get("h", 0))
        if allowed and size not in allowed:
            listed = ", ".join(f"{w}x{h}" for w, h in allowed)
            raise ValidationError(
                f"{size[0]}x{size[1]} is not one of the sizes offered: {listed}", "w"
            )

    @post_load
    def _variant(self, data: dict, **kwargs) -> dict:
        """`disposition`, and `variant`: the `Requested` variant, None for the original."""
        variant = None
        if _asks_variant(data):
            variant = Requested(
                width=data.get("w", 0),
                height=data.get("h", 0),
                fit=data.get("fit", "contain"),
                format=data.get("format"),
                quality=data.get("q"),
                upscale=data.get("upscale", False),
            )
        return {"disposition": data["disposition"], "variant": variant}


#: Parameters whose presence asks for a variant rather than the original.
VARIANT_PARAMETERS = ("w", "h", "fit", "format", "q", "upscale")


def _asks_variant(data: dict) -> bool:
    """Whether a download's query names any variant parameter (none: the original)."""
    return any(name in data for name in VARIANT_PARAMETERS)


def _refuse_repeats(data, names):
    """`data` (the query's MultiDict), when it holds each of `names` at most once."""
    for name in names:
        if hasattr(data, "getlist") and len(data.getlist(name)) > 1:
            raise ValidationError("Given more than once.", name)
    return data


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
    owner = fields.String(
        load_default=None,
        validate=validate.Length(min=1, max=200),
        metadata={"description": "An admin key's choice of owner (others see their own)"},
    )

    @pre_load
    def _each_once(self, data, **kwargs):
        """A parameter given twice (`limit=1&limit=2`, `owner=a&owner=b`) is refused, not
        read as its first value: the client meant something the list does not do."""
        return _refuse_repeats(
            data, [field.data_key or name for name, field in self.fields.items()]
        )

    @post_load
    def make_filters(self, data: dict, **kwargs) -> dict:
        """`limit`, `cursor` and the service's `Filters`."""
        filters = Filters(
            data.pop("content_type"),
            data.pop("uploaded_after"),
            data.pop("uploaded_before"),
            data.pop("owner"),
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
    if filters.owner:
        args["owner"] = filters.owner
    return args


image_schema = ImageSchema()
list_query_schema = ListQuerySchema()
download_query_schema = DownloadQuerySchema()
uploaded_schema = UploadedSchema()
updated_schema = UpdatedSchema()
deleted_schema = DeletedSchema()
page_schema = PageSchema()
health_schema = HealthSchema()
ready_schema = ReadySchema()


def dump_image(record) -> dict:
    """`image_schema.dump(record)`, memoised: a record never changes (a replace makes a new
    one), so the JSON of one a client keeps fetching is made once per public URL root and
    signed URLs' expiry."""
    return dict(_dump(record, _url_root(), links.url_expiry()))


def image_response(record, headers: dict) -> Response:
    """One image's metadata as a JSON response: the same bytes `jsonify(dump_image(record))`
    makes, serialized once per memo entry (a client polling an image re-sends them)."""
    body = _dump_json(record, _url_root(), links.url_expiry())
    return current_app.response_class(body, mimetype="application/json", headers=headers)


@functools.lru_cache(maxsize=4096)
def _dump_json(record, url_root: tuple, expires: int | None) -> str:
    return current_app.json.dumps(_dump(record, url_root, expires)) + "\n"


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
def _dump(record, url_root: tuple, expires: int | None) -> dict:
    # `url_root` and `expires` are only cache keys: the imageUrl built inside depends on them.
    return image_schema.dump(record)
