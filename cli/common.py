"""Options and helpers shared by the `wbc` commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)

DataRootOption = Annotated[
    Path | None,
    typer.Option("--data-root", envvar="WBC_DATA_ROOT", help="Data root (manifest.csv + sites/). "
                 "Default: ../shared/data/wbc beside the checkout."),
]
RegistryOption = Annotated[
    Path,
    typer.Option("--registry", envvar="WBC_REGISTRY", help="Model registry root (Triton layout)."),
]
ModelNameOption = Annotated[
    str, typer.Option("--model-name", envvar="WBC_MODEL_NAME", help="Model name inside the registry.")
]


def fail(message: str, code: int = 2) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)
