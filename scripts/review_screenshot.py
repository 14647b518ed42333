"""Make docs/img/review-worklist.png: the review worklist with a real model's predictions on Barcelona cells.

    .venv/bin/python scripts/review_screenshot.py [--out docs/img/review-worklist.png]

The model is the default contract's backbone (offline ImageNet weights) with only its head fitted on a
few hundred training-split crops of the four sites (frozen features + softmax regression, about a
minute on 2 CPU cores; cached under var/docs-review/). It is a picture model, not a benchmark result.
The service then runs on a free port with auth on and a throw-away SQLite database, a lab token
classifies two Barcelona specimens (test split), and Debian's chromium signs in, opens one specimen,
reclassifies one cell with a number key and confirms one with Enter before the screenshot.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "var" / "docs-review"
MODEL_NAME = "wbc-classifier"
SITE = "barcelona-pbc"
PASSWORD = "screenshot-password"


def build_registry() -> Path:
    registry = CACHE / "registry"
    if (registry / MODEL_NAME / "1" / "model.onnx").is_file():
        return registry
    import torch
    from PIL import Image

    from federation.sites import DataRoot, default_data_root
    from federation.task import build_contract, create_model_from_contract
    from models.export import export_onnx
    from models.preprocess import preprocess
    from models.registry import Registry

    torch.set_num_threads(2)
    torch.manual_seed(0)
    contract = build_contract().model_copy(update={"abstain_threshold": 0.45, "temperature": 2.0})
    model = create_model_from_contract(contract).eval()
    root = DataRoot(default_data_root())
    samples = []
    for site in root.sites:
        for index, label in enumerate(contract.class_names):
            samples += root.select([site], ["train"], [label])[:40]
    print(f"features of {len(samples)} training crops …", flush=True)
    features, targets = [], []
    with torch.no_grad():
        for start in range(0, len(samples), 32):
            chunk = samples[start : start + 32]
            batch = torch.from_numpy(np.stack([preprocess(Image.open(s.path), contract) for s in chunk]))
            features.append(model.forward_head(model.forward_features(batch), pre_logits=True))
            targets += [contract.class_names.index(s.label) for s in chunk]
    x, y = torch.cat(features), torch.tensor(targets)
    head = model.get_classifier()
    optimiser = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(60):  # a light fit: a picture model should not look certain of everything
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), y)
        loss.backward()
        optimiser.step()
    print(f"head fitted (training loss {loss.item():.3f})", flush=True)
    onnx_path = export_onnx(model, contract, CACHE / "model.onnx")
    Registry(registry, MODEL_NAME).register(
        onnx_path, contract, {"lineage": {"run_id": "docs-screenshot", "note": "linear head only"}}
    )
    return registry


def serve(registry: Path, workdir: Path):
    import uvicorn

    from service.config import Settings
    from service.main import create_app

    settings = Settings(
        registry=registry,
        model_name=MODEL_NAME,
        device="cpu",
        site=SITE,
        auth_required=True,
        database_url=f"sqlite:///{workdir}/wbc.db",
        image_store=workdir / "cells",
        review_extra_labels="erythroblast,ig,platelet",
    )
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, app, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "review-worklist.png")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    from federation.sites import DataRoot, default_data_root
    from service import accounts

    registry = build_registry()
    root = DataRoot(default_data_root())
    with tempfile.TemporaryDirectory() as tmp:
        server, app, url = serve(registry, Path(tmp))
        with app.state.db.transaction() as session:
            accounts.create_user(session, app.state.audit, "dr-rivera", PASSWORD, "reviewer", actor="docs")
            _, token = accounts.create_token(session, app.state.audit, "lis-barcelona", actor="docs")
        picks = {
            "BCN-2026-0042": [
                "neutrophil",
                "neutrophil",
                "lymphocyte",
                "monocyte",
                "eosinophil",
                "basophil",
                "ig",
                "neutrophil",
                "lymphocyte",
            ],
            "BCN-2026-0043": ["neutrophil", "lymphocyte", "monocyte"],
        }
        for specimen, labels in picks.items():
            used: dict[str, int] = {}
            files = []
            for label in labels:
                sample = root.select([SITE], ["test"], [label])[
                    used.get(label, 0) + (specimen[-1] == "3") * 5
                ]
                used[label] = used.get(label, 0) + 1
                files.append(("files", (sample.path.name, sample.path.read_bytes(), "image/jpeg")))
            answer = httpx.post(
                f"{url}/v1/classify",
                files=files,
                data={"specimen": specimen},
                timeout=120,
                headers={"Authorization": f"Bearer {token}"},
            )
            answer.raise_for_status()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path="/usr/bin/chromium",
                headless=True,
                args=[
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--no-first-run",
                ],
            )
            page = browser.new_page(viewport={"width": 1440, "height": 1080})
            page.goto(f"{url}/review")
            page.fill("input[name=username]", "dr-rivera")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.get_by_test_id("filter-specimen").select_option(index=1)
            page.wait_for_selector("article.cell.selected")
            experts = picks["BCN-2026-0042"]
            for expert in experts[:3]:  # the reviewer's decisions on the first three cells
                card = page.locator("article.cell.selected")
                cell_id = card.get_attribute("data-id")
                labels = [text.split()[-1] for text in card.locator("button.choice").all_inner_texts()]
                if card.get_attribute("data-label") == expert:
                    page.keyboard.press("Enter")
                else:
                    page.keyboard.press(str(labels.index(expert) + 1))
                page.wait_for_selector(f'article.cell[data-id="{cell_id}"]:not(.status-unreviewed)')
            page.mouse.move(0, 0)
            page.evaluate("window.scrollTo({top: 0, behavior: 'instant'})")
            page.wait_for_timeout(300)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out))
            browser.close()
        server.should_exit = True
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
