"""Credentials and roles on the real app and PostgreSQL: 401 without credentials, 403 with the wrong role,
secrets stored hashed, revoked tokens and disabled accounts refused, CSRF for browser sessions."""

from __future__ import annotations

import pytest
from review_helpers import PASSWORD, Service, files
from sqlalchemy import select

from service.config import Settings
from service.db.models import ApiToken, User


def test_no_credentials_is_401_everywhere(service: Service, barcelona_cells: list) -> None:
    client = service.client
    assert client.post("/v1/classify", files=files(barcelona_cells[:1])).status_code == 401
    assert client.get("/v1/review/cells").status_code == 401
    assert client.post("/v1/review/cells/1", json={"label": "neutrophil"}).status_code == 401
    assert client.get("/v1/admin/tokens").status_code == 401
    assert client.get("/v1/admin/model").status_code == 401  # issue 4's admin routes use the same guard
    response = client.get("/v1/review/cells")
    assert response.headers["www-authenticate"].startswith("Bearer")
    # The page sends a browser to the login form instead.
    page = client.get("/review?specimen=3", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"].startswith("/review/login?next=")


def test_wrong_role_is_403(service: Service, barcelona_cells: list) -> None:
    lab = service.add_token()
    service.add_user("rev", "reviewer")
    service.add_user("boss", "admin")
    client = service.client
    reviewer, admin = ("rev", PASSWORD), ("boss", PASSWORD)

    # A lab token may classify, nothing else.
    assert client.post("/v1/classify", files=files(barcelona_cells[:1]), headers=lab).status_code == 200
    assert client.get("/v1/review/cells", headers=lab).status_code == 403
    assert client.get("/v1/admin/tokens", headers=lab).status_code == 403
    # A reviewer may review, not classify nor administer.
    assert client.get("/v1/review/cells", auth=reviewer).status_code == 200
    assert client.post("/v1/classify", files=files(barcelona_cells[:1]), auth=reviewer).status_code == 403
    assert client.get("/v1/admin/tokens", auth=reviewer).status_code == 403
    assert client.post("/v1/admin/model/reload", auth=reviewer).status_code == 403
    # An admin administers (tokens, accounts, model), but neither reviews nor classifies.
    assert client.get("/v1/admin/tokens", auth=admin).status_code == 200
    assert client.get("/v1/admin/model", auth=admin).status_code == 200
    assert client.get("/v1/review/cells", auth=admin).status_code == 403
    assert client.post("/v1/classify", files=files(barcelona_cells[:1]), auth=admin).status_code == 403
    forbidden = client.get("/v1/review/cells", headers=lab).json()["detail"]
    assert "lab" in forbidden and "reviewer" in forbidden


def test_wrong_secrets_are_401(service: Service, barcelona_cells: list) -> None:
    lab = service.add_token()
    service.add_user("rev", "reviewer")
    client = service.client
    token = lab["Authorization"].removeprefix("Bearer ")
    tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    for header in (
        f"Bearer {tampered}",
        "Bearer wbc_000000000000_nope",
        "Bearer garbage",
        "Basic !!!",
        "Digest x",
    ):
        assert (
            client.post(
                "/v1/classify", files=files(barcelona_cells[:1]), headers={"Authorization": header}
            ).status_code
            == 401
        ), header
    assert client.get("/v1/review/cells", auth=("rev", "wrong password!")).status_code == 401
    assert client.get("/v1/review/cells", auth=("nobody", PASSWORD)).status_code == 401


def test_secrets_are_stored_hashed(service: Service) -> None:
    lab = service.add_token("lis")
    service.add_user("rev", "reviewer")
    token = lab["Authorization"].removeprefix("Bearer ")
    with service.db.transaction() as session:
        user = session.scalars(select(User)).one()
        row = session.scalars(select(ApiToken)).one()
        assert user.password_hash.startswith("$argon2id$") and PASSWORD not in user.password_hash
        assert row.secret_hash.startswith("$argon2id$") and token.split("_", 2)[2] not in row.secret_hash


def test_admin_manages_tokens_and_revoked_token_is_refused(service: Service, barcelona_cells: list) -> None:
    service.add_user("boss", "admin")
    admin = ("boss", PASSWORD)
    client = service.client
    created = client.post("/v1/admin/tokens", json={"name": "lis-2"}, auth=admin)
    assert created.status_code == 201
    lab = {"Authorization": f"Bearer {created.json()['token']}"}
    assert client.post("/v1/admin/tokens", json={"name": "lis-2"}, auth=admin).status_code == 409
    assert client.post("/v1/classify", files=files(barcelona_cells[:1]), headers=lab).status_code == 200
    listed = client.get("/v1/admin/tokens", auth=admin).json()
    assert [t["name"] for t in listed] == ["lis-2"] and "token" not in listed[0]
    assert client.delete("/v1/admin/tokens/lis-2", auth=admin).status_code == 200
    assert client.post("/v1/classify", files=files(barcelona_cells[:1]), headers=lab).status_code == 401


def test_admin_creates_reviewer_and_disabled_account_is_refused(service: Service) -> None:
    service.add_user("boss", "admin")
    admin = ("boss", PASSWORD)
    client = service.client
    short = client.post(
        "/v1/admin/users", json={"username": "rev", "password": "short", "role": "reviewer"}, auth=admin
    )
    assert short.status_code == 422
    made = client.post(
        "/v1/admin/users", json={"username": "rev", "password": PASSWORD, "role": "reviewer"}, auth=admin
    )
    assert made.status_code == 201
    service.login("rev")
    assert client.get("/v1/review/cells").status_code == 200
    assert client.post("/v1/admin/users/rev/disable", auth=admin).status_code == 200
    assert client.get("/v1/review/cells").status_code == 401  # the session ended with the account
    assert client.get("/v1/review/cells", auth=("rev", PASSWORD)).status_code == 401


def test_browser_session_needs_csrf_token_and_logs_out(service: Service, barcelona_cells: list) -> None:
    lab = service.add_token()
    service.add_user("rev", "reviewer")
    cell_id = service.client.post("/v1/classify", files=files(barcelona_cells[:1]), headers=lab).json()[
        "results"
    ][0]["id"]
    csrf = service.login("rev")
    client = service.client
    label = client.get("/v1/review/cells").json()["cells"][0]["labels"][0]
    assert client.post(f"/v1/review/cells/{cell_id}", json={"label": label}).status_code == 403
    assert (
        client.post(
            f"/v1/review/cells/{cell_id}", json={"label": label}, headers={"X-CSRF-Token": "forged"}
        ).status_code
        == 403
    )
    assert (
        client.post(
            f"/v1/review/cells/{cell_id}", json={"label": label}, headers={"X-CSRF-Token": csrf}
        ).status_code
        == 200
    )
    cookie = client.cookies.get("wbc_session")
    assert client.post("/review/logout", follow_redirects=False).status_code == 303
    client.cookies.set("wbc_session", cookie)  # replaying the old cookie does not work either
    assert client.get("/v1/review/cells").status_code == 401


def test_login_form_rejects_bad_password_and_foreign_redirects(service: Service) -> None:
    service.add_user("rev", "reviewer")
    client = service.client
    bad = client.post("/review/login", data={"username": "rev", "password": "nope"}, follow_redirects=False)
    assert bad.status_code == 401 and "Wrong user name or password" in bad.text
    ok = client.post(
        "/review/login",
        data={"username": "rev", "password": PASSWORD, "next": "//evil.example/x"},
        follow_redirects=False,
    )
    assert ok.status_code == 303 and ok.headers["location"] == "/review"
    cookie = ok.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie


def test_auth_off_only_on_loopback(review_registry) -> None:
    assert Settings(registry=review_registry).auth_enabled is False  # 127.0.0.1 by default
    assert Settings(registry=review_registry, host="0.0.0.0").auth_enabled is True
    with pytest.raises(ValueError, match="only allowed on a loopback host"):
        Settings(registry=review_registry, host="0.0.0.0", auth_required=False)
