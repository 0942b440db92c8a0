"""The OpenAPI 3.1 description, built from what the views declare.

Each view carries `@describe(...)`: the schemas it loads and dumps, the request headers it
reads, the headers it sets, and the `ApiError` classes it may raise. `build_document` walks
the app's URL map and turns those into paths with apispec's marshmallow plugin, so a route
without a description stops the build, and an error's status, code and message come from its
class. Responses carry examples dumped by the same schemas from one real image.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Flask, Request, current_app
from marshmallow import Schema

from ..access import Scope
from ..config import Settings
from ..errors import (
    ApiError,
    BackendUnavailable,
    BadRequest,
    Forbidden,
    InvalidSignature,
    RateLimited,
    SignatureExpired,
    Unauthorized,
    error_codes,
    error_schema,
)
from ..media import CONTENT_TYPES
from ..records import ID_PATTERN, ImageRecord
from ..service import EXTENSION
from . import schemas
from .conditions import ETAG_LIST

TITLE = "image-api"
VERSION = "1.0.0"


@dataclasses.dataclass(frozen=True)
class Reply:
    """One documented non-error response of an operation."""

    description: str
    schema: Schema | dict | None = None  # a JSON body dumped by this schema (or a JSON Schema)
    binary: bool = False  # the image's own bytes
    text: str | None = None  # a text body of this media type (the metrics)
    headers: tuple[str, ...] = ()  # names in RESPONSE_HEADERS
    image_id: str | None = None  # JSON pointer to an image id in the body: links follow it
    to_head: bool = True  # also a HEAD's answer (for operations that document HEAD)


@dataclasses.dataclass(frozen=True)
class Operation:
    """What one view takes and gives, and the scope a key needs for it (None: public)."""

    scope: Scope | None
    replies: dict[int, Reply]
    errors: tuple[type[ApiError], ...] = ()
    query: Schema | None = None
    headers: tuple[str, ...] = ()  # request headers it reads, names in REQUEST_HEADERS
    upload: bool = False  # a multipart body with the file in field `image`
    head: bool = False  # HEAD is answered on purpose (Flask answers it for every GET)
    backends: bool = True  # it calls a backend, so it may answer 503
    limited: bool = True  # it spends the client's read or write budget (RATE_LIMIT_*)
    signed: bool = False  # a signed URL (imageUrl) reads it too; PUBLIC_READ opens it


def describe(**operation) -> Callable:
    """Declare what a view takes and gives (see `Operation`)."""

    def decorate(view):
        view.openapi = Operation(**operation)
        return view

    return decorate


def current_operation(req: Request) -> Operation | None:
    """What the view serving `req` declared (None: no route, or undocumented)."""
    endpoint = req.endpoint
    view = current_app.view_functions.get(endpoint) if endpoint else None
    return getattr(view, "openapi", None)


def undocumented(view):
    """Leave a route out of the document on purpose (the docs page and its assets)."""
    view.openapi = None
    return view


PATH_PARAMETERS = {
    "image_id": {
        "description": "The image's `_id`; a malformed one is simply not found (404)",
        "schema": {"type": "string", "pattern": f"^{ID_PATTERN}$"},
    },
}

_ETAG = {"type": "string", "pattern": '^(W/)?"[^"]*"$'}
_HTTP_DATE = {"type": "string", "description": "An HTTP date (RFC 9110 5.6.7)"}
_ETAG_LIST = {
    "type": "string",
    "pattern": f"^{ETAG_LIST}$",
    "examples": ['"ffe89a0ab0e94114e10777e7313d7fa83d634e34ebc2ea7479085cffa504c920"', "*"],
}

REQUEST_HEADERS = {
    "If-Match": {
        "description": "Act only if the image's current ETag is listed (or `*`); else 412. "
        "Not `*` or a list of quoted entity tags: 400",
        "schema": _ETAG_LIST,
    },
    "If-None-Match": {
        "description": "A GET answers 304 when the current ETag is listed; a write with "
        "`*` or a listed ETag answers 412. Not `*` or a list of quoted entity tags: 400",
        "schema": _ETAG_LIST,
    },
    "If-Modified-Since": {
        "description": "304 if the image was not replaced since (ignored with If-None-Match, "
        "and when not an HTTP date, as RFC 9110 requires)",
        "schema": _HTTP_DATE,
    },
    "If-Unmodified-Since": {
        "description": "412 if the image was replaced since (ignored with If-Match, and "
        "when not an HTTP date)",
        "schema": _HTTP_DATE,
    },
    "Range": {
        "description": "One byte range (`bytes=0-99`, `bytes=100-`, `bytes=-100`): 206; "
        "past the end: 416. Several ranges, or one that does not parse, get the whole image",
        "schema": {"type": "string"},
    },
    "If-Range": {
        "description": "Honour Range only if this strong ETag or HTTP date is current "
        "(else, or when it does not parse, the whole image)",
        "schema": {"type": "string"},
    },
    "Accept": {
        "description": "With format=auto: `image/avif` listed picks AVIF, else `image/webp` "
        "WebP, else the original's type (wildcards name neither)",
        "schema": {"type": "string"},
    },
    "Idempotency-Key": {
        "description": "Retry safely: the same key and request within IDEMPOTENCY_TTL get "
        "the first response; the same key with another request gets 422",
        "schema": {
            "type": "string",
            "minLength": 1,
            "maxLength": 255,
            "pattern": "^[ -~]+$",
            "examples": ["4f9c2a7e-upload-cat"],
        },
    },
    "Content-Encoding": {
        "description": "Compressed request bodies are refused (415)",
        "schema": {"type": "string", "enum": ["identity"]},
    },
}

RESPONSE_HEADERS = {
    "ETag": {"description": "The image's sha256, a strong validator", "schema": _ETAG},
    "Location": {"description": "Where the resource is", "schema": {"type": "string"}},
    "Link": {
        "description": 'The next page: `<url>; rel="next"` (absent on the last page)',
        "schema": {"type": "string"},
    },
    "Retry-After": {"description": "Seconds to wait", "schema": {"type": "string"}},
    "Last-Modified": {"description": "When the image was last replaced", "schema": _HTTP_DATE},
    "Cache-Control": {
        "description": "`no-cache`: revalidate; `private` too unless downloads are public",
        "schema": {"type": "string"},
    },
    "Content-Disposition": {
        "description": "attachment or inline, with the original filename (RFC 6266)",
        "schema": {"type": "string"},
    },
    "Accept-Ranges": {"description": "`bytes`", "schema": {"type": "string"}},
    "WWW-Authenticate": {"description": "`Bearer`: send an API key", "schema": {"type": "string"}},
    "Content-Range": {"description": "`bytes start-end/size`", "schema": {"type": "string"}},
    "X-Content-Type-Options": {"description": "`nosniff`", "schema": {"type": "string"}},
    "Content-Security-Policy": {
        "description": "Stored bytes never run as a page",
        "schema": {"type": "string"},
    },
}

#: Two ways to send an API key; `flask --app image_api keys create` makes one.
KEY_SCHEMES = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "`Authorization: Bearer iak_...`. Scopes: read; write (includes "
        "read); admin (includes both, and sees every owner's images)",
    },
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
}
#: Downloads also take the signed URL an image's `imageUrl` is.
SIGNED_URL_SCHEME = {
    "signedUrl": {
        "type": "apiKey",
        "in": "query",
        "name": "signature",
        "description": "`imageUrl` as given: its `expires` and `signature` (HMAC-SHA256 of the "
        "path, expiry and other parameters) open the download to anyone until it expires, "
        "without a key; changing any parameter makes it invalid. With PUBLIC_READ=true "
        "downloads need neither.",
    }
}

#: Headers any response may carry, listed once here rather than on every response.
EVERY_RESPONSE_HEADERS = {
    "X-Content-Type-Options": {"description": "`nosniff`"},
    "Referrer-Policy": {"description": "`no-referrer`"},
    "Content-Security-Policy": {
        "description": "On JSON: `default-src 'none'`; downloads and the docs page have their own"
    },
    "Vary": {
        "description": "`Origin` when CORS_ORIGINS is set; `Accept` on a download with format=auto"
    },
    "RateLimit-Limit": {"description": "Requests allowed in the window (rate-limited routes)"},
    "RateLimit-Remaining": {"description": "Requests left in the window"},
    "RateLimit-Reset": {"description": "Seconds until the window has room again"},
    "Access-Control-Allow-Origin": {"description": "An origin in CORS_ORIGINS, echoed"},
    "Access-Control-Expose-Headers": {"description": "The headers a browser script may read"},
    "X-Request-ID": {
        "description": "The request's id, as in the service's log: the client's own "
        "X-Request-ID when it is 1-128 of `A-Za-z0-9._:@/+=-`, else a new one"
    },
}

#: Headers of every download response, full, partial or not modified.
DOWNLOAD_HEADERS = (
    "ETag",
    "Last-Modified",
    "Cache-Control",
    "Content-Disposition",
    "Accept-Ranges",
    "X-Content-Type-Options",
    "Content-Security-Policy",
)

#: The headers an error response may carry, by status.
ERROR_HEADERS = {
    503: ("Retry-After",),
    416: ("Content-Range",),
    401: ("WWW-Authenticate",),
    429: ("Retry-After",),
}

#: The image every example shows: what uploading ../shared/samples/valid/hopper.jpg answered.
EXAMPLE_IMAGE = ImageRecord(
    id="6b074b12492739cfcab89a3e",
    key="0" * 32,
    filename="hopper.jpg",
    content_type="image/jpeg",
    size=6412,
    width=128,
    height=128,
    sha256="ffe89a0ab0e94114e10777e7313d7fa83d634e34ebc2ea7479085cffa504c920",
    version=1,
    uploaded_at=datetime(2026, 11, 25, 20, 54, 42, 589000, tzinfo=UTC),
    updated_at=datetime(2026, 11, 25, 20, 54, 42, 589000, tzinfo=UTC),
)
EXAMPLE_HOST = "https://images.example.com"

#: What each response schema is handed to dump its example (schemas of constants need none).
EXAMPLES = {
    schemas.ImageSchema: EXAMPLE_IMAGE,
    schemas.UploadedSchema: {"image": EXAMPLE_IMAGE},
    schemas.UpdatedSchema: {"image": EXAMPLE_IMAGE},
    schemas.PageSchema: {"total": 1, "images": [EXAMPLE_IMAGE], "next_cursor": None},
    schemas.ReadySchema: {"backends": {"repository": "sqlite", "storage": "filesystem"}},
}


def build_document(app: Flask) -> dict:
    """The OpenAPI document of every route `app` serves."""
    spec = APISpec(
        title=TITLE,
        version=VERSION,
        openapi_version="3.1.0",
        plugins=[MarshmallowPlugin(schema_name_resolver=_schema_name)],
        info={
            "description": "Stores images for web clients, curl scripts and other services. "
            'Every error is JSON: `{"message", "code"}`.',
            "license": {"name": "Proprietary", "identifier": "LicenseRef-Proprietary"},
        },
    )
    spec.components.schema("Error", schema=type(error_schema))
    for name, scheme in (KEY_SCHEMES | SIGNED_URL_SCHEME).items():
        spec.components.security_scheme(name, scheme)
    with app.test_request_context(base_url=EXAMPLE_HOST):
        for rule in sorted(app.url_map.iter_rules(), key=lambda rule: rule.rule):
            view = app.view_functions[rule.endpoint]
            if not hasattr(view, "openapi"):
                raise LookupError(
                    f"{rule.rule} ({rule.endpoint}) has no @describe: every route is documented"
                )
            if view.openapi is None:
                continue
            operations = {
                method.lower(): _operation(view, rule, method)
                for method in sorted(rule.methods - {"HEAD", "OPTIONS"})
            }
            if view.openapi.head:
                operations["head"] = _operation(view, rule, "HEAD")
            spec.path(path=path_template(rule.rule), operations=operations)
    document = spec.to_dict()
    document["x-every-response-headers"] = EVERY_RESPONSE_HEADERS
    document["components"]["schemas"]["Error"]["properties"]["code"]["enum"] = error_codes()
    for operations in document["paths"].values():
        for operation in operations.values():
            for parameter in operation["parameters"]:
                if parameter["in"] == "query":
                    _not_null(parameter["schema"])
                    _bounded_by_settings(parameter["schema"], app.extensions[EXTENSION].settings)
    return document


#: A schema property naming the setting whose value is this deployment's maximum.
MAXIMUM_SETTING = "x-maximum-setting"


def _bounded_by_settings(schema: dict, settings: Settings) -> None:
    """The document states this deployment's bounds (MAX_VARIANT_DIMENSION, say)."""
    if (name := schema.pop(MAXIMUM_SETTING, None)) is not None:
        schema["maximum"] = getattr(settings, name)


def _not_null(schema: dict) -> None:
    """A query parameter is absent or a string: marshmallow's `load_default=None` (which
    implies `allow_none`) is not a `null` a client can send."""
    if isinstance(schema.get("type"), list):
        schema["type"] = next(kind for kind in schema["type"] if kind != "null")
    if "enum" in schema:
        schema["enum"] = [value for value in schema["enum"] if value is not None]
    if schema.get("default", "") is None:
        del schema["default"]


_PATH_VARIABLE = re.compile(r"<(?:[a-z]+:)?([A-Za-z_]+)>")


def path_template(rule: str) -> str:
    """The document's path for a Werkzeug rule: `/a/<id:image_id>` -> `/a/{image_id}`."""
    return _PATH_VARIABLE.sub(r"{\1}", rule)


def operation_id(view, method: str) -> str:
    """`create_image` -> `createImage`; a HEAD gets its own id: `downloadImageHead`."""
    first, *rest = view.__name__.split("_")
    name = first + "".join(word.title() for word in rest)
    return name + "Head" if method == "HEAD" else name


def _operation(view, rule, method: str) -> dict:
    spec: Operation = view.openapi
    summary, _, description = (inspect.getdoc(view) or "").partition("\n")
    parameters = [
        {"name": name, "in": "path", "required": True, **PATH_PARAMETERS[name]}
        for name in sorted(rule.arguments)
    ]
    if spec.query is not None:
        parameters.append({"in": "query", "schema": spec.query})
    parameters += [
        {"name": name, "in": "header", "required": False, **REQUEST_HEADERS[name]}
        for name in spec.headers
    ]
    operation = {
        "operationId": operation_id(view, method),
        "summary": summary,
        "tags": [view.__module__.rpartition(".")[2]],
        "parameters": parameters,
        "responses": {
            str(status): _reply(reply, method)
            for status, reply in sorted(spec.replies.items())
            if method != "HEAD" or reply.to_head
        }
        | _error_responses(spec),
    }
    # gunicorn (and nginx in front of it) refuse what is not valid HTTP, or is over their
    # limits, before the service sees it: in the same JSON shape (a 400 is `bad_request`).
    operation["responses"] |= _SERVER_REFUSALS
    if spec.scope is not None:
        # OpenAPI 3.1 lets a requirement of any scheme list roles: the scope a key needs.
        operation["security"] = [{name: [str(spec.scope)]} for name in KEY_SCHEMES]
        if spec.signed:
            operation["security"] += [{name: []} for name in SIGNED_URL_SCHEME]
    if description.strip():
        operation["description"] = description.strip()
    if spec.upload:
        operation["requestBody"] = _UPLOAD_BODY
    return operation


def _reply(reply: Reply, method: str) -> dict:
    response: dict = {"description": reply.description}
    if reply.headers:
        response["headers"] = {name: RESPONSE_HEADERS[name] for name in reply.headers}
    if method != "HEAD" and isinstance(reply.schema, dict):
        response["content"] = {"application/json": {"schema": reply.schema}}
    elif method != "HEAD" and reply.schema is not None:
        example = reply.schema.dump(EXAMPLES.get(type(reply.schema), {}))
        response["content"] = {"application/json": {"schema": reply.schema, "example": example}}
    elif method != "HEAD" and reply.binary:
        binary = {"schema": {"type": "string", "contentMediaType": "application/octet-stream"}}
        response["content"] = {content_type: binary for content_type in CONTENT_TYPES.values()}
    elif method != "HEAD" and reply.text is not None:
        response["content"] = {reply.text: {"schema": {"type": "string"}}}
    if reply.image_id is not None:
        response["links"] = {
            name: {
                "operationId": target,
                "parameters": {"image_id": f"$response.body#{reply.image_id}"},
            }
            for name, target in _IMAGE_LINKS.items()
        }
    return response


#: Where an image id in a response leads.
_IMAGE_LINKS = {
    "GetImage": "getImage",
    "ReplaceImage": "replaceImage",
    "DownloadImage": "downloadImage",
    "DownloadImageHead": "downloadImageHead",
    "DeleteImage": "deleteImage",
}


def _error_responses(spec: Operation) -> dict:
    # ApiError itself is the 500 of a bug; any request can be malformed (a bad Host, an
    # unreadable body).
    errors = [ApiError, BadRequest, *spec.errors]
    if spec.scope is not None:
        errors.append(Unauthorized)
    if spec.scope not in (None, Scope.READ):  # every key holds read
        errors.append(Forbidden)
    if spec.signed:
        errors += [InvalidSignature, SignatureExpired]
    if spec.backends:
        errors.append(BackendUnavailable)
    if spec.limited:
        errors.append(RateLimited)
    by_status = defaultdict(dict)
    for error in errors:
        by_status[error.status].setdefault(error.code, error)
    responses = {}
    for status, classes in sorted(by_status.items()):
        codes = sorted(classes)
        response = {
            "description": "; ".join(f"`{code}`: {classes[code].message}" for code in codes),
            "content": {
                "application/json": {
                    "schema": {
                        "allOf": [{"$ref": "#/components/schemas/Error"}],
                        "properties": {"code": {"enum": codes}},
                    },
                    "examples": {
                        code: {"value": {"message": classes[code].message, "code": code}}
                        for code in codes
                    },
                }
            },
        }
        if status in ERROR_HEADERS:
            response["headers"] = {name: RESPONSE_HEADERS[name] for name in ERROR_HEADERS[status]}
        responses[str(status)] = response
    return responses


#: What gunicorn refuses itself, before the service sees the request (gunicorn.conf.py has
#: it answer in the service's JSON shape; nginx in front refuses the same first, in JSON).
_SERVER_REFUSALS = {
    str(status): {
        "description": f"`{code}`: {what}, refused before the service sees the request",
        "content": {
            "application/json": {
                "schema": {
                    "allOf": [{"$ref": "#/components/schemas/Error"}],
                    "properties": {"code": {"enum": [code]}},
                }
            }
        },
    }
    for status, code, what in [
        (414, "uri_too_long", "A request line over 4094 bytes"),
        (417, "expectation_failed", "An Expect header other than 100-continue"),
        (431, "headers_too_large", "A header over 8190 bytes, or over 100 headers"),
    ]
}

_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["image"],
                "properties": {
                    "image": {
                        "type": "string",
                        "contentMediaType": "application/octet-stream",
                        "description": "JPEG, PNG, GIF, WebP or AVIF, told by its bytes "
                        "(not by the part's Content-Type or filename); the filename is "
                        "kept for downloads",
                    }
                },
            },
        }
    },
}


def _schema_name(schema) -> str:
    cls = schema if isinstance(schema, type) else type(schema)
    return cls.__name__.removesuffix("Schema") or cls.__name__
