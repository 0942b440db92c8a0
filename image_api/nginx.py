"""The nginx configuration that fronts the service (deploy/nginx.conf), rendered from the
service's own settings: values such as the body size limit must agree with the service's."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from urllib.parse import urlsplit

from .api import CORS_EXPOSE_HEADERS
from .config import HOST_PATTERN, PORT_PATTERN, Settings, fits
from .middleware import ResponseHeaders
from .storage import BlobStorage

#: Room for the multipart envelope around a file of the maximum size: the service's own
#: limit on a request body is MAX_UPLOAD_BYTES plus this.
MULTIPART_OVERHEAD = 64 * 1024

#: Headers the service sets on a download that nginx would otherwise drop or replace when
#: it serves the bytes itself (X-Accel-Redirect), sent with the bytes only (not on nginx's
#: own errors). Content-Type, Cache-Control and Accept-Ranges it keeps by itself.
ACCEL_HEADERS = (
    "Content-Disposition",  # sent as X-Image-Disposition: nginx's errors must not have it
    "ETag",
    "Last-Modified",
    "X-Content-Type-Options",
    "Content-Security-Policy",
    "Referrer-Policy",
    "Vary",
    "Access-Control-Allow-Origin",
    "Access-Control-Expose-Headers",
    "RateLimit-Limit",
    "RateLimit-Remaining",
    "RateLimit-Reset",
    "X-Request-ID",
)

#: What S3 (or MinIO, moto...) sends with an object that the service does not: its CORS
#: answer to an Origin header, its validators and caching, and its own x-amz-* headers.
#: nginx hides upstream headers by name only.
S3_RESPONSE_HEADERS = (
    "Access-Control-Allow-Origin",
    "Access-Control-Allow-Credentials",
    "Access-Control-Allow-Methods",
    "Access-Control-Allow-Headers",
    "Access-Control-Expose-Headers",
    "Access-Control-Max-Age",
    "Vary",
    "ETag",
    "Last-Modified",
    "Accept-Ranges",
    "Content-Disposition",
    "Content-Language",
    "Cache-Control",
    "Expires",
    "x-amz-request-id",
    "x-amz-id-2",
    "x-amzn-requestid",
    "x-amz-version-id",
    "x-amz-delete-marker",
    "x-amz-expiration",
    "x-amz-restore",
    "x-amz-storage-class",
    "x-amz-replication-status",
    "x-amz-server-side-encryption",
    "x-amz-server-side-encryption-aws-kms-key-id",
    "x-amz-server-side-encryption-bucket-key-enabled",
    "x-amz-server-side-encryption-customer-algorithm",
    "x-amz-server-side-encryption-customer-key-md5",
    "x-amz-website-redirect-location",
    "x-amz-mp-parts-count",
    "x-amz-tagging-count",
    "x-amz-missing-meta",
    "x-amz-object-lock-mode",
    "x-amz-object-lock-retain-until-date",
    "x-amz-object-lock-legal-hold",
    "x-amz-checksum-crc32",
    "x-amz-checksum-crc32c",
    "x-amz-checksum-crc64nvme",
    "x-amz-checksum-sha1",
    "x-amz-checksum-sha256",
    "x-amz-checksum-type",
    "x-amz-sdk-checksum-algorithm",
    "x-amz-content-sha256",
    "x-amz-bucket-region",
    "x-minio-error-code",
    "x-minio-error-desc",
    "X-Xss-Protection",
    "Strict-Transport-Security",
    "X-Content-Type-Options",
    "Content-Security-Policy",
)


@dataclass(frozen=True)
class Frontend:
    """Where nginx listens, where gunicorn is, and (optionally) the user nginx's workers
    run as when it starts as root. Each is checked: it is written into the config as it
    is, so a stray `;` or `}` would add directives of its own."""

    listen: str = "8080"
    upstream: str = "127.0.0.1:5000"
    user: str | None = None

    def __post_init__(self):
        problems = [
            f"--{name} must be {form}, got {value!r}"
            for name, value, pattern, form in (
                ("listen", self.listen, _LISTEN, "a port or host:port"),
                ("upstream", self.upstream, _UPSTREAM, "host:port or unix:/path"),
                ("user", self.user, _USER, "a user name and optionally a group"),
            )
            if value is not None and not fits(pattern, value)
        ]
        if problems:
            raise ValueError("; ".join(problems))


_PORT = rf"(?P<port>{PORT_PATTERN})"
_LISTEN = re.compile(rf"(?:{HOST_PATTERN}:)?{_PORT}")
_UPSTREAM = re.compile(rf"{HOST_PATTERN}:{_PORT}|unix:/[^\s;{{}}'\"\\]+")
_USER = re.compile(r"[A-Za-z0-9._-]+(?: [A-Za-z0-9._-]+)?")


def max_body_size(settings: Settings) -> int:
    """The largest request body the service reads: an upload of MAX_UPLOAD_BYTES in its
    multipart envelope."""
    return settings.max_upload_bytes + MULTIPART_OVERHEAD


def render(settings: Settings, storage: BlobStorage, frontend: Frontend, source: str) -> str:
    """deploy/nginx.conf for `settings` (`source` says where they came from)."""
    template = resources.files(__package__).joinpath("nginx.conf.template").read_text()
    values = {
        "SOURCE": source,
        "USER": f"user {frontend.user};" if frontend.user else "",
        "UPSTREAM": frontend.upstream,
        "LISTEN": frontend.listen,
        "MAX_UPLOAD_BYTES": str(settings.max_upload_bytes),
        "CLIENT_MAX_BODY_SIZE": str(max_body_size(settings)),
        "REQUEST_TIMEOUT": f"{settings.request_timeout:g}",
        # Above the service's budget, up to gunicorn's own timeout.
        "PROXY_TIMEOUT": str(max(settings.gunicorn_timeout, int(settings.request_timeout) + 5)),
        "BLOB_ROOT": _blob_root(settings),
        "ACCEL_HEADERS": _accel_headers(),
        "JSON_HEADERS": _json_headers(settings),
        "CORS_MAPS": _cors_maps(settings),
        "S3_UPSTREAM": "",
        "S3_LOCATION": "",
    }
    if settings.blob_backend == "s3":
        values.update(_s3_parts(settings, storage))
    text = template
    for name, value in values.items():
        text = text.replace("{{" + name + "}}", value)
    if "{{" in text:
        raise ValueError(
            f"unfilled placeholder in the nginx template: {text[text.index('{{') :][:40]}"
        )
    return text


def _blob_root(settings: Settings) -> str:
    """The blob directory for `alias`, in double quotes (spaces, `;` and braces are then
    plain characters): a quote or a backslash would end or escape the string, and `$` names
    a variable there."""
    root = str(settings.blob_dir.resolve())
    if not fits(_PATH, root):
        raise ValueError(
            f"DATA_DIR {root!r} cannot be written into nginx's config: use a path without "
            "quotes, backslashes, $ or control characters"
        )
    return root


_PATH = re.compile(r'/[^"\\$\x00-\x1f\x7f]*')


def _json_headers(settings: Settings, indent: str = " " * 12) -> str:
    """The headers of nginx's own JSON answers (its errors, /metrics): the service's
    security headers (`ResponseHeaders`), and with CORS_ORIGINS the CORS headers an allowed
    origin gets from the service: without them, a browser app could not read a 413."""
    headers = [*ResponseHeaders.HEADERS, ("Content-Security-Policy", ResponseHeaders.JSON_POLICY)]
    lines = [f'add_header {name} "{value}" always;' for name, value in headers]
    if settings.cors_origins:
        lines += [
            "add_header Access-Control-Allow-Origin $image_api_cors_origin always;",
            "add_header Access-Control-Expose-Headers $image_api_cors_expose always;",
            "add_header Vary Origin always;",
        ]
    return "\n".join(indent + line for line in lines)


def _cors_maps(settings: Settings, indent: str = " " * 4) -> str:
    """With CORS_ORIGINS: the request's Origin when it is allowed (else empty, and nginx
    sends no header), and what such an origin may read. (Origins are checked against the
    host and port grammar when read: nothing in them can end a string here.)"""
    if not settings.cors_origins:
        return ""
    lines = ["map $http_origin $image_api_cors_origin {", '    default "";']
    lines += [f'    "{origin}" $http_origin;' for origin in settings.cors_origins]
    lines += ["}", "map $image_api_cors_origin $image_api_cors_expose {"]
    exposed = ", ".join(sorted(CORS_EXPOSE_HEADERS))  # as flask-cors lists them
    lines += ['    "" "";', f'    default "{exposed}";', "}"]
    return "\n".join(indent + line for line in lines) + "\n"


def _accel_headers(indent: str = " " * 12) -> str:
    """The service's download headers, kept by `set` before any proxying (after it,
    $upstream_http_* would name S3's), and sent with the bytes; nginx's own validators off."""
    lines = ["etag off;", "if_modified_since off;"]
    for name in ACCEL_HEADERS:
        variable = name.lower().replace("-", "_")
        upstream = "x_image_disposition" if name == "Content-Disposition" else variable
        lines.append(f"set $image_{variable} $upstream_http_{upstream};")
    for name in ACCEL_HEADERS:
        variable = name.lower().replace("-", "_")
        lines.append(f"add_header {name} $image_{variable};")
    return "\n".join(indent + line for line in lines)


def _hidden(names, indent: str = " " * 12) -> str:
    return "\n".join(f"{indent}proxy_hide_header {name};" for name in names)


def _s3_parts(settings: Settings, storage: BlobStorage) -> dict[str, str]:
    """The S3 endpoint presigned URLs point at (signing is local: no request is made)."""
    url = urlsplit(storage.presigned_url("0" * 32, 60, "image/png", "attachment"))
    scheme, host = url.scheme, url.netloc
    port = url.port or (443 if scheme == "https" else 80)
    server = f"{url.hostname}:{port}"
    tls = ""
    if scheme == "https":
        tls = (
            f"\n            proxy_ssl_server_name on;\n            proxy_ssl_name {url.hostname};"
            "\n            proxy_ssl_verify on;"
            "\n            proxy_ssl_trusted_certificate /etc/ssl/certs/ca-certificates.crt;"
        )
    location = f"""
        # S3: the service names a presigned URL's path and query, after the range it decided
        # (`-`: none); nginx fetches exactly that from the bucket and sends it on.
        location ~ ^/_accel/s3/(?<accel_range>[^/]+)/(?<accel_object>.*)$ {{
            internal;
{_accel_headers()}
            set $accel_range_header "";
            if ($accel_range != "-") {{
                set $accel_range_header $accel_range;
            }}
            proxy_method GET;
            proxy_pass {scheme}://image_api_s3/$accel_object$is_args$args;
            # Nothing of the client's request reaches the bucket (its Origin, key, cookies,
            # conditions): only what the presigned URL needs and the range decided.
            proxy_pass_request_headers off;
            proxy_set_header Host {host};
            proxy_set_header Connection "";
            proxy_set_header Range $accel_range_header;
            proxy_headers_hash_bucket_size 128;  # room for the longest names hidden
{_hidden(S3_RESPONSE_HEADERS)}
            # The bucket's errors in the service's words: a missing object is a 404 (S3
            # answers 403 for one when its credentials may not list the bucket, and moto
            # for a presigned URL with response headers); any other refusal, a failure or
            # no answer within the service's own budget is a 503 backend_unavailable (not
            # the 503 that says gunicorn is down).
            proxy_connect_timeout {settings.backend_connect_timeout:g}s;
            proxy_read_timeout {settings.request_timeout:g}s;
            proxy_intercept_errors on;
            error_page 403 404 =404 /_errors/gone;
            error_page 400 401 405 409 412 416 500 502 503 504 =503 /_errors/backend;{tls}
        }}"""
    upstream = f"""
    upstream image_api_s3 {{
        server {server};
        keepalive 8;
    }}"""
    return {"S3_UPSTREAM": upstream, "S3_LOCATION": location}
