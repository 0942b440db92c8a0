"""Operator commands: `flask --app image_api init | keys | repair | strip-metadata |
migrate | nginx-config`."""

from __future__ import annotations

import functools
import json
import sys
import unicodedata
from datetime import timedelta
from pathlib import Path

import click
from flask import Flask
from flask.cli import with_appcontext

from . import access, backup, nginx
from . import migrate as migration
from .config import ConfigError
from .errors import (
    ApiError,
    BackendUnavailable,
    Conflict,
    NotFound,
    PreconditionFailed,
    Unauthorized,
)
from .records import Status
from .repair import Implausible, repair
from .repository import scan_all
from .service import current_service


def _in_one_line(run):
    """A backend that is down or refuses stops the command with one line, its error and
    the cause, not a traceback: what it wrote is whole (each write is atomic), and it can
    run again. With `--json`, that line is JSON on stdout too (`{"error": ...}`), where a
    script reads the report."""

    @functools.wraps(run)
    def guarded(*args, **kwargs):
        try:
            try:
                return run(*args, **kwargs)
            except ApiError as error:
                cause = f": {error.__cause__}" if error.__cause__ else ""
                message = f"{_command_name()} stopped: {error.message}{cause}"
                raise click.ClickException(message) from None
        except click.ClickException as error:
            if not kwargs.get("as_json"):
                raise
            click.echo(json.dumps({"error": error.format_message()}))
            sys.exit(error.exit_code)

    return guarded


def _command_name() -> str:
    """`keys create`, `repair`...: the command as typed after `flask`."""
    names, context = [], click.get_current_context()
    while context.parent is not None:
        names.append(context.info_name)
        context = context.parent
    return " ".join(reversed(names))


@click.command("init")
@with_appcontext
@_in_one_line
def init_command():
    """Create the bucket or directory, and the tables or indexes (idempotent)."""
    service = current_service()
    service.storage.create()
    service.repository.create()
    click.echo(f"Initialised {service.storage.name} storage and {service.repository.name} metadata")
    if not service.settings.auth:
        click.echo("AUTH=off: no API key is needed (trusted networks only)")
        return
    path = access.ensure_admin_key(
        service.repository, service.settings.admin_key_path, service.clock
    )
    if path is not None:
        click.echo(_admin_key_note(service.repository, path))


def _admin_key_note(repository, path) -> str:
    """For the operator at the terminal (`make run` shows it): the admin key's secret until
    it is first used, so a newcomer can curl at once; then only where it is kept (the
    output of every later start may end up in a log)."""
    secret = access.read_secret(path)
    try:
        key = repository.get_api_key(access.parse_secret(secret)[0])
    except Unauthorized:
        key = None
    if key is None or key.revoked_at is not None:
        return (
            f"The admin key in {path} is revoked or unknown: make another with "
            "`flask --app image_api keys create --scope admin ...`"
        )
    if key.last_used_at is None:
        return f"Admin API key (kept in {path}): {secret}"
    return f"Admin API key: kept in {path}"


class _Name(click.ParamType):
    """A key's name or owner: 1 to 200 printable characters (what the API's `?owner=` can
    ask for), in Unicode's composed form (NFC), so that a name typed either way is one
    name. Spaces around it are refused, not trimmed: `a` with a no-break space after it
    would have joined owner `a` without a word."""

    name = "name"

    def convert(self, value, param, ctx):
        value = unicodedata.normalize("NFC", str(value))
        if not 1 <= len(value) <= 200 or not value.isprintable():
            self.fail(f"{value!r} is not 1 to 200 printable characters", param, ctx)
        if value != value.strip():
            self.fail(f"{value!r} has spaces at its start or end", param, ctx)
        return value


_NAME = _Name()


@click.group("keys")
def keys_group():
    """Create, list and revoke API keys."""


@keys_group.command("create")
@click.option("--name", required=True, type=_NAME, help="A unique name for the key.")
@click.option(
    "--owner",
    required=True,
    type=_NAME,
    help="Whose images the key sees (keys may share one).",
)
@click.option(
    "--scope",
    "scopes",
    type=click.Choice([str(scope) for scope in access.Scope]),
    multiple=True,
    default=["read"],
    show_default=True,
    help="read; write (includes read); admin (includes both, and every owner). Repeatable.",
)
@with_appcontext
@_in_one_line
def create_key_command(name: str, owner: str, scopes: tuple[str, ...]):
    """Create a key and print its secret, once: it is stored only as a hash."""
    _refuse_when_read_only("keys create")
    try:
        key, secret = current_service().keys.create(name, owner, scopes)
    except Conflict:
        raise click.ClickException(
            f"An API key named {name!r} exists (or existed: a revoked key keeps its name, so "
            "logs and `keys list` never mean two keys by one); choose another name"
        ) from None
    click.echo(f"Created API key {key.name!r} for owner {key.owner!r} ({', '.join(key.scopes)}).")
    click.echo("Its secret, shown only now:")
    click.echo(secret)


@keys_group.command("list")
@with_appcontext
@_in_one_line
def list_keys_command():
    """Names, owners, scopes and times of every key (never secrets)."""
    keys = current_service().repository.list_api_keys()
    for key in keys:
        used = key.last_used_at.isoformat(timespec="seconds") if key.last_used_at else "never"
        state = (
            f"revoked {key.revoked_at.isoformat(timespec='seconds')}"
            if key.revoked_at
            else "active"
        )
        click.echo(
            f"{key.name}\towner={key.owner}\tscopes={','.join(key.scopes)}"
            f"\tcreated={key.created_at.isoformat(timespec='seconds')}\tlast_used={used}\t{state}"
        )
    if not keys:
        click.echo("No API keys.")


@keys_group.command("revoke")
@click.argument("name", type=_NAME)
@with_appcontext
@_in_one_line
def revoke_key_command(name: str):
    """Revoke the key NAME: requests with it get 401 from now on."""
    _refuse_when_read_only("keys revoke")
    service = current_service()
    try:
        service.keys.revoke(name)
    except NotFound:
        raise click.ClickException(f"No active API key named {name!r}") from None
    click.echo(f"Revoked API key {name!r}.")


@click.command("strip-metadata")
@click.option("--apply", is_flag=True, help="Strip what is found (default: report only).")
@with_appcontext
@_in_one_line
def strip_metadata_command(apply: bool):
    """Strip the metadata of images stored with it (before stripping existed, or with
    STRIP_METADATA=false): each becomes a new version, its pixels unchanged. Rerun it after
    an interruption: images already stripped are skipped."""
    if apply:
        _refuse_when_read_only("strip-metadata --apply")
    service = current_service()
    # Streamed, a batch of records at a time; the count is only for the progress bar.
    records = (r for r in scan_all(service.repository) if r.status is Status.ACTIVE)
    label = "stripping" if apply else "checking"
    checked = found = saved = 0
    for record in _progress(records, label, length=service.repository.count()):
        checked += 1
        try:
            gain = service.strip_stored(record, apply=apply)
        except BackendUnavailable:
            raise  # the command stops (in one line): every image after would fail the same
        except ApiError as error:  # gone, changed meanwhile, or refused by today's limits
            click.echo(f"{record.id}: skipped ({_why_not_stripped(service, record, error)})")
            continue
        if gain is not None:
            found, saved = found + 1, saved + gain
            click.echo(f"{record.id}: {'stripped' if apply else 'has metadata'}, {gain} bytes")
    mode = "stripped" if apply else "to strip (dry run: nothing changed; use --apply)"
    click.echo(f"Checked {checked} images; {found} {mode}, {saved} bytes of metadata.")


def _why_not_stripped(service, record, error: ApiError) -> str:
    """What a client or `repair` did meanwhile, else the error itself (today's limits, a
    blob missing under a live record...)."""
    if isinstance(error, PreconditionFailed):
        return "replaced meanwhile: its new version is checked on the next run"
    if isinstance(error, NotFound):
        try:
            service.repository.get(record.id)
        except NotFound:
            return "deleted meanwhile"
    return f"{error.code}: {error.message}"


def _seconds(context, parameter, value: float) -> float:
    """A number of seconds `timedelta` takes (nan, inf and 1e308 were tracebacks)."""
    if not 0 <= value <= _MOST_SECONDS:
        raise click.BadParameter(f"must be 0 to {_MOST_SECONDS} seconds (ten years)")
    return value


_MOST_SECONDS = 10 * 365 * 24 * 3600


@click.command("repair")
@click.option(
    "--grace",
    type=float,
    callback=_seconds,
    default=3600,
    show_default=True,
    help="Leave blobs and pending uploads younger than this many seconds alone.",
)
@click.option("--apply", is_flag=True, help="Fix what is found (default: report only).")
@click.option(
    "--force",
    is_flag=True,
    help="With --apply: fix even when most records or blobs would go (stores mixed up?).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report.")
@with_appcontext
@_in_one_line
def repair_command(grace: float, apply: bool, force: bool, as_json: bool):
    """Find orphan blobs, stale pending uploads and records whose blob is missing."""
    if apply:
        _refuse_when_read_only("repair --apply")
        held = getattr(current_service().storage, "held", None)
        if held is not None and held():
            raise click.ClickException(
                "a backup is copying the blobs (flask backup), and deletions wait for it: "
                "run repair --apply when it is done"
            )

    def track(pairs):
        return _progress(pairs, "checking", show=not as_json)

    try:
        report = repair(
            current_service(), timedelta(seconds=grace), apply=apply, track=track, force=force
        )
    except Implausible as error:
        raise click.ClickException(
            f"{error}: are S3_BUCKET_NAME, DATA_DIR and MONGODB_URL the ones these images "
            "were stored with? Nothing was changed; --force applies it anyway"
        ) from None
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    mode = "applied" if apply else "dry run: nothing changed (use --apply to fix)"
    click.echo(
        f"Checked {report.records} records, {report.variants} variants and {report.blobs} blobs;"
        f" {mode}."
    )
    for finding in report.findings:
        image = f" image {finding.image_id}" if finding.image_id else ""
        click.echo(f"{finding.kind}: key {finding.key}{image}: {finding.action}")
    if not report.findings:
        click.echo("Blobs and records match.")


def _refuse_when_read_only(command: str) -> None:
    """READ_ONLY=true pauses writes while a migration copies the store, which would miss
    them (a revoked key would come back to life on the target): the commands that write
    refuse too."""
    if current_service().settings.read_only:
        raise click.ClickException(
            f"READ_ONLY=true: {command} writes, and writes are paused (a migration copying "
            "the store would miss it); run it again once READ_ONLY is unset"
        )


def _progress(items, label: str, length: int | None = None, show: bool = True):
    """`items`, with a progress bar on stderr when it is a terminal (and `show`)."""
    if not (show and sys.stderr.isatty()):
        yield from items
        return
    with click.progressbar(items, length=length, label=label, file=sys.stderr) as bar:
        yield from bar


@click.command("migrate")
@click.option("--to-s3", "bucket", required=True, help="the S3 bucket to copy blobs to")
@click.option("--to-mongodb", "mongodb_url", required=True, help="the MongoDB URL (database in it)")
@click.option("--s3-endpoint-url", default=None, help="an S3-compatible endpoint (MinIO...)")
@click.option("--aws-region", default=None, help="the bucket's region [default: AWS_REGION]")
@click.option("--dry-run", is_flag=True, help="count what would be copied; write nothing")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@with_appcontext
@_in_one_line
def migrate_command(bucket, mongodb_url, s3_endpoint_url, aws_region, dry_run, as_json):
    """Copy everything from the embedded default (directory + SQLite) to S3 + MongoDB:
    API keys, images, variants and live idempotency keys, each blob's sha256 checked.
    Run it with READ_ONLY=true (the service too); rerun it after an interruption."""
    service = current_service()
    settings = service.settings
    if settings.blob_backend != "filesystem" or settings.metadata_backend != "sqlite":
        raise click.ClickException("migrate copies from the embedded default (unset S3, MongoDB)")
    if not (settings.read_only or dry_run):
        raise click.ClickException(
            "set READ_ONLY=true for the service and this command first: a write during the "
            "copy would be lost"
        )
    try:
        target = migration.target_backends(
            settings, bucket, mongodb_url, s3_endpoint_url, aws_region
        )
    except ConfigError as error:
        raise click.ClickException(f"cannot use the target: {error}") from None
    source = migration.Backends(service.storage, service.repository)

    def track(items):
        return _progress(items, "copying", show=not as_json)

    try:
        report = migration.migrate(source, target, service.clock, dry_run=dry_run, track=track)
    except ApiError as error:
        cause = f" ({error.__cause__})" if error.__cause__ else ""
        raise click.ClickException(
            f"{error.message}{cause}; check --to-s3, --to-mongodb and --s3-endpoint-url, "
            "then rerun: what was copied is kept"
        ) from None
    finally:
        target.repository.close()
        target.storage.close()
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        verb = "would copy" if dry_run else "copied"
        click.echo(
            f"{verb} {report.keys} API keys, {report.images} images, {report.variants} "
            f"variants ({report.bytes} bytes) and {report.idempotency_keys} idempotency keys; "
            f"{report.skipped} were there already"
        )
        for problem in report.problems:
            click.echo(f"problem: {problem}")
        secret = settings.secret_key_path
        if secret.exists() and not dry_run:
            click.echo(
                f"Signed URLs: set SECRET_KEY on the new deployment to the contents of {secret}"
            )
    if report.problems:
        sys.exit(1)


@click.command("backup")
@click.argument("destination", type=click.Path(file_okay=False, path_type=Path))
@with_appcontext
@_in_one_line
def backup_command(destination: Path):
    """Copy the embedded default (database, blobs, secret and admin key) into DESTINATION,
    a new directory, while the service runs; serve the copy with DATA_DIR=DESTINATION.
    No blob is deleted meanwhile (those due are left for repair)."""
    service = current_service()
    settings = service.settings
    if settings.blob_backend != "filesystem" or settings.metadata_backend != "sqlite":
        raise click.ClickException(
            "backup copies the embedded default; on S3 + MongoDB back up the bucket "
            "(versioning) and the database (mongodump)"
        )
    try:
        report = backup.backup(settings, service.storage, service.repository, destination)
    except (FileExistsError, NotADirectoryError) as error:
        raise click.ClickException(f"{error}: name a new directory") from None
    except OSError as error:
        raise click.ClickException(f"cannot write the copy: {error}") from None
    except backup.BackupStalled as error:
        raise click.ClickException(str(error)) from None
    click.echo(
        f"Copied {report.images} images ({report.blobs} blobs, {report.bytes} bytes) to "
        f"{destination}; serve it with DATA_DIR={destination}"
    )


NGINX_SOURCE = "flask --app image_api nginx-config"


@click.command("nginx-config")
@click.option("--listen", default=None, help="nginx's port or addr:port [default: NGINX_PORT]")
@click.option("--upstream", default=None, help="gunicorn's host:port [default: 127.0.0.1:PORT]")
@click.option("--user", default=None, help="the user (and group) nginx's workers run as")
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="write here, not stdout")
@with_appcontext
@_in_one_line
def nginx_config_command(listen, upstream, user, output):
    """Print deploy/nginx.conf for these settings: nginx in front of gunicorn."""
    service = current_service()
    settings = service.settings
    try:
        frontend = nginx.Frontend(
            listen or str(settings.nginx_port), upstream or f"127.0.0.1:{settings.port}", user
        )
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    try:
        text = nginx.render(settings, service.storage, frontend, NGINX_SOURCE)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    if not output:
        click.echo(text, nl=False)
        return
    try:
        Path(output).write_text(text)
    except OSError as error:
        raise click.ClickException(f"cannot write {output}: {error.strerror}") from None
    except UnicodeError:
        raise click.ClickException("DATA_DIR is not UTF-8: nginx's config cannot name it") from None


def init_app(app: Flask) -> None:
    app.cli.add_command(init_command)
    app.cli.add_command(keys_group)
    app.cli.add_command(repair_command)
    app.cli.add_command(strip_metadata_command)
    app.cli.add_command(nginx_config_command)
    app.cli.add_command(migrate_command)
    app.cli.add_command(backup_command)
