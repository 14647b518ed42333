"""`wbc audit verify|show`: check the hash chain of the audit log; list its last entries.

Exit codes of verify: 0 the chain is intact, 1 it is broken (each problem printed).
Verify with the same WBC_AUDIT_KEY the service writes with.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from cli.common import console, err_console
from cli.store_options import DatabaseUrlOption, audit_log, open_database

app = typer.Typer(help="The append-only, hash-chained audit log.", no_args_is_help=True)


@app.command("verify")
def verify(
    database_url: DatabaseUrlOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Recompute every entry's hash and link; fails on an edited, inserted or deleted entry."""
    db = open_database(database_url)
    with db.transaction() as session:
        report = audit_log().verify(session)
    if as_json:
        print(
            json.dumps(
                {
                    "ok": report.ok,
                    "entries": report.entries,
                    "head_seq": report.head_seq,
                    "head_hash": report.head_hash,
                    "problems": report.problems,
                },
                indent=2,
            )
        )
    elif report.ok:
        console.print(
            f"[green]audit chain intact[/]: {report.entries} entries, head {report.head_seq} "
            f"{report.head_hash}"
        )
    else:
        err_console.print(f"[bold red]audit chain BROKEN[/] ({report.entries} entries read):")
        for problem in report.problems:
            err_console.print(f"  - {problem}")
        if report.truncated:
            err_console.print("  - … more problems not shown")
    raise typer.Exit(0 if report.ok else 1)


@app.command("show")
def show(
    last: Annotated[int, typer.Option(help="How many of the latest entries")] = 20,
    action: Annotated[str | None, typer.Option(help="Only this action, e.g. cell.reviewed")] = None,
    database_url: DatabaseUrlOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line, every column.")] = False,
) -> None:
    """The latest entries, newest last."""
    from sqlalchemy import select

    from service.db.models import AuditEntry

    db = open_database(database_url)
    query = select(AuditEntry).order_by(AuditEntry.seq.desc()).limit(last)
    if action:
        query = query.where(AuditEntry.action == action)
    with db.transaction() as session:
        entries = list(reversed(session.scalars(query).all()))
    if as_json:
        for e in entries:
            print(
                json.dumps(
                    {
                        "seq": e.seq,
                        "at": e.at,
                        "actor": e.actor,
                        "action": e.action,
                        "subject": e.subject,
                        "details": json.loads(e.details),
                        "prev_hash": e.prev_hash,
                        "hash": e.hash,
                    }
                )
            )
        return
    table = Table("seq", "at", "actor", "action", "subject", "details", "hash")
    for column in table.columns[:5]:
        column.no_wrap = True
    for e in entries:
        table.add_row(str(e.seq), e.at[:19], e.actor, e.action, e.subject, e.details, e.hash[:12] + "…")
    console.print(table)
