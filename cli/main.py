"""`wbc`: the command line of the federated WBC classifier.

Each command only wires task code together; the work lives in models/, federation/ and service/.
Heavy imports (torch, flwr) happen inside the commands that need them, so `wbc --help` is instant.
"""

from __future__ import annotations

import typer

from cli import (
    accounts_cmd,
    audit_cmd,
    benchmark_cmd,
    data_cmd,
    db_cmd,
    registry_cmd,
    review_cmd,
    schedule_cmd,
    serve_cmd,
)
from cli.adapt_cmd import adapt
from cli.demo_cmd import demo
from cli.evaluate_cmd import evaluate
from cli.federate_cmd import federate

app = typer.Typer(
    help="Federated white-blood-cell classification: train across hospitals, register, serve.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.add_typer(data_cmd.app, name="data")
app.add_typer(registry_cmd.app, name="registry")
serve_cmd.register(app)
app.command("federate")(federate)
app.command("evaluate")(evaluate)
app.command("adapt")(adapt)
app.command("demo")(demo)
app.add_typer(db_cmd.app, name="db")
accounts_cmd.register(app)  # wbc users, wbc tokens
app.add_typer(review_cmd.app, name="review")
app.add_typer(audit_cmd.app, name="audit")
schedule_cmd.register(app)  # wbc schedule
app.add_typer(benchmark_cmd.app, name="benchmark")


if __name__ == "__main__":
    app()
