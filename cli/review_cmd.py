"""`wbc review export --site S`: the site's reviewed cells as site data for the next federated round."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.common import console, fail
from cli.store_options import DatabaseUrlOption, ImageStoreOption, audit_log, cli_actor, open_database

app = typer.Typer(help="The clinicians' review loop.", no_args_is_help=True)


@app.command("export")
def export(
    site: Annotated[str, typer.Option("--site", help="The site whose reviewed cells to export")],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Data root to write (default var/site-data/<site>); an earlier export there is replaced",
        ),
    ] = None,
    database_url: DatabaseUrlOption = None,
    image_store: ImageStoreOption = Path("var/cells"),
) -> None:
    """Write the cells of signed-off specimens, with the reviewers' labels, as a data root
    (manifest.csv + sites/<site>/<label>/...), the layout of ../shared/data/wbc. Splits are per
    specimen and stable across exports (see service/review/export.py). The images stay on this machine."""
    from service.review.export import ExportError, export_site
    from service.review.images import ImageStore

    dest = out or Path("var/site-data") / site
    db = open_database(database_url)
    try:
        summary = export_site(db, ImageStore(image_store), audit_log(), site, dest, cli_actor())
    except ExportError as exc:
        fail(str(exc))
    table = Table(
        title=f"{summary.site}: {summary.cells} cells from {summary.specimens} specimens → {summary.dest}"
    )
    table.add_column("label")
    for split in ("train", "val", "test"):
        table.add_column(split, justify="right")
    counts = {}
    from federation.sites import DataRoot

    for sample in DataRoot(summary.dest).samples:
        counts.setdefault(sample.label, {}).setdefault(sample.split, 0)
        counts[sample.label][sample.split] += 1
    for label in sorted(counts):
        table.add_row(label, *(str(counts[label].get(split, 0)) for split in ("train", "val", "test")))
    console.print(table)
    console.print(f"train on it with --data-root {summary.dest} (sites: {summary.site})")
