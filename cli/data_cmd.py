"""`wbc data ...`: inspect and validate site data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress
from rich.table import Table

from cli.common import console, fail
from federation.datacheck import check_data_root
from federation.sites import SPLITS

app = typer.Typer(help="Site data: validate a data root.", no_args_is_help=True)


@app.command("check")
def check(
    directory: Annotated[Path, typer.Argument(help="Data root: manifest.csv + sites/<site>/<label>/...")],
    max_problems: Annotated[int, typer.Option(help="How many errors/warnings to print.")] = 20,
) -> None:
    """Validate layout and manifest, and decode every image; exit 1 when anything is wrong."""
    if not directory.is_dir():
        fail(f"{directory}: not a folder")
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("decoding images", total=None)
        report = check_data_root(directory, lambda done, total: progress.update(task, completed=done, total=total))

    if report.counts:
        table = Table(title=f"{report.root}")
        table.add_column("site")
        table.add_column("class")
        for split in SPLITS:
            table.add_column(split, justify="right")
        for site, splits in sorted(report.counts.items()):
            for label in sorted(set().union(*splits.values())):
                table.add_row(site, label, *(str(splits[s][label]) for s in SPLITS))
        console.print(table)
    for warning in report.warnings[:max_problems]:
        console.print(f"[yellow]warning:[/] {warning}")
    for error in report.errors[:max_problems]:
        console.print(f"[red]error:[/] {error}")
    hidden = max(0, len(report.errors) - max_problems) + max(0, len(report.warnings) - max_problems)
    if hidden:
        console.print(f"… and {hidden} more")
    if not report.ok:
        console.print(f"[bold red]FAILED[/]: {len(report.errors)} error(s)")
        raise typer.Exit(1)
    console.print(f"[bold green]OK[/]: {sum(sum(c.values()) for s in report.counts.values() for c in s.values())} "
                  f"images, {len(report.counts)} site(s), {len(report.warnings)} warning(s)")
