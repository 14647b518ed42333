"""Attacks on the real app with authentication on and a real PostgreSQL database: routes without a guard,
wrong roles, malformed and oversized credentials, path traversal, replayed and tampered audit entries,
a tampered ONNX file, the per-credential rate limit, security headers and CORS on the review pages.

Already covered elsewhere (cited in docs/reliability.md, not repeated here): 401/403 basics, tampered
token secrets, revoked tokens, disabled accounts, CSRF on browser sessions and replayed cookies after
logout (tests/service/review/test_auth_roles.py); edited and deleted audit entries
(tests/service/review/test_audit_chain.py); a swap to a tampered version (tests/service/test_model_swap.py);
registry names that escape the root (tests/models/test_registry.py).
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from review_helpers import PASSWORD, Service, files
from sqlalchemy import select, text

from models.contract import ModelContract
from models.registry import Registry
from service import accounts
from service.audit import AuditLog
from service.config import Settings
from service.db.models import Cell
from service.db.session import Database
from service.main import create_app
from service.review.images import ImageStore


def all_routes(app) -> list[tuple[str, str]]:
    """(method, path template) of every route the app serves, including those hidden from OpenAPI."""
    found = []
    for route in app.routes:
        candidates = getattr(route, "effective_candidates", None)  # FastAPI's included routers
        if candidates is not None:
            routes = candidates() if callable(candidates) else candidates
        else:
            routes = [route]
        for r in routes:
            for method in sorted(getattr(r, "methods", None) or {"GET"}):
                if method != "HEAD":
                    found.append((method, r.path))
    return found


def concrete(path: str) -> str:
    return (
        path.replace("{name}", "wbc-review-test")
        .replace("{version}", "1")
        .replace("{cell_id}", "1")
        .replace("{specimen_id}", "1")
        .replace("{username}", "someone")
        .replace("{path:path}", "review.css")
    )


# What anyone may call, and why. A route missing from here that answers without credentials fails the test.
PUBLIC = {
    ("GET", "/openapi.json"): "the API description",
    ("GET", "/docs"): "the API description",
    ("GET", "/docs/oauth2-redirect"): "the API description",
    ("GET", "/redoc"): "the API description",
    ("GET", "/v2"): "KServe v2 server metadata (name, version)",
    ("GET", "/v2/models/{name}"): "KServe v2 model metadata: what clients need to build requests",
    ("GET", "/v2/models/{name}/versions/{version}"): "KServe v2 model metadata",
    ("GET", "/v2/models/{name}/ready"): "KServe v2 readiness",
    ("GET", "/v2/models/{name}/versions/{version}/ready"): "KServe v2 readiness",
    ("GET", "/v2/health/live"): "kubelet probe",
    ("GET", "/v2/health/ready"): "kubelet probe",
    ("GET", "/metrics"): "Prometheus scrape (cluster network only; no patient data)",
    ("GET", "/review/login"): "the sign-in form",
    ("POST", "/review/login"): "signing in",
    ("POST", "/review/logout"): "signing out (ends the cookie's session, if any)",
    ("GET", "/review/static"): "CSS and JS of the pages",
}
PAGES = {("GET", "/review")}  # a browser without a session is sent to the sign-in form


def permission_of(path: str) -> str | None:
    if path == "/v1/classify" or path.endswith("/infer"):
        return "classify"
    if path.startswith(("/v1/review", "/review")):
        return "review"
    if path.startswith("/v1/admin"):
        return "admin"
    return None  # /v1/auth/whoami: any valid credential


@pytest.fixture()
def secured(make_settings: Callable[..., Settings], pg_url: str) -> Iterator[Service]:
    settings = make_settings(pg_url)
    app = create_app(settings)
    with TestClient(app) as client:
        yield Service(client, settings, app.state.db, app.state.audit)


def session_cookie(service: Service, user: str) -> tuple[str, str]:
    """Sign `user` in; return (cookie value, CSRF token) and leave the client's own jar empty."""
    r = service.client.post(
        "/review/login", data={"username": user, "password": PASSWORD}, follow_redirects=False
    )
    assert r.status_code == 303, r.text
    cookie = service.client.cookies.get("wbc_session")
    service.client.cookies.clear()
    with service.db.transaction() as session:
        principal = accounts.web_session_principal(session, cookie)
    return cookie, principal.csrf_token


# ---- who may call what ------------------------------------------------------------------------------------
def test_every_route_needs_credentials_except_the_listed_public_ones(secured: Service) -> None:
    client = secured.client
    routes = all_routes(client.app)
    assert len(routes) > 30
    unguarded = []
    for method, path in routes:
        if (method, path) in PUBLIC:
            continue
        r = client.request(method, concrete(path), follow_redirects=False)
        expected = 303 if (method, path) in PAGES else 401
        if r.status_code != expected:
            unguarded.append(f"{method} {path}: {r.status_code} (expected {expected})")
    print(
        f"\n{len(routes)} routes: {len(PUBLIC)} public by design, {len(routes) - len(PUBLIC)} refused without credentials"
    )
    assert unguarded == [], "\n".join(unguarded)


def test_every_guarded_route_refuses_the_wrong_roles(secured: Service, barcelona_cells: list) -> None:
    """A lab token, a reviewer session and an admin session on every guarded route: 403 wherever the
    role does not hold the route's permission (with the CSRF token, so the role is what refuses)."""
    secured.add_user("rev", "reviewer")
    secured.add_user("boss", "admin")
    lab = secured.add_token()
    reviewer, admin = session_cookie(secured, "rev"), session_cookie(secured, "boss")
    callers = {
        "lab": {"headers": lab},
        "reviewer": {"headers": {"Cookie": f"wbc_session={reviewer[0]}", "X-CSRF-Token": reviewer[1]}},
        "admin": {"headers": {"Cookie": f"wbc_session={admin[0]}", "X-CSRF-Token": admin[1]}},
    }
    allowed_role = {"classify": "lab", "review": "reviewer", "admin": "admin"}
    wrong = []
    checked = 0
    for method, path in all_routes(secured.client.app):
        permission = permission_of(path)
        if (method, path) in PUBLIC or permission is None:
            continue
        for role, request in callers.items():
            if role == allowed_role[permission]:
                continue
            r = secured.client.request(method, concrete(path), follow_redirects=False, **request)
            checked += 1
            if r.status_code != 403:
                wrong.append(f"{role} {method} {path}: {r.status_code} {r.text[:120]}")
    print(f"\n{checked} (role, route) pairs with the wrong role: all 403")
    assert wrong == [], "\n".join(wrong)
    assert checked >= 40


def test_malformed_and_oversized_credentials_are_401(secured: Service, barcelona_cells: list) -> None:
    lab = secured.add_token("lis-a")
    secured.add_token("lis-b")
    secured.add_user("rev", "reviewer")
    token = lab["Authorization"].removeprefix("Bearer ")
    _, public_id, secret = token.split("_", 2)

    def basic(raw: bytes) -> str:
        return "Basic " + base64.b64encode(raw).decode()

    headers = [
        "Bearer " + "A" * 100_000,  # 100 kB token
        "Bearer wbc_",
        "Bearer wbc__",
        f"Bearer wbc_{public_id}_",
        f"Bearer wbc_{public_id}_" + "x" * 50_000,
        f"Bearer wbc_{'9' * 12}_{secret}",  # a real secret under another id
        f"Bearer WBC_{public_id}_{secret}",
        f"Bearer wbc_{public_id}_{secret} trailing",
        f"Bearer wbc_{public_id}_{secret[:-1]}",
        f"Bearer wbc_' OR 1=1 --_{secret}",
        "Bearer \x00\x01\x02",
        "Bearer ",
        "Bearer",
        basic(b"rev:" + b"p" * 1_000_000),  # 1 MB password
        basic(b":"),
        basic(b"rev"),
        basic("r\u00e9v:pässwörd".encode()),
        basic(b"\xff\xfe:\xff"),  # not UTF-8
        "Basic !!!!",
        "Basic " + "A" * 100_001,
        "Digest username=rev",
        "Negotiate YIIGhgYGKwYBBQUCoIIGejCCBnagMDAuBgkqhkiC9xIBAgIGCSqGSIb3EgECAgYKKwYBBAGCNwICHg==",
    ]
    started = time.perf_counter()
    wrong = []
    for header in headers:
        r = secured.client.post(
            "/v1/classify",
            files=files(barcelona_cells[:1]),
            headers={"Authorization": header.encode("latin-1", "replace").decode("latin-1")},
        )
        if r.status_code != 401:
            wrong.append(f"{header[:60]!r}: {r.status_code} {r.text[:100]}")
    for cookie in ("A" * 100_000, "'; DROP TABLE users; --", "\x7f" * 10):
        r = secured.client.get("/v1/review/cells", headers={"Cookie": f"wbc_session={cookie}"})
        if r.status_code != 401:
            wrong.append(f"cookie {cookie[:20]!r}: {r.status_code}")
    seconds = time.perf_counter() - started
    print(f"\n{len(headers) + 3} malformed credentials answered 401 in {seconds:.1f} s")
    assert wrong == [], "\n".join(wrong)
    assert (
        secured.client.post("/v1/classify", files=files(barcelona_cells[:1]), headers=lab).status_code == 200
    )


def test_csrf_token_of_another_session_is_refused(secured: Service, barcelona_cells: list) -> None:
    secured.add_user("rev-a", "reviewer")
    secured.add_user("rev-b", "reviewer")
    lab = secured.add_token()
    cell = secured.client.post("/v1/classify", files=files(barcelona_cells[:1]), headers=lab).json()[
        "results"
    ][0]
    _, csrf_a = session_cookie(secured, "rev-a")
    cookie_b, csrf_b = session_cookie(secured, "rev-b")
    label = cell["label"] if cell["label"] != "unidentified" else "neutrophil"
    replayed = secured.client.post(
        f"/v1/review/cells/{cell['id']}",
        json={"label": label},
        headers={"Cookie": f"wbc_session={cookie_b}", "X-CSRF-Token": csrf_a},
    )
    assert replayed.status_code == 403 and "X-CSRF-Token" in replayed.json()["detail"]
    own = secured.client.post(
        f"/v1/review/cells/{cell['id']}",
        json={"label": label},
        headers={"Cookie": f"wbc_session={cookie_b}", "X-CSRF-Token": csrf_b},
    )
    assert own.status_code == 200


# ---- path traversal ---------------------------------------------------------------------------------------
TRAVERSAL_NAMES = [
    "../../../../tmp/wbc-evil-1.jpg",
    "..\\..\\..\\wbc-evil-2.jpg",
    "/etc/passwd",
    "C:\\Windows\\System32\\wbc-evil-3.jpg",
    "%2e%2e%2f%2e%2e%2fwbc-evil-4.jpg",
    "cells/../../wbc-evil-5.jpg",
    "<script>alert('wbc-evil-6')</script>.jpg",
    "wbc-evil-7\r\nX-Injected: 1.jpg",
]


def test_uploaded_file_names_never_become_paths(
    secured: Service, barcelona_cells: list, tmp_path: Path
) -> None:
    """Traversal file names are stored as text: the image lands in the content-addressed store and
    nowhere else; the name comes back verbatim in JSON and escaped in the review page."""
    lab = secured.add_token()
    data = barcelona_cells[0][1]
    r = secured.client.post(
        "/v1/classify", headers=lab, files=[("files", (name, data, "image/jpeg")) for name in TRAVERSAL_NAMES]
    )
    assert r.status_code == 200, r.text
    answered = [entry["filename"] for entry in r.json()["results"]]
    assert len(answered) == len(TRAVERSAL_NAMES)
    store = secured.settings.image_store.resolve()
    stored = [p for p in store.rglob("*") if p.is_file()]
    assert len(stored) == 1 and stored[0].parent.parent == store  # <store>/<sha[:2]>/<sha>.jpg, once
    for root in (tmp_path, Path("/tmp"), store.parent):
        assert not list(root.rglob("wbc-evil-*")), f"a file named after an upload appeared under {root}"
    with secured.db.transaction() as session:
        paths = set(session.scalars(select(Cell.image_path)))
    assert paths == {stored[0].relative_to(store).as_posix()}
    with pytest.raises(ValueError, match="outside the image store"):
        ImageStore(store).path("../../../etc/passwd")
    # No script from a file name reaches a reviewer's browser: the page does not show upload names, Jinja
    # escapes whatever it shows, and the page script never builds HTML from strings.
    secured.add_user("rev", "reviewer")
    secured.login("rev")
    page = secured.client.get("/review").text
    assert "<script>alert(" not in page
    script = (Path(__file__).resolve().parents[2] / "service/review/static/review.js").read_text()
    assert not any(
        sink in script for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write")
    )


def test_traversal_in_model_names_versions_and_settings(secured: Service, review_registry: Path) -> None:
    lab = secured.add_token()
    secured.add_user("boss", "admin")
    client = secured.client
    for path in (
        "/v2/models/..%2F..%2Fetc%2Fpasswd",
        "/v2/models/../../etc/passwd/ready",
        "/v2/models/wbc-review-test/versions/..%2F..%2F1",
        "/v2/models/%2e%2e/versions/1/ready",
        "/v2/models/wbc-review-test/versions/1%00/ready",
    ):
        r = client.get(path, headers=lab)
        assert r.status_code == 404, (path, r.status_code, r.text[:200])
    r = client.post("/v2/models/..%2F..%2Fetc/infer", headers=lab, json={"inputs": []})
    assert r.status_code == 404
    before = Registry(review_registry, "wbc-review-test").aliases()
    for version in ("../1", "1/../2", "../../etc/passwd", -1, 0, 10**30, "1e3", None, [1]):
        r = client.post("/v1/admin/model/promote", json={"version": version}, auth=("boss", PASSWORD))
        assert r.status_code in (404, 422), (version, r.status_code, r.text[:200])
    assert Registry(review_registry, "wbc-review-test").aliases() == before
    for path in (
        "/review/cells/..%2F..%2F..%2Fetc%2Fpasswd/image",
        "/review/cells/1%2F..%2F2/image",
        "/v1/review/specimens/..%2F1",
    ):
        assert client.get(path, headers=lab).status_code in (403, 404, 422), path
    # Settings refuse traversal before anything is opened.
    for bad in ({"version": "../1"}, {"site": "../other-site"}, {"site": "a/b"}):
        with pytest.raises(ValidationError):
            Settings(registry=review_registry, **bad)
    with pytest.raises(Exception, match="invalid model name"):
        create_app(Settings(registry=review_registry, model_name="../wbc-review-test"))


# ---- audit: replayed and reordered entries --------------------------------------------------------------
def _fill(db: Database, log: AuditLog, n: int) -> None:
    for i in range(n):
        with db.transaction() as session:
            log.append(
                session,
                actor="rev",
                action="cell.reviewed",
                subject=f"cell:{i}",
                details={"old": "neutrophil", "new": "lymphocyte", "i": i},
            )


def _as_owner(db: Database, *statements: str) -> None:
    """What someone with the table owner's rights can do: switch the append-only triggers off, write."""
    with db.engine.begin() as connection:
        connection.execute(text("ALTER TABLE audit_log DISABLE TRIGGER USER"))
        for statement in statements:
            connection.execute(text(statement))
        connection.execute(text("ALTER TABLE audit_log ENABLE TRIGGER USER"))


COLUMNS = "at, actor, action, subject, details, prev_hash, hash"


@pytest.mark.parametrize(
    "attack, statements, expected",
    [
        (
            "replay entry 2 at the end, head moved to it",
            [
                f"INSERT INTO audit_log (seq, {COLUMNS}) SELECT 6, {COLUMNS} FROM audit_log WHERE seq = 2",
                "UPDATE audit_head SET seq = 6, hash = (SELECT hash FROM audit_log WHERE seq = 2)",
            ],
            "entry 6: prev_hash does not match",
        ),
        (
            "replay entry 2 at the end, head untouched",
            [f"INSERT INTO audit_log (seq, {COLUMNS}) SELECT 6, {COLUMNS} FROM audit_log WHERE seq = 2"],
            "entry 6",
        ),
        (
            "swap two entries (reorder)",
            [
                "UPDATE audit_log SET seq = 100 WHERE seq = 3",
                "UPDATE audit_log SET seq = 3 WHERE seq = 4",
                "UPDATE audit_log SET seq = 4 WHERE seq = 100",
            ],
            "prev_hash does not match",
        ),
        (
            "replace an entry by a replay of another (same hash, other place)",
            [
                "DELETE FROM audit_log WHERE seq = 4",
                f"INSERT INTO audit_log (seq, {COLUMNS}) SELECT 4, {COLUMNS} FROM audit_log WHERE seq = 2",
            ],
            "entry 4: prev_hash does not match",
        ),
    ],
    ids=["replay-head-moved", "replay-at-end", "reorder", "replace-by-replay"],
)
def test_replayed_or_reordered_audit_entries_fail_verification(
    pg_db: Database, attack: str, statements: list[str], expected: str
) -> None:
    log = AuditLog("reliability-audit-key")
    _fill(pg_db, log, 5)
    with pg_db.transaction() as session:
        assert log.verify(session).ok
    _as_owner(pg_db, *statements)
    with pg_db.transaction() as session:
        report = log.verify(session)
    assert not report.ok, attack
    assert any(expected in problem for problem in report.problems), report.problems


# ---- tampered model ---------------------------------------------------------------------------------------
def test_tampered_onnx_is_refused_at_start_and_every_route_says_503(
    tmp_path: Path, exported_onnx: Path, model_contract: ModelContract, jpeg_bytes: bytes
) -> None:
    """One byte changed in the middle of model.onnx (same size, still a loadable graph perhaps): the
    sha256 check refuses it; ready, classify and KServe v2 answer 503 with the reason, never serve it."""
    registry = Registry(tmp_path / "registry", "tampered")
    info = registry.register(exported_onnx, model_contract, {})
    data = bytearray(info.onnx_path.read_bytes())
    data[len(data) // 2] ^= 0x01
    info.onnx_path.write_bytes(bytes(data))
    settings = Settings(
        registry=tmp_path / "registry",
        model_name="tampered",
        intra_op_threads=1,
        database_url=f"sqlite:///{tmp_path}/wbc.db",
        image_store=tmp_path / "cells",
    )
    with TestClient(create_app(settings)) as client:
        ready = client.get("/v2/health/ready")
        classify = client.post("/v1/classify", files=[("files", ("cell.jpg", jpeg_bytes, "image/jpeg"))])
        v2 = client.get("/v2/models/tampered")
    assert ready.status_code == 503 and "sha256" in ready.json()["reason"]
    assert classify.status_code == 503 and "sha256" in classify.json()["detail"]
    assert v2.status_code == 503


def test_contract_edited_in_the_registry_record_is_refused(
    tmp_path: Path, exported_onnx: Path, model_contract: ModelContract
) -> None:
    """The class order changed in metadata.json only (model.onnx untouched, so its sha256 still holds):
    the service compares the record with the contract inside the file and refuses to serve."""
    registry = Registry(tmp_path / "registry", "edited")
    info = registry.register(exported_onnx, model_contract, {})
    meta_path = info.path / "metadata.json"
    import json

    meta = json.loads(meta_path.read_text())
    meta["contract"]["class_names"] = list(reversed(meta["contract"]["class_names"]))
    meta_path.write_text(json.dumps(meta))
    settings = Settings(
        registry=tmp_path / "registry",
        model_name="edited",
        intra_op_threads=1,
        database_url=f"sqlite:///{tmp_path}/wbc.db",
        image_store=tmp_path / "cells",
    )
    with TestClient(create_app(settings)) as client:
        ready = client.get("/v2/health/ready")
    assert ready.status_code == 503, ready.text


# ---- rate limit per credential ------------------------------------------------------------------------------
def test_rate_limit_per_credential(
    make_settings: Callable[..., Settings], pg_url: str, barcelona_cells: list
) -> None:
    settings = make_settings(pg_url, rate_limit="5/5 seconds")  # wide enough for a slow, loaded machine
    app = create_app(settings)
    with TestClient(app) as client:
        service = Service(client, settings, app.state.db, app.state.audit)
        lab_a, lab_b = service.add_token("lis-a"), service.add_token("lis-b")
        one = files(barcelona_cells[:1])
        answers = [client.post("/v1/classify", files=one, headers=lab_a).status_code for _ in range(8)]
        assert answers[:5] == [200] * 5 and 429 in answers[5:], answers
        limited = client.post("/v1/classify", files=one, headers=lab_a)
        assert limited.status_code == 429
        retry_after = int(limited.headers["Retry-After"])
        assert 1 <= retry_after <= 6 and "WBC_RATE_LIMIT" in limited.json()["detail"]
        # Another laboratory is not slowed by the first one's burst, nor is a forged token that borrows
        # lab A's public id counted against lab A (it is its own caller, and 401).
        assert client.post("/v1/classify", files=one, headers=lab_b).status_code == 200
        forged = lab_a["Authorization"][:-4] + "AAAA"
        assert client.post("/v1/classify", files=one, headers={"Authorization": forged}).status_code == 401
        # Probes and the scrape are never limited.
        assert {client.get("/v2/health/ready").status_code for _ in range(20)} == {200}
        assert {client.get("/metrics").status_code for _ in range(10)} == {200}
        # Without credentials the client address is counted: a flood of anonymous calls is limited too,
        # before any password is checked.
        anonymous = [client.get("/v1/review/cells").status_code for _ in range(8)]
        assert anonymous[:5] == [401] * 5 and 429 in anonymous[5:], anonymous
        time.sleep(retry_after + 0.2)
        assert client.post("/v1/classify", files=one, headers=lab_a).status_code == 200
        metrics = client.get("/metrics").text
    assert 'status="429"' in metrics


def test_rate_limit_setting_is_validated() -> None:
    with pytest.raises(ValidationError, match="e.g. '20/second'"):
        Settings(rate_limit="as fast as you like")
    assert Settings(rate_limit=" 20/second;1000/minute ").rate_limit == "20/second;1000/minute"
    assert Settings(rate_limit="").rate_limit is None


# ---- headers and CORS on the review pages -------------------------------------------------------------------
SECURITY_HEADERS = {
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "cache-control": "no-store",
    "referrer-policy": "no-referrer",
}


def test_review_pages_carry_security_headers_and_no_cors(
    make_settings: Callable[..., Settings], pg_url: str, barcelona_cells: list
) -> None:
    settings = make_settings(pg_url, secure_cookies=True)
    app = create_app(settings)
    with TestClient(app) as client:
        service = Service(client, settings, app.state.db, app.state.audit)
        lab = service.add_token()
        service.add_user("rev", "reviewer")
        cell_id = client.post("/v1/classify", files=files(barcelona_cells[:1]), headers=lab).json()[
            "results"
        ][0]["id"]
        login = client.post(
            "/review/login", data={"username": "rev", "password": PASSWORD}, follow_redirects=False
        )
        cookie = login.headers["set-cookie"].lower()
        assert all(flag in cookie for flag in ("httponly", "samesite=strict", "secure", "path=/"))
        # The cookie is Secure, so the test client (plain http) would not send it back: send it by hand.
        session = {"Cookie": f"wbc_session={login.headers['set-cookie'].split(';')[0].split('=', 1)[1]}"}
        pages = {
            "login": client.get("/review/login"),
            "worklist": client.get("/review", headers=session),
            "image": client.get(f"/review/cells/{cell_id}/image", headers=session),
        }
        origin = {"Origin": "https://evil.example"}
        cross_site = [
            client.get("/v1/review/cells", headers={**session, **origin}),
            client.post("/v1/classify", files=files(barcelona_cells[:1]), headers={**lab, **origin}),
            client.get("/v2/health/ready", headers=origin),
        ]
        preflight = client.options(
            "/v1/classify",
            headers={
                **origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization",
            },
        )
    image = pages.pop("image")  # an image, not a page: its type as sniffed, never rendered as HTML
    assert image.status_code == 200 and image.headers["content-type"] in ("image/jpeg", "image/png")
    assert (
        image.headers["x-content-type-options"] == "nosniff" and "private" in image.headers["cache-control"]
    )
    for name, page in pages.items():
        assert page.status_code == 200, (name, page.status_code)
        for header, value in SECURITY_HEADERS.items():
            assert page.headers.get(header) == value, (name, header, page.headers.get(header))
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    for response in [*cross_site, preflight]:
        assert "access-control-allow-origin" not in response.headers
        assert "access-control-allow-credentials" not in response.headers
    assert preflight.status_code >= 400  # no CORS handler: a browser refuses the cross-site call


def test_image_store_content_is_served_as_an_image_not_as_html(
    make_settings: Callable[..., Settings], pg_url: str, barcelona_cells: list
) -> None:
    """An upload that is HTML but classified? It cannot be (not an image), and a stored image is served
    with its sniffed type and nosniff, so a browser never runs it as a page."""
    settings = make_settings(pg_url)
    app = create_app(settings)
    with TestClient(app) as client:
        service = Service(client, settings, app.state.db, app.state.audit)
        lab = service.add_token()
        service.add_user("rev", "reviewer")
        html = b"<html><script>alert(document.cookie)</script></html>"
        r = client.post("/v1/classify", headers=lab, files=[("files", ("x.html", html, "text/html"))])
        assert r.status_code == 422
        png = io.BytesIO()
        from PIL import Image

        Image.open(io.BytesIO(barcelona_cells[0][1])).save(png, "TIFF")
        cell_id = client.post(
            "/v1/classify", headers=lab, files=[("files", ("x.tif", png.getvalue(), "text/html"))]
        ).json()["results"][0]["id"]
        service.login("rev")
        image = client.get(f"/review/cells/{cell_id}/image")
    assert image.status_code == 200 and image.headers["content-type"] in ("image/png", "image/jpeg")
    assert image.headers["x-content-type-options"] == "nosniff"


# ---- password guessing: bounded memory -------------------------------------------------------------------------
def test_password_guessing_burst_keeps_memory_bounded(
    pg_url: str, review_registry: Path, tmp_path: Path
) -> None:
    """12 concurrent requests with wrong Basic credentials against a real server on PostgreSQL. Each
    argon2id check takes 64 MiB; before service.accounts bounded them to 2 at once, as many ran as the
    database pool had connections (15): 24 of them peaked the server at 1.1 GB. All are refused 401 (or 429/503
    when they queue too long), and the peak stays within 2 x 64 MiB of the start plus headroom."""
    import threading

    import httpx
    from procstat import load_average, peak_rss_mib, rss_mib
    from server_helpers import running_server

    env = {
        "WBC_DATABASE_URL": pg_url,
        "WBC_AUTH_REQUIRED": "true",
        "WBC_IMAGE_STORE": str(tmp_path / "cells"),
    }
    statuses: list[int] = []
    with running_server(review_registry, "wbc-review-test", env=env) as server:
        pid = server.proc.pid
        httpx.get(f"{server.url}/v1/auth/whoami", auth=("nobody", "wrong password 0"), timeout=60)  # warm
        start = rss_mib(pid)

        def guess(i: int) -> None:
            r = httpx.get(f"{server.url}/v1/review/cells", auth=(f"user{i}", f"guess {i}"), timeout=300)
            statuses.append(r.status_code)

        started = time.perf_counter()
        threads = [threading.Thread(target=guess, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - started
        peak = peak_rss_mib(pid)
    print(
        f"\n{len(statuses)} concurrent wrong passwords: {sorted(set(statuses))} in {seconds:.1f} s; RSS {start:.0f} MiB, "
        f"peak {peak:.0f} MiB; {load_average()}"
    )
    assert len(statuses) == 12 and set(statuses) <= {401, 429, 503} and 401 in statuses
    assert peak - start < 350, f"peak {peak:.0f} MiB from {start:.0f} MiB"


# ---- no patient identifiers in logs or records -------------------------------------------------------------------
def test_patient_identifiers_reach_no_log_and_no_record(
    pg_url: str, pg_admin, review_registry: Path, tmp_path: Path, jpeg_bytes: bytes
) -> None:
    """DICOM files carrying a patient's name, ID and birth date, good and broken, through a real server with
    debug logging, authentication and PostgreSQL, while the database connections are cut (the error paths
    log too). None of the three values appears in the server's output, in /metrics, in the answers, or in
    any row of any table (tests/service/test_dicom.py checks the log and metrics without the database)."""
    import threading

    import httpx
    from dicom_helpers import PATIENT, make_dicom
    from PIL import Image
    from pydicom.uid import CTImageStorage, JPEGBaseline8Bit
    from server_helpers import running_server
    from sqlalchemy import inspect, make_url

    cell = Image.open(io.BytesIO(jpeg_bytes)).convert("RGB")
    uploads = [
        make_dicom(cell, syntax=JPEGBaseline8Bit, photometric="YBR_FULL_422")[0],
        make_dicom(cell)[0],
        make_dicom(cell, pixels=False)[0],
        make_dicom(cell, sop_class=CTImageStorage)[0],
        make_dicom(cell)[0][:-5000],
    ]
    db = Database(pg_url)
    db.upgrade()
    with db.transaction() as session:
        _, token = accounts.create_token(session, AuditLog("k"), "lis-dicom", actor="test")
    env = {
        "WBC_DATABASE_URL": pg_url,
        "WBC_AUTH_REQUIRED": "true",
        "WBC_AUDIT_KEY": "k",
        "WBC_IMAGE_STORE": str(tmp_path / "cells"),
    }
    answers: list[str] = []
    database = make_url(pg_url).database
    with running_server(review_registry, "wbc-review-test", env=env, log_level="debug") as server:
        headers = {"Authorization": f"Bearer {token}"}

        def send(rounds: int) -> None:
            for i in range(rounds):
                r = httpx.post(
                    f"{server.url}/v1/classify",
                    headers=headers,
                    timeout=60,
                    files=[("files", (f"f{j}.dcm", d, "application/dicom")) for j, d in enumerate(uploads)],
                )
                answers.append(f"{r.status_code} {r.text}")

        def cut_connections() -> None:
            with pg_admin.connect() as connection:
                connection.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :db AND pid <> pg_backend_pid()"
                    ),
                    {"db": database},
                )

        send(2)
        # The database refuses connections: every request now takes the error path (503, logged).
        with pg_admin.connect() as connection:
            connection.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false'))
        try:
            cut_connections()
            send(2)
        finally:
            with pg_admin.connect() as connection:
                connection.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true'))
        # Connections cut while requests run: whatever each one hits.
        sender = threading.Thread(target=send, args=(4,))
        sender.start()
        for _ in range(3):
            time.sleep(0.3)
            cut_connections()
        sender.join()
        send(1)
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
        log = server.log()
    statuses = {a.split(" ", 1)[0] for a in answers}
    rows = []
    with db.engine.connect() as connection:
        for table in inspect(connection).get_table_names():
            rows += [str(tuple(row)) for row in connection.execute(text(f'SELECT * FROM "{table}"'))]
    db.dispose()
    print(
        f"\nDICOM with patient attributes: answers {sorted(statuses)}, {len(log.splitlines())} log lines, "
        f"{len(rows)} database rows searched"
    )
    assert statuses == {"207", "503"}, statuses
    assert "DEBUG" in log and "POST /v1/classify" in log  # the log was captured, at debug level
    assert "database unavailable" in log  # and the error path wrote to it
    for value in PATIENT.values():
        for part in value.split("^"):
            for where, haystack in (
                ("log", log),
                ("metrics", metrics),
                ("answers", "\n".join(answers)),
                ("database", "\n".join(rows)),
            ):
                assert part not in haystack, f"{part!r} appeared in the {where}"


def test_out_of_range_and_odd_ids_are_4xx_not_500(secured: Service) -> None:
    """Found by schemathesis: ids beyond the 32-bit INTEGER columns overflowed in the database (500 on
    SQLite and PostgreSQL). They are refused as 422 now, and so are non-ASCII digits in filters."""
    secured.add_user("rev", "reviewer")
    auth = ("rev", PASSWORD)
    client = secured.client
    huge = [2**31, 2**63, 10**30]
    for n in huge:
        for method, path, body in (
            ("GET", f"/review/cells/{n}/image", None),
            ("POST", f"/v1/review/cells/{n}", {"label": "neutrophil"}),
            ("GET", f"/v1/review/specimens/{n}", None),
            ("POST", f"/v1/review/specimens/{n}/sign-off", None),
        ):
            r = client.request(method, path, json=body, auth=auth)
            assert r.status_code == 422, (method, path, r.status_code, r.text[:200])
        for query in (f"specimen={n}", f"offset={n}"):
            assert client.get(f"/v1/review/cells?{query}", auth=auth).status_code == 422, query
    for odd in ("²", "١٢", "1e3", " 7 ", "-1"):
        r = client.get("/v1/review/cells", params={"specimen": odd}, auth=auth)
        assert r.status_code in (200, 422), (odd, r.status_code)
    assert client.get(f"/v1/review/cells/{2**31 - 1}", auth=auth).status_code == 405  # GET on a POST route
    assert client.get(f"/v1/review/specimens/{2**31 - 1}", auth=auth).status_code == 404
