"""`wbc classify FILES... --url URL`: send images to a running service and print its answers as a table.

Exit codes: 0 every file classified, 1 some or all files refused by the service, 2 the service could
not be reached or answered something other than a classification (e.g. 503, no model loaded).
"""

from __future__ import annotations

import mimetypes
from pathlib import Path
from typing import Annotated, Any, Sequence

import httpx
import typer
from rich.console import Console
from rich.table import Table

DEFAULT_URL = "http://127.0.0.1:8000"


class ClientError(RuntimeError):
    """The service could not be asked, or did not answer with a classification."""


def classify_files(
    paths: Sequence[Path],
    url: str = DEFAULT_URL,
    timeout: float = 60.0,
    *,
    token: str | None = None,
    specimen: str | None = None,
) -> dict[str, Any]:
    """POST the files to `url`/v1/classify; returns the JSON body of a 200/207/422 answer.

    `token` is a lab-system API token (sent as a bearer token); `specimen` groups the cells for review.
    """
    files = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ClientError(f"{path}: cannot read it ({exc.strerror})") from None
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        files.append(("files", (path.name, data, mime)))
    endpoint = url.rstrip("/") + "/v1/classify"
    try:
        response = httpx.post(
            endpoint,
            files=files,
            data={"specimen": specimen} if specimen else None,
            headers={"Authorization": f"Bearer {token}"} if token else None,
            timeout=timeout,
        )
    except httpx.HTTPError as exc:
        raise ClientError(f"{endpoint}: {exc}") from None
    try:
        body = response.json()
    except ValueError:
        raise ClientError(f"{endpoint}: HTTP {response.status_code}, not JSON: {response.text[:200]}") from None
    if response.status_code in (200, 207) or (response.status_code == 422 and "errors" in body):
        return body
    raise ClientError(f"{endpoint}: HTTP {response.status_code}: {body.get('detail', body)}")


def short_names(names: Sequence[str], length: int = 4) -> list[str]:
    """Shortest prefixes (at least `length` characters) that still tell the classes apart."""
    for n in range(length, max(map(len, names), default=0) + 1):
        prefixes = [name[:n] for name in names]
        if len(set(prefixes)) == len(prefixes):
            return prefixes
    return list(names)


def results_table(body: dict[str, Any], width: int = 120) -> Table:
    """One row per file: label, confidence and every class's probability (or the error)."""
    results = body.get("results") or body.get("errors") or []
    classes: list[str] = next((list(r["probabilities"]) for r in results if "probabilities" in r), [])
    title = f"{body['model']} v{body['version']}" if "model" in body else "no file classified"
    table = Table(title=title)
    table.add_column("file", overflow="fold", min_width=12)
    table.add_column("label", no_wrap=True)
    table.add_column("conf.", justify="right", no_wrap=True)
    # Full class names when they fit beside a 24-character file name, prefixes when they do not.
    fits = 24 + 14 + 8 + sum(max(len(c), 5) + 3 for c in classes) <= width
    for header in classes if fits else short_names(classes):
        table.add_column(header, justify="right", no_wrap=True)
    for r in results:
        if "error" in r:
            table.add_row(r["filename"], "[red]error[/]", "",
                          *([""] * len(classes)))
            continue
        probs = r["probabilities"]
        table.add_row(r["filename"], f"[bold]{r['label']}[/]", f"{r['confidence']:.3f}",
                      *(f"{probs[c]:.3f}" for c in classes))
    return table


def print_results(body: dict[str, Any], console: Console) -> int:
    console.print(results_table(body, console.width))
    results = body.get("results") or body.get("errors") or []
    errors = [r for r in results if "error" in r]
    for r in errors:
        console.print(f"[red]{r['filename']}[/] ({r['error']['code']}): {r['error']['message']}")
    return 1 if errors else 0


def classify_command(
    files: Annotated[list[Path], typer.Argument(help="JPEG, PNG, BMP or TIFF images", exists=True,
                                                dir_okay=False, readable=True)],
    url: Annotated[str, typer.Option("--url", envvar="WBC_URL", help="Base URL of the service")] = DEFAULT_URL,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer")] = 60.0,
    token: Annotated[str | None, typer.Option(envvar="WBC_TOKEN", help="Lab-system API token "
                                              "(needed when the service requires auth)")] = None,
    specimen: Annotated[str | None, typer.Option(help="Specimen identifier the cells belong to "
                                                 "(groups them on the review worklist)")] = None,
) -> None:
    """Classify images with a running `wbc serve`; prints label, confidence and per-class probabilities."""
    console = Console()
    try:
        body = classify_files(files, url, timeout, token=token, specimen=specimen)
    except ClientError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    raise typer.Exit(print_results(body, console))
