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


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


@app.command("site-scale")
def site_scale(
    directory: Annotated[Path, typer.Argument(help="A data root (with --site) or any folder of this site's cell images")],
    site: Annotated[str | None, typer.Option(help="The site inside a data root (manifest.csv).")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many images, evenly spread.")] = 500,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Measure this site's median white-cell diameter (pixels; no labels read): the service's
    WBC_SITE_CELL_DIAMETER, which lets a model's size prior size each cell against its own site."""
    import json

    if not directory.is_dir():
        fail(f"{directory}: not a folder")
    if site is not None:
        from federation.sites import DataError, DataRoot

        try:
            paths = [s.path for s in DataRoot(directory).select([site], list(SPLITS))]
        except DataError as exc:
            fail(str(exc))
    else:
        paths = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        fail(f"{directory}: no cell images found" + (f" for site {site!r}" if site else ""))
    value, used = measure_site_diameter(paths, limit)
    if used == 0:
        fail("no image could be read")
    if as_json:
        print(json.dumps({"site_cell_diameter": round(value, 2), "images": used}))
        return
    console.print(f"median white-cell diameter over {used} images: [bold]{value:.1f} px[/]")
    console.print(f"serve with: WBC_SITE_CELL_DIAMETER={value:.1f}")


def measure_site_diameter(paths: list[Path], limit: int = 500) -> tuple[float, int]:
    """(median located white-cell diameter, images read) over at most `limit` evenly spread images."""
    import numpy as np
    from PIL import Image

    from models.cellcrop import cell_diameter
    from models.preprocess import to_rgb
    from models.size_prior import site_reference

    step = max(1, len(paths) // limit)
    paths = paths[::step][:limit]
    diameters = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("locating cells", total=len(paths))
        for path in paths:
            try:
                with Image.open(path) as img:
                    diameters.append(cell_diameter(to_rgb(img)))
            except OSError as exc:
                console.print(f"[yellow]skipped[/] {path.name}: {exc}")
            progress.advance(task)
    found = [d for d in diameters if np.isfinite(d)]  # images without a located nucleus say nothing
    return (site_reference(found) if found else float("nan")), len(found)
