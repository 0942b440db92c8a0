"""Settings: the environment (and `.env`) read once into a typed, validated object."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import click
from dotenv import dotenv_values

#: Formats accepted by default, as Pillow names them.
DEFAULT_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "AVIF")
#: Formats this service knows how to sniff and serve; the allow-list picks from these.
KNOWN_FORMATS = DEFAULT_FORMATS


#: A DNS name or IPv4 address, or a bracketed IPv6 address (in a Host header, in nginx's
#: addresses), and a port's digits, which must also be at most 65535.
HOST_PATTERN = r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])"
PORT_PATTERN = r"[1-9][0-9]{0,4}"
#: A browser origin: scheme, host and port, nothing else.
_ORIGIN = re.compile(rf"https?://{HOST_PATTERN}(?::(?P<port>{PORT_PATTERN}))?")
#: What botocore sends as a bucket name (legacy names included); the rest it refuses itself.
_BUCKET = re.compile(r"[A-Za-z0-9._-]{1,255}")
_DAY = 24 * 3600
#: nginx's client_max_body_size takes this and the multipart allowance.
_MAX_UPLOAD = 1 << 40


def fits(pattern: re.Pattern, value: str) -> bool:
    """`value` is all `pattern`, and its `port` group (when it has one) a port: 1 to 65535,
    which PORT_PATTERN's digits alone do not bound."""
    match = pattern.fullmatch(value)
    port = match and match.groupdict().get("port")
    return match is not None and (port is None or int(port) <= 65535)


#: The shortest SECRET_KEY accepted (characters; a generated one has 64).
MIN_SECRET_LENGTH = 32


class ConfigError(click.ClickException):
    """A configuration value is missing, malformed or conflicting.

    A click exception so that a `flask` command (which builds the app first) prints it as
    one line, `Error: ...`, and exits with status 1, instead of a traceback."""


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment."""

    name: str = "image-api"
    # Serving (gunicorn.conf.py reads these).
    host: str = "127.0.0.1"  # gunicorn must not face the internet: nginx goes in front
    port: int = 5000
    # Where nginx listens in front (`flask nginx-config`, `make run-nginx`).
    nginx_port: int = 8080
    web_concurrency: int = 2
    # Threads per worker: a browser asks for six thumbnails at once, and a worker may take
    # them all; renders running or waiting may occupy all threads but one (RENDER_CONCURRENCY).
    gunicorn_threads: int = 8
    gunicorn_timeout: int = 60
    # Every request's backend calls together, compensations included, up to its first
    # response byte; below gunicorn's timeout and nginx's 60 s.
    request_timeout: float = 15.0
    data_dir: Path = Path("data")
    # Blob storage: S3 when a bucket is named, else the data directory.
    s3_bucket_name: str | None = None
    s3_endpoint_url: str | None = None
    aws_region: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = field(default=None, repr=False)
    # Metadata: MongoDB when a URL is given, else SQLite in the data directory.
    mongodb_url: str | None = None
    mongodb_write_concern: str = "majority"
    # Downloads: "proxy" streams the bytes; "redirect" (S3 only) answers 302 to a presigned
    # URL; "accel" (behind nginx, deploy/nginx.conf) answers X-Accel-Redirect and nginx
    # sends the bytes itself.
    download_mode: str = "proxy"
    # Blob files' mode on the embedded default: 0640 lets the group read them (nginx's
    # workers in accel mode, when the service's group is theirs).
    blob_file_mode: int = 0o600
    presign_ttl: int = 300
    # Limits.
    max_upload_bytes: int = 25 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    # All frames of an animation together.
    max_animation_pixels: int = 100_000_000
    # Bytes of decoded pixels one worker holds at once (a 50 MP RGBA image takes 200 MB),
    # and how long an upload waits for room before a 503.
    decode_memory: int = 256 * 1024 * 1024
    decode_wait: float = 5.0
    accepted_formats: tuple[str, ...] = DEFAULT_FORMATS
    # EXIF, XMP, IPTC, comments and text go from what is stored, losslessly (see `strip`).
    strip_metadata: bool = True
    # Variants (`?w=&h=`): the largest side one may have, and an optional allow-list of
    # (w, h) sizes (0: free); empty allows every size up to the bound.
    max_variant_dimension: int = 4096
    variant_sizes: tuple[tuple[int, int], ...] = ()
    # Variants kept per image (the oldest go first), and renders at once per worker.
    max_variants_per_image: int = 32
    render_concurrency: int = 2
    # Network timeouts towards the backends, in seconds.
    backend_connect_timeout: float = 3.0
    backend_read_timeout: float = 10.0
    # Readiness probes (/readyz) give up after this, with no retries.
    probe_timeout: float = 2.0
    # How long a retried request with the same Idempotency-Key gets the first response.
    idempotency_ttl: int = 24 * 3600
    # How long a retry waits for the first request with its key to finish.
    idempotency_wait: float = 10.0
    # How many reverse proxies in front of us may set X-Forwarded-* headers: the one setting
    # that decides what is trusted (gunicorn's own forwarded-header handling is off).
    proxy_hops: int = 0
    # The base URL links (imageUrl, Location, Link) are built from, whatever the request
    # says; and, without it, the Host values accepted (empty: any).
    public_url: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    # API keys are required (off only for trusted networks: every start logs a warning).
    auth: bool = True
    # Browser origins (scheme://host[:port]) allowed to call the API across origins.
    cors_origins: tuple[str, ...] = ()
    # With auth on, imageUrl is a signed download URL (HMAC-SHA256 with SECRET_KEY), valid
    # for at least SIGNED_URL_TTL seconds. On SQLite a secret is generated into DATA_DIR at
    # the first start; with MongoDB (several machines) it must be set, alike everywhere.
    secret_key: str | None = field(default=None, repr=False)
    signed_url_ttl: int = 3600
    # Downloads need no key and no signature: anyone who knows an image's id may fetch it.
    public_read: bool = False
    # Writes are refused (503 read_only, Retry-After) while reads go on: during a migration.
    read_only: bool = False
    # Per API key (per client address when anonymous), over any 60 s or other window.
    rate_limit_write: str = "60/minute"
    rate_limit_read: str = "1200/minute"
    # memory:// (each worker counts alone) or redis://host:port/db (all workers share).
    rate_limit_storage_uri: str = "memory://"

    @property
    def bind(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def signs_urls(self) -> bool:
        """Whether downloads take signed URLs (imageUrl) besides keys."""
        return self.auth and not self.public_read

    # What the embedded default keeps in DATA_DIR.
    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "images.sqlite3"

    @property
    def admin_key_path(self) -> Path:
        """The first admin key's secret (mode 0600), made on a first start with no key."""
        return self.data_dir / "admin-key"

    @property
    def secret_key_path(self) -> Path:
        """The secret signed URLs use when SECRET_KEY is unset (mode 0600)."""
        return self.data_dir / "secret-key"

    @property
    def blob_backend(self) -> str:
        return "s3" if self.s3_bucket_name else "filesystem"

    @property
    def metadata_backend(self) -> str:
        return "mongodb" if self.mongodb_url else "sqlite"

    @classmethod
    def from_mapping(cls, env: Mapping[str, str]) -> Settings:
        """Build settings from environment-style strings; raise ConfigError naming the variable."""
        reader = _Reader(env)
        settings = cls(
            name=reader.text("NAME") or cls.name,
            host=reader.text("HOST") or cls.host,
            port=reader.integer("PORT", cls.port, maximum=65535),
            nginx_port=reader.integer("NGINX_PORT", cls.nginx_port, maximum=65535),
            # gunicorn forks them all at once: a typo's worth of workers fills the machine.
            web_concurrency=reader.integer("WEB_CONCURRENCY", cls.web_concurrency, maximum=256),
            # One thread would leave a render none to spare: every variant a 503.
            gunicorn_threads=reader.integer(
                "GUNICORN_THREADS", cls.gunicorn_threads, minimum=2, maximum=1024
            ),
            gunicorn_timeout=reader.integer("GUNICORN_TIMEOUT", cls.gunicorn_timeout, maximum=_DAY),
            request_timeout=reader.seconds("REQUEST_TIMEOUT", cls.request_timeout),
            data_dir=Path(reader.text("DATA_DIR") or cls.data_dir),
            s3_bucket_name=reader.bucket("S3_BUCKET_NAME"),
            s3_endpoint_url=reader.url("S3_ENDPOINT_URL", schemes=("http", "https")),
            aws_region=reader.text("AWS_REGION"),
            aws_access_key_id=reader.text("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=reader.text("AWS_SECRET_ACCESS_KEY"),
            mongodb_url=reader.url("MONGODB_URL", schemes=("mongodb", "mongodb+srv")),
            mongodb_write_concern=reader.text("MONGODB_WRITE_CONCERN") or cls.mongodb_write_concern,
            download_mode=reader.choice(
                "DOWNLOAD_MODE", ("proxy", "redirect", "accel"), cls.download_mode
            ),
            blob_file_mode=reader.file_mode("BLOB_FILE_MODE", cls.blob_file_mode),
            presign_ttl=reader.integer("PRESIGN_TTL", cls.presign_ttl, maximum=7 * 24 * 3600),
            max_upload_bytes=reader.integer(
                "MAX_UPLOAD_BYTES", cls.max_upload_bytes, maximum=_MAX_UPLOAD
            ),
            max_image_pixels=reader.integer("MAX_IMAGE_PIXELS", cls.max_image_pixels),
            max_animation_pixels=reader.integer("MAX_ANIMATION_PIXELS", cls.max_animation_pixels),
            decode_memory=reader.integer("DECODE_MEMORY", cls.decode_memory),
            decode_wait=reader.seconds("DECODE_WAIT", cls.decode_wait),
            accepted_formats=reader.formats("ACCEPTED_FORMATS", cls.accepted_formats),
            strip_metadata=reader.flag("STRIP_METADATA", cls.strip_metadata),
            max_variant_dimension=reader.integer(
                "MAX_VARIANT_DIMENSION", cls.max_variant_dimension, maximum=16384
            ),
            variant_sizes=reader.sizes("VARIANT_SIZES"),
            max_variants_per_image=reader.integer(
                "MAX_VARIANTS_PER_IMAGE", cls.max_variants_per_image
            ),
            render_concurrency=reader.integer("RENDER_CONCURRENCY", cls.render_concurrency),
            backend_connect_timeout=reader.seconds(
                "BACKEND_CONNECT_TIMEOUT", cls.backend_connect_timeout
            ),
            backend_read_timeout=reader.seconds("BACKEND_READ_TIMEOUT", cls.backend_read_timeout),
            probe_timeout=reader.seconds("PROBE_TIMEOUT", cls.probe_timeout),
            idempotency_ttl=reader.integer(
                "IDEMPOTENCY_TTL", cls.idempotency_ttl, maximum=365 * _DAY
            ),
            proxy_hops=reader.integer("PROXY_HOPS", cls.proxy_hops, minimum=0),
            public_url=reader.url("PUBLIC_URL", schemes=("http", "https")),
            allowed_hosts=reader.hosts("ALLOWED_HOSTS"),
            auth=reader.choice("AUTH", ("on", "off"), "on") == "on",
            cors_origins=reader.origins("CORS_ORIGINS"),
            secret_key=reader.text("SECRET_KEY"),
            signed_url_ttl=reader.integer(
                "SIGNED_URL_TTL", cls.signed_url_ttl, minimum=60, maximum=7 * 24 * 3600
            ),
            public_read=reader.flag("PUBLIC_READ", cls.public_read),
            read_only=reader.flag("READ_ONLY", cls.read_only),
            rate_limit_write=reader.rate("RATE_LIMIT_WRITE", cls.rate_limit_write),
            rate_limit_read=reader.rate("RATE_LIMIT_READ", cls.rate_limit_read),
            rate_limit_storage_uri=(
                cls.rate_limit_storage_uri
                if reader.text("RATE_LIMIT_STORAGE_URI") in (None, "memory://")
                else reader.url("RATE_LIMIT_STORAGE_URI", schemes=("redis", "rediss"))
            ),
        )
        if settings.request_timeout >= settings.gunicorn_timeout:
            raise ConfigError(
                f"REQUEST_TIMEOUT ({settings.request_timeout:g} s) must be below "
                f"GUNICORN_TIMEOUT ({settings.gunicorn_timeout} s)"
            )
        if settings.s3_bucket_name and not settings.aws_region:
            raise ConfigError("AWS_REGION must be set when S3_BUCKET_NAME is set")
        if bool(settings.aws_access_key_id) != bool(settings.aws_secret_access_key):
            raise ConfigError(
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together (or neither, "
                "to use the default AWS credential chain)"
            )
        if settings.download_mode == "redirect" and not settings.s3_bucket_name:
            raise ConfigError("DOWNLOAD_MODE=redirect needs S3 (set S3_BUCKET_NAME)")
        if settings.secret_key is not None and len(settings.secret_key) < MIN_SECRET_LENGTH:
            raise ConfigError(
                f"SECRET_KEY must be at least {MIN_SECRET_LENGTH} characters; make one with: "
                "python3 -c 'import secrets; print(secrets.token_urlsafe(48))'"
            )
        if (
            settings.signs_urls
            and settings.metadata_backend == "mongodb"
            and not settings.secret_key
        ):
            raise ConfigError(
                "SECRET_KEY must be set when AUTH is on with MongoDB (the same value on every "
                "machine: it signs download URLs), unless PUBLIC_READ=true"
            )
        too_large = [
            f"{w}x{h}"
            for w, h in settings.variant_sizes
            if max(w, h) > settings.max_variant_dimension
        ]
        if too_large:
            raise ConfigError(
                f"VARIANT_SIZES lists {', '.join(too_large)}, beyond MAX_VARIANT_DIMENSION "
                f"({settings.max_variant_dimension})"
            )
        if settings.s3_endpoint_url and not settings.s3_bucket_name:
            raise ConfigError("S3_ENDPOINT_URL is set but S3_BUCKET_NAME is not")
        return settings

    @classmethod
    def from_environment(cls, env_file: str | os.PathLike | None = None) -> Settings:
        """Read `.env` (if present) under the real environment, which wins."""
        return cls.from_mapping(environment(env_file))


#: Names the file of settings when it is not `.env`; empty: none (gunicorn's workers, which
#: take what the master read from it: gunicorn.conf.py).
ENV_FILE = "IMAGE_API_ENV_FILE"


def settings_file(under: Mapping[str, str]) -> str:
    """The file of settings the environment `under` names: IMAGE_API_ENV_FILE's, else
    `.env`; empty for none."""
    return under.get(ENV_FILE, ".env")


def environment(
    env_file: str | os.PathLike | None = None, under: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The settings file's values (`env_file`, else IMAGE_API_ENV_FILE's, else `.env`; none
    when it is not there) under `under` (the real environment), which wins: what
    `Settings.from_environment` reads."""
    under = os.environ if under is None else under
    path = env_file if env_file is not None else settings_file(under)
    if path and not Path(path).is_file() and under.get(ENV_FILE):
        # Named, not the default: every setting would quietly fall back to its default.
        raise ConfigError(f"{ENV_FILE} names {path}, which is not a file")
    try:
        values = dotenv_values(path) if path and Path(path).is_file() else {}
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path} cannot be read: {error}") from None
    merged = {k: v for k, v in values.items() if v is not None}
    merged.update(under)
    return merged


_FLAGS = {"true": True, "1": True, "yes": True, "on": True} | {
    "false": False,
    "0": False,
    "no": False,
    "off": False,
}


class _Reader:
    """Small typed getters; an empty value counts as unset."""

    def __init__(self, env: Mapping[str, str]):
        self.env = env

    def text(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None:
            return None
        value = str(value).strip()
        return value or None

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        raw = self.text(name)
        if raw is None:
            return default
        if raw.lower() not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
        return raw.lower()

    def flag(self, name: str, default: bool) -> bool:
        raw = self.text(name)
        if raw is None:
            return default
        value = _FLAGS.get(raw.lower())
        if value is None:
            raise ConfigError(f"{name} must be true or false, got {raw!r}")
        return value

    def integer(self, name: str, default: int, minimum: int = 1, maximum: int | None = None) -> int:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = int(raw.replace("_", ""))
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
        if value < minimum:
            raise ConfigError(f"{name} must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{name} must be at most {maximum}, got {value}")
        return value

    def seconds(self, name: str, default: float) -> float:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from None
        # Below a hundredth of a second, every backend call (or probe) would time out.
        if not 0.01 <= value <= 300:
            raise ConfigError(f"{name} must be between 0.01 and 300 seconds, got {raw}")
        return value

    def url(self, name: str, schemes: tuple[str, ...]) -> str | None:
        raw = self.text(name)
        if raw is None:
            return None
        parts = urlsplit(raw)
        if parts.scheme not in schemes or not parts.netloc:
            # Not the value itself: a URL's password would end up in logs.
            raise ConfigError(f"{name} must be a {' or '.join(schemes)} URL")
        return raw

    def hosts(self, name: str) -> tuple[str, ...]:
        raw = self.text(name)
        if raw is None:
            return ()
        hosts = tuple(h.strip().lower() for h in raw.split(",") if h.strip())
        bad = [h for h in hosts if "/" in h or " " in h]
        if bad:
            raise ConfigError(f"{name} must be comma-separated host[:port] values, got {raw!r}")
        return hosts

    def rate(self, name: str, default: str) -> str:
        from limits import parse_many

        raw = self.text(name)
        if raw is None:
            return default
        try:
            rates = parse_many(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a rate like 60/minute, got {raw!r}") from None
        if any(rate.amount < 1 for rate in rates):
            # Every request a 429, for ever.
            raise ConfigError(f"{name} must allow at least one request, got {raw!r}")
        return raw

    def bucket(self, name: str) -> str | None:
        """A bucket name botocore sends (others it refuses before any request: which read as
        S3 being down); the server may refuse more, which `init` reports as a setting."""
        raw = self.text(name)
        if raw is not None and not fits(_BUCKET, raw):
            raise ConfigError(
                f"{name} must be a bucket name (3-63 lowercase letters, digits, dots and "
                f"hyphens), got {raw!r}"
            )
        return raw

    def origins(self, name: str) -> tuple[str, ...]:
        raw = self.text(name)
        if raw is None:
            return ()
        origins = tuple(o.strip().rstrip("/") for o in raw.split(",") if o.strip())
        for origin in origins:
            # Host and port by the grammar: the origins are written into nginx's config too.
            if not fits(_ORIGIN, origin):
                raise ConfigError(
                    f"{name} must be comma-separated origins like https://app.example.com, "
                    f"got {origin!r}"
                )
        return origins

    def sizes(self, name: str) -> tuple[tuple[int, int], ...]:
        raw = self.text(name)
        if raw is None:
            return ()
        sizes = []
        for item in raw.split(","):
            width, x, height = item.strip().lower().partition("x")
            if not (x and width.isdigit() and height.isdigit() and (width + height).isascii()):
                raise ConfigError(
                    f"{name} must be comma-separated WIDTHxHEIGHT sizes (0: free), like "
                    f"64x64,256x0; got {item.strip()!r}"
                )
            sizes.append((int(width), int(height)))
        return tuple(dict.fromkeys(sizes))

    def file_mode(self, name: str, default: int) -> int:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            mode = int(raw, 8)
        except ValueError:
            mode = -1
        # The owner must read and write; nobody may execute a blob or write another's.
        if not 0 <= mode <= 0o777 or mode & 0o600 != 0o600 or mode & 0o133:
            raise ConfigError(
                f"{name} must be an octal file mode that the owner reads and writes and no one "
                f"else writes or executes, such as 0600 or 0640; got {raw!r}"
            )
        return mode

    def formats(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        raw = self.text(name)
        if raw is None:
            return default
        wanted = tuple(dict.fromkeys(f.strip().upper() for f in raw.split(",") if f.strip()))
        wanted = tuple("JPEG" if f == "JPG" else f for f in wanted)
        unknown = [f for f in wanted if f not in KNOWN_FORMATS]
        if unknown or not wanted:
            raise ConfigError(
                f"{name} must be a comma-separated subset of {', '.join(KNOWN_FORMATS)}, "
                f"got {raw!r}"
            )
        return wanted
