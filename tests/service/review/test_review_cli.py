"""`wbc users`, `wbc tokens`, `wbc db`, `wbc audit show`: the first admin and a lab token from the command
line (secrets from the environment), then used against the service."""

from __future__ import annotations

import json

from review_helpers import PASSWORD, files
from typer.testing import CliRunner

from cli.main import app as cli


def test_first_admin_and_token_from_cli(make_settings, pg_url: str, barcelona_cells) -> None:
    from fastapi.testclient import TestClient

    from service.main import create_app

    runner = CliRunner()
    env = {"WBC_DATABASE_URL": pg_url, "WBC_AUDIT_KEY": "test-audit-key"}
    assert runner.invoke(cli, ["db", "upgrade"], env=env).exit_code == 0
    no_password = runner.invoke(cli, ["users", "add", "root", "--role", "admin"], env=env)
    assert no_password.exit_code == 2 and "WBC_PASSWORD" in no_password.output
    made = runner.invoke(
        cli, ["users", "add", "root", "--role", "admin"], env={**env, "WBC_PASSWORD": PASSWORD}
    )
    assert made.exit_code == 0, made.output
    again = runner.invoke(
        cli, ["users", "add", "root", "--role", "admin"], env={**env, "WBC_PASSWORD": PASSWORD}
    )
    assert again.exit_code == 2 and "already exists" in again.output
    created = runner.invoke(cli, ["tokens", "create", "lis-barcelona"], env=env)
    assert created.exit_code == 0, created.output
    token = created.stdout.strip().splitlines()[0]
    assert token.startswith("wbc_")

    with TestClient(create_app(make_settings(pg_url))) as client:
        lab = {"Authorization": f"Bearer {token}"}
        assert client.post("/v1/classify", files=files(barcelona_cells[:1]), headers=lab).status_code == 200
        assert client.get("/v1/admin/users", auth=("root", PASSWORD)).json()[0]["role"] == "admin"
        assert runner.invoke(cli, ["tokens", "revoke", "lis-barcelona"], env=env).exit_code == 0
        assert client.post("/v1/classify", files=files(barcelona_cells[:1]), headers=lab).status_code == 401

    shown = runner.invoke(cli, ["audit", "show", "--last", "10", "--json"], env=env)
    assert shown.exit_code == 0
    entries = [json.loads(line) for line in shown.stdout.splitlines()]
    assert [e["action"] for e in entries] == [
        "user.created",
        "token.created",
        "prediction.served",
        "token.revoked",
    ]
    assert entries[0]["actor"].startswith("cli:") and entries[2]["actor"] == "token:lis-barcelona"
    assert runner.invoke(cli, ["audit", "verify"], env=env).exit_code == 0
