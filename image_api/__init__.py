"""image-api: a small service that stores images in S3 + MongoDB or a directory + SQLite."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from stat import S_ISVTX, S_IWOTH

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from . import access, api, cli, errors, limits, logs, metrics, nginx
from .config import ConfigError, Settings
from .middleware import PublicUrl, ReadableBody, ResponseHeaders
from .records import Clock, utc_now
from .repository import repository_from_settings
from .service import EXTENSION, ImageService
from .signing import UrlSigner
from .storage import storage_from_settings
from .storage.filesystem import directory_mode

log = logging.getLogger(__name__)


class ImageApp(Flask):
    """Flask, with an empty answer to OPTIONS that says so: `Allow` and no body, where
    Flask's claims an empty text/html page."""

    def make_default_options_response(self):
        response = super().make_default_options_response()
        del response.headers["Content-Type"]
        return response


def create_app(overrides: Mapping[str, str] | None = None, clock: Clock = utc_now) -> Flask:
    """Build the app: settings, backends, service, blueprints, error handlers and CLI.

    `overrides` replaces the environment entirely (tests use it so that neither the
    developer's environment nor `.env` leaks in); without it, `.env` and the environment
    are read. `clock` stamps records and decides what `repair` finds old enough.
    """
    settings = (
        Settings.from_mapping(overrides) if overrides is not None else Settings.from_environment()
    )
    app = ImageApp(__name__, static_folder=None)  # no /static: the API serves no files of its own
    # An upload of MAX_UPLOAD_BYTES in its multipart envelope: nginx's limit is the same.
    app.config["MAX_CONTENT_LENGTH"] = nginx.max_body_size(settings)
    app.json.sort_keys = False
    app.wsgi_app = ReadableBody(app.wsgi_app, drain_limit=app.config["MAX_CONTENT_LENGTH"])
    if settings.public_url:
        app.wsgi_app = PublicUrl(app.wsgi_app, settings.public_url)
    elif settings.proxy_hops:
        hops = settings.proxy_hops
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops, x_port=hops)
    app.wsgi_app = ResponseHeaders(app.wsgi_app)
    app.wsgi_app = logs.RequestLog(app.wsgi_app)  # outermost: every request gets its line

    # Every call to either backend is counted and timed (see `metrics`).
    storage = metrics.Measured(storage_from_settings(settings))
    repository = metrics.Measured(repository_from_settings(settings))
    # The embedded default needs no operator step: a local directory and CREATE ... IF NOT
    # EXISTS on a local file are safe and cheap at every start. S3 and MongoDB are set up
    # by `flask init`.
    on_sqlite = settings.metadata_backend == "sqlite"
    if settings.read_only and on_sqlite and not settings.sqlite_path.exists():
        # Read-only writes nothing, a new store included (and a new admin key with it): a
        # mistyped DATA_DIR would otherwise get one, quietly.
        raise ConfigError(
            f"READ_ONLY=true, and DATA_DIR {settings.data_dir} holds no database "
            f"({settings.sqlite_path.name}): none is made while read-only"
        )
    try:
        local = [
            path
            for path, used in (
                (settings.sqlite_path, on_sqlite),
                (settings.blob_dir, settings.blob_backend == "filesystem"),
            )
            if used
        ]
        if local:
            _own_data_dir(settings.data_dir, directory_mode(settings.blob_file_mode))
        for path in local:
            _not_anothers(path, settings.data_dir)
        if settings.blob_backend == "filesystem":
            storage.create()
        if on_sqlite:
            repository.create()
            if settings.auth:
                access.ensure_admin_key(repository, settings.admin_key_path, clock)
        signer = None
        if settings.signs_urls:
            # Settings insist on SECRET_KEY with MongoDB; on SQLite, one is made on first start.
            secret = settings.secret_key or access.ensure_secret_key(settings.secret_key_path)
            signer = UrlSigner(secret, settings.signed_url_ttl, clock)
    except (errors.BackendUnavailable, OSError) as error:
        # A DATA_DIR that cannot be used (a file, read-only, /proc...) is a setting to fix.
        cause = error.__cause__ or error
        raise ConfigError(f"DATA_DIR {settings.data_dir} cannot be used: {cause}") from error
    if not settings.auth:
        log.warning("AUTH=off: every client may read, replace and delete every image")
    app.extensions[EXTENSION] = ImageService(storage, repository, settings, clock, signer)

    errors.init_app(app)
    api.init_app(app, limits.init_app(app, settings))
    cli.init_app(app)
    return app


def _own_data_dir(path: Path, mode: int) -> None:
    """DATA_DIR, made with `mode` when it is new (the blob directories' own: this user's, and
    the group's to pass through when BLOB_FILE_MODE lets it read; not as the umask says:
    under umask 000 every local user could replace its keys). One that every user may write
    is refused."""
    try:
        path.mkdir(mode=0o700, parents=True)
        path.chmod(mode)  # the umask takes bits from mkdir's mode, never from chmod's
    except FileExistsError:
        pass
    mode = path.stat().st_mode
    if mode & S_IWOTH and not mode & S_ISVTX:  # sticky, as /tmp: others cannot replace
        raise ConfigError(
            f"DATA_DIR {path} may be written by every user, who could replace its keys and "
            f"database: chmod o-w {path}"
        )


def _not_anothers(path: Path, data_dir: Path) -> None:
    """The database or the blob directory, when there, as `access.read_secret` wants the
    keys: owned by this user, root or DATA_DIR's owner, and writable by no one else (in a
    shared, sticky DATA_DIR another user could have made them first, and read or change
    every record)."""
    if not path.exists():
        return
    status = path.lstat()
    if access.another_could_write(status, data_dir):
        raise ConfigError(
            f"{path} could have been made or changed by another user (owner uid "
            f"{status.st_uid}, mode {status.st_mode & 0o777:04o}): it must be yours, and "
            "writable by you alone"
        )
