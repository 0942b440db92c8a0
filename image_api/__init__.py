"""image-api: a small service that stores images in S3 + MongoDB or a directory + SQLite."""

from __future__ import annotations

from collections.abc import Mapping

import click
from flask import Flask, current_app
from flask.cli import with_appcontext
from werkzeug.middleware.proxy_fix import ProxyFix

from . import errors, health, images
from .config import Settings
from .repair import repair_command
from .repository import repository_from_settings
from .service import ImageService
from .storage import storage_from_settings

# Room for the multipart envelope around a file of the maximum size.
_MULTIPART_OVERHEAD = 64 * 1024


def create_app(overrides: Mapping[str, str] | None = None) -> Flask:
    """Build the app: settings, backends, blueprints, error handlers and CLI.

    `overrides` replaces the environment entirely (tests use it so that neither the
    developer's environment nor `.env` leaks in); without it, `.env` and the environment
    are read.
    """
    settings = (
        Settings.from_mapping(overrides) if overrides is not None else Settings.from_environment()
    )
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes + _MULTIPART_OVERHEAD
    app.json.sort_keys = False
    if settings.proxy_hops:
        hops = settings.proxy_hops
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops, x_port=hops)

    storage = storage_from_settings(settings)
    repository = repository_from_settings(settings)
    if settings.blob_backend == "filesystem":
        storage.create()  # a local directory: safe and cheap at every start
    if settings.metadata_backend == "sqlite":
        repository.create()  # CREATE ... IF NOT EXISTS on a local file
    app.extensions["image_api"] = ImageService(storage, repository, settings)

    errors.init_app(app)
    app.register_blueprint(images.bp)
    app.register_blueprint(health.bp)
    app.cli.add_command(init_command)
    app.cli.add_command(repair_command)
    return app


@click.command("init")
@with_appcontext
def init_command():
    """Create the bucket or directory, and the tables or indexes (idempotent)."""
    service = current_app.extensions["image_api"]
    service.storage.create()
    service.repository.create()
    click.echo(f"Initialised {service.storage.name} storage and {service.repository.name} metadata")
