"""Options shared by the commands that work on the service's database (`wbc db|users|tokens|review|audit`).

They read the same WBC_* variables as the service, so a command run beside `wbc serve` sees its data.
Secrets (the database password inside the URL, the audit key, a new account's password) come from the
environment, never from the command line, where other users of the machine could read them.
"""

from __future__ import annotations

import getpass
import os
from pathlib import Path
from typing import Annotated

import typer

DatabaseUrlOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        envvar="WBC_DATABASE_URL",
        show_envvar=True,
        show_default=False,
        help="SQLAlchemy URL of the service database (default sqlite:///var/wbc.db); "
        "prefer the variable when it holds a password.",
    ),
]
ImageStoreOption = Annotated[
    Path,
    typer.Option(
        "--image-store", envvar="WBC_IMAGE_STORE", show_envvar=True, help="Folder of the stored cell images."
    ),
]
DEFAULT_DATABASE_URL = "sqlite:///var/wbc.db"


def open_database(url: str | None):  # -> service.db.session.Database
    """The database, migrated to the current schema (idempotent), so a fresh site can start with the CLI."""
    from service.db.session import Database

    db = Database(url or DEFAULT_DATABASE_URL)
    db.upgrade()
    return db


def audit_log():  # -> service.audit.AuditLog
    from service.audit import AuditLog

    return AuditLog(os.environ.get("WBC_AUDIT_KEY") or None)


def cli_actor() -> str:
    """How the audit log names someone acting from the command line (with database access)."""
    return f"cli:{getpass.getuser()}"
