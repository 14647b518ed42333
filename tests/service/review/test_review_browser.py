"""End to end in a real browser: Debian's chromium, driven by Playwright, against the service on a real
port with PostgreSQL. A lab system classifies two specimens; a reviewer signs in, filters, reclassifies
two cells with number keys, confirms the rest with Enter, signs off. Screenshots go to test-artifacts/.

Needs chromium (scripts/install-browser.sh); skipped, saying so, when it is missing, unless
WBC_REQUIRE_BROWSER=1.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from review_helpers import PASSWORD, files
from sqlalchemy import select

from service import accounts
from service.db.models import Review
from service.main import create_app

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).resolve().parents[3] / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_path() -> str:
    for candidate in (
        os.environ.get("WBC_CHROMIUM"),
        "/usr/bin/chromium",
        "/usr/bin/chromium-headless-shell",
        shutil.which("chromium"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    message = "needs Debian's chromium (scripts/install-browser.sh: apt-get install chromium)"
    if os.environ.get("WBC_REQUIRE_BROWSER") == "1":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture()
def live_service(make_settings, pg_url: str) -> Iterator[tuple[str, object]]:
    """The app served by uvicorn on a free port in a thread of this process."""
    app = create_app(make_settings(pg_url))
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the service did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", app
    server.should_exit = True
    thread.join(timeout=10)


def test_review_in_the_browser(live_service, barcelona_cells) -> None:
    executable = chromium_path()
    from playwright.sync_api import expect, sync_playwright

    url, app = live_service
    db, log = app.state.db, app.state.audit
    with db.transaction() as session:
        accounts.create_user(session, log, "dr-rivera", PASSWORD, "reviewer", actor="test")
        _, token = accounts.create_token(session, log, "lis-barcelona", actor="test")
    lab = {"Authorization": f"Bearer {token}"}
    for specimen, cells in (("BCN-2026-0042", barcelona_cells), ("BCN-2026-0043", barcelona_cells[:2])):
        answer = httpx.post(
            f"{url}/v1/classify", files=files(cells), data={"specimen": specimen}, headers=lab, timeout=60
        )
        assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    specimen_cells = len(barcelona_cells)

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.set_default_timeout(15_000)
        try:
            # Log in (the worklist sends a browser without a session to the form).
            page.goto(f"{url}/review")
            expect(page).to_have_url(f"{url}/review/login?next=%2Freview")
            page.fill("input[name=username]", "dr-rivera")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            expect(page.get_by_test_id("who")).to_contain_text("dr-rivera")
            expect(page.get_by_test_id("cell")).to_have_count(specimen_cells + 2)

            # Filter: the second specimen by its predicted class, then "unidentified", then the first specimen.
            page.get_by_test_id("filter-specimen").select_option(label="BCN-2026-0043 (2/2 to review)")
            expect(page.get_by_test_id("cell")).to_have_count(2)
            page.get_by_test_id("filter-predicted").select_option(results[0]["label"])
            expect(page.get_by_test_id("cell")).to_have_count(
                sum(r["label"] == results[0]["label"] for r in results)
            )
            page.goto(f"{url}/review")
            page.get_by_test_id("filter-unidentified").check()
            unidentified = httpx.get(
                f"{url}/v1/review/cells", params={"unidentified": True}, auth=("dr-rivera", PASSWORD)
            ).json()["total"]
            expect(page.get_by_test_id("count")).to_contain_text(f"{unidentified} cell")
            page.goto(f"{url}/review")
            page.get_by_test_id("filter-specimen").select_option(
                label=f"BCN-2026-0042 ({specimen_cells}/{specimen_cells} to review)"
            )
            expect(page.get_by_test_id("cell")).to_have_count(specimen_cells)
            expect(page.get_by_test_id("signoff")).to_be_disabled()

            # Reclassify two cells with a number key each; the selection moves on by itself.
            corrected = []
            for _ in range(2):
                card = page.locator("article.cell.selected")
                current = card.get_attribute("data-label")
                choices = card.locator("button.choice").all_inner_texts()
                key = next(i + 1 for i, text in enumerate(choices) if text.split()[-1] != current)
                cell_id = card.get_attribute("data-id")
                page.keyboard.press(str(key))
                done = page.locator(f'article.cell[data-id="{cell_id}"]')
                expect(done).to_have_class(_has("status-corrected"))
                corrected.append(int(cell_id))
            page.screenshot(path=str(ARTIFACTS / "review-worklist.png"), full_page=True)

            # Confirm the rest with Enter (an unidentified cell needs a class: key 1).
            for _ in range(specimen_cells - 2):
                card = page.locator("article.cell.selected")
                cell_id = card.get_attribute("data-id")
                page.keyboard.press("1" if card.get_attribute("data-label") == "unidentified" else "Enter")
                expect(page.locator(f'article.cell[data-id="{cell_id}"]')).not_to_have_class(
                    _has("status-unreviewed")
                )

            # Sign off, once the button says it may.
            expect(page.get_by_test_id("signoff")).to_be_enabled()
            page.get_by_test_id("signoff").click()
            expect(page.get_by_test_id("signed-off")).to_contain_text("Signed off by dr-rivera")
            expect(page.locator("button.choice:disabled").first).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "review-signed-off.png"), full_page=True)
        finally:
            browser.close()

    with db.transaction() as session:
        reviews = session.scalars(select(Review).where(Review.cell_id.in_(corrected))).all()
        assert all(r.reviewer == "dr-rivera" and r.old_label != r.new_label for r in reviews)
        assert len(reviews) == 2
        assert log.verify(session).ok


def _has(css_class: str):
    import re

    return re.compile(rf"(^|\s){re.escape(css_class)}(\s|$)")
