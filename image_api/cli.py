"""Operator commands: `flask --app image_api init | repair`."""

from __future__ import annotations

import json
import sys
from datetime import timedelta

import click
from flask import Flask
from flask.cli import with_appcontext

from .repair import repair
from .service import current_service


@click.command("init")
@with_appcontext
def init_command():
    """Create the bucket or directory, and the tables or indexes (idempotent)."""
    service = current_service()
    service.storage.create()
    service.repository.create()
    click.echo(f"Initialised {service.storage.name} storage and {service.repository.name} metadata")


@click.command("repair")
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=3600,
    show_default=True,
    help="Leave blobs and pending uploads younger than this many seconds alone.",
)
@click.option("--apply", is_flag=True, help="Fix what is found (default: report only).")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report.")
@with_appcontext
def repair_command(grace: float, apply: bool, as_json: bool):
    """Find orphan blobs, stale pending uploads and records whose blob is missing."""
    show_progress = not as_json and sys.stderr.isatty()

    def track(pairs):
        if not show_progress:
            yield from pairs
            return
        with click.progressbar(pairs, label="checking", file=sys.stderr) as bar:
            yield from bar

    report = repair(current_service(), timedelta(seconds=grace), apply=apply, track=track)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    mode = "applied" if apply else "dry run: nothing changed (use --apply to fix)"
    click.echo(f"Checked {report.records} records and {report.blobs} blobs; {mode}.")
    for finding in report.findings:
        image = f" image {finding.image_id}" if finding.image_id else ""
        click.echo(f"{finding.kind}: key {finding.key}{image}: {finding.action}")
    if not report.findings:
        click.echo("Blobs and records match.")


def init_app(app: Flask) -> None:
    app.cli.add_command(init_command)
    app.cli.add_command(repair_command)
