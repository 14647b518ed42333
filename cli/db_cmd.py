"""`wbc db upgrade|current`: the service database's schema (Alembic migrations in service/db/migrations)."""

from __future__ import annotations

import typer

from cli.common import console
from cli.store_options import DEFAULT_DATABASE_URL, DatabaseUrlOption

app = typer.Typer(help="The service database (reviews, accounts, audit log).", no_args_is_help=True)


@app.command("upgrade")
def upgrade(database_url: DatabaseUrlOption = None, revision: str = typer.Argument("head")) -> None:
    """Apply the migrations up to REVISION (the service also does this when it starts)."""
    from service.db.session import Database

    db = Database(database_url or DEFAULT_DATABASE_URL)
    db.upgrade(revision)
    console.print(f"{db.describe()}: at revision {db.current_revision()}")


@app.command("current")
def current(database_url: DatabaseUrlOption = None) -> None:
    """The revision the database is at (none = empty database)."""
    from service.db.session import Database

    db = Database(database_url or DEFAULT_DATABASE_URL)
    console.print(f"{db.describe()}: at revision {db.current_revision() or 'none'}")
