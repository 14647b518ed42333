"""`wbc users ...` and `wbc tokens ...`: reviewer/admin accounts and laboratory-system API tokens.

The first admin is created here (`wbc users add NAME --role admin`); later accounts and tokens can also
be managed by admins over /v1/admin/*. A new account's password is read from WBC_PASSWORD, else asked
for twice without echo. A token is printed once; only its hash is stored.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Literal

import typer
from rich.table import Table

from cli.common import console, err_console, fail
from cli.store_options import DatabaseUrlOption, audit_log, cli_actor, open_database

users = typer.Typer(help="Reviewer and admin accounts.", no_args_is_help=True)
tokens = typer.Typer(help="API tokens of laboratory systems (they may only classify).", no_args_is_help=True)

PASSWORD_ENV = "WBC_PASSWORD"


def _new_password() -> str:
    if password := os.environ.get(PASSWORD_ENV):
        return password
    if not sys.stdin.isatty():
        fail(f"no password: set {PASSWORD_ENV} or run this in a terminal to be asked for one")
    return typer.prompt("Password", hide_input=True, confirmation_prompt=True)


@users.command("add")
def add_user(
    username: Annotated[str, typer.Argument(help="Login name")],
    role: Annotated[
        Literal["reviewer", "admin"],
        typer.Option(help="reviewer: review and sign off; admin: promote/rollback, tokens, accounts"),
    ],
    database_url: DatabaseUrlOption = None,
) -> None:
    """Create an account (the first admin is created this way). Password from WBC_PASSWORD or a prompt."""
    from service.accounts import AccountError, create_user

    password = _new_password()
    db = open_database(database_url)
    try:
        with db.transaction() as session:
            create_user(session, audit_log(), username, password, role, cli_actor())
    except AccountError as exc:
        fail(str(exc))
    console.print(f"created {role} [bold]{username}[/]")


@users.command("list")
def list_users(database_url: DatabaseUrlOption = None) -> None:
    from sqlalchemy import select

    from service.db.models import User

    db = open_database(database_url)
    table = Table("user", "role", "active", "created")
    with db.transaction() as session:
        for u in session.scalars(select(User).order_by(User.id)):
            table.add_row(
                u.username, u.role, "yes" if u.active else "no", u.created_at.isoformat(timespec="seconds")
            )
    console.print(table)


@users.command("disable")
def disable(username: str, database_url: DatabaseUrlOption = None) -> None:
    """Disable an account and end its sessions (its reviews stay attributed to it)."""
    from service.accounts import AccountError, disable_user

    db = open_database(database_url)
    try:
        with db.transaction() as session:
            disable_user(session, audit_log(), username, cli_actor())
    except AccountError as exc:
        fail(str(exc))
    console.print(f"disabled {username}")


@tokens.command("create")
def create(
    name: Annotated[str, typer.Argument(help="The laboratory system it is for, e.g. lis-barcelona")],
    database_url: DatabaseUrlOption = None,
) -> None:
    """Create a token and print it once (send it as `Authorization: Bearer <token>`)."""
    from service.accounts import AccountError, create_token

    db = open_database(database_url)
    try:
        with db.transaction() as session:
            _, token = create_token(session, audit_log(), name, cli_actor())
    except AccountError as exc:
        fail(str(exc))
    print(token)  # plain stdout, so `TOKEN=$(wbc tokens create lis)` works
    err_console.print(f"[dim]token {name!r} created; it is shown only now[/]")


@tokens.command("list")
def list_tokens(database_url: DatabaseUrlOption = None) -> None:
    from sqlalchemy import select

    from service.db.models import ApiToken

    db = open_database(database_url)
    table = Table("token", "created by", "created", "revoked")
    with db.transaction() as session:
        for t in session.scalars(select(ApiToken).order_by(ApiToken.id)):
            table.add_row(
                t.name,
                t.created_by,
                t.created_at.isoformat(timespec="seconds"),
                t.revoked_at.isoformat(timespec="seconds") if t.revoked_at else "",
            )
    console.print(table)


@tokens.command("revoke")
def revoke(name: str, database_url: DatabaseUrlOption = None) -> None:
    from service.accounts import AccountError, revoke_token

    db = open_database(database_url)
    try:
        with db.transaction() as session:
            revoke_token(session, audit_log(), name, cli_actor())
    except AccountError as exc:
        fail(str(exc))
    console.print(f"revoked {name}")


def register(app: typer.Typer) -> None:
    app.add_typer(users, name="users")
    app.add_typer(tokens, name="tokens")
