"""`wbc adapt --unlabelled` / `--images`: a registered version's BatchNorm statistics re-estimated on one
site's cells, no label used; registered as the site's own model with lineage.

Real parts: the federation's Publisher (ONNX + parity + weights) for the parent, real Barcelona cells (a
data root, or a bare folder with an unreadable file among them), the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from federation.sites import DataError, DataRoot
from models.contract import SHARED_CLASSES
from models.registry import Registry
from tests.federation.test_adapt import CONTRACT, PARENT, SITE, registry_with_parent, site_root  # noqa: F401

torch = pytest.importorskip("torch", reason="adapting needs the train extras (torch)")
timm = pytest.importorskip("timm", reason="adapting needs the train extras (timm)")


def _moved(parent, child) -> set[str]:
    from safetensors.torch import load_file

    before, after = load_file(str(parent.verify_weights())), load_file(str(child.verify_weights()))
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_statistics_of_the_trained_stage_only_are_re_estimated_and_checked(registry_with_parent, data_root, tmp_path):
    from federation.adapt_statistics import adapt_statistics
    from federation.site_data import SiteData
    from federation.trunk import split_model

    root = site_root(data_root, tmp_path / "site", train_per_class=22, val_per_class=3)
    site = SiteData(SITE, root)
    cells = [s.path for s in site.select("train", SHARED_CLASSES)[0]]
    val = site.select("val", SHARED_CLASSES)[0]
    reported = []
    outcome = adapt_statistics(registry_with_parent, PARENT, "latest", SITE, cells, val=val, force=True,
                               parity_root=root, work_dir=tmp_path / "work", progress=lambda *a: reported.append(a))
    assert reported == [(64, 110)], "progress per full batch: cells read of cells to read"

    assert outcome.registered and outcome.registered["status"] == "registered", outcome.registered
    assert outcome.cells == 64 and not outcome.unreadable and outcome.checked  # 110 cells: one full batch
    assert outcome.before.n == outcome.after.n == 15

    parent = Registry(registry_with_parent, PARENT).resolve("latest")
    child = Registry(registry_with_parent, f"{PARENT}-{SITE}").resolve("latest")
    assert child.metadata["source"] == "adapted-statistics"
    assert child.metadata["adapted_from"]["version"] == parent.version
    assert child.metadata["statistics"]["cells"] == 64 and child.metadata["statistics"]["train_top"] == "stage"
    assert child.metadata["training"]["augment"] == "texture"
    moved = _moved(parent, child)
    top = set(split_model(timm.create_model(CONTRACT.architecture, num_classes=5), "stage").top_state_keys())
    assert moved, "the statistics did not change"
    assert all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in moved), sorted(moved)
    assert moved <= top, "the frozen trunk's statistics must stay the parent's"
    assert any(k.startswith("bn2.") for k in moved)
    assert outcome.layers == len({k for k in moved if k.endswith("running_mean")}) > 1

    # Reviewed cells later fine-tune this version with the federation's recipe, which travelled on.
    from federation.adapt import AdaptSettings, adapt_version

    tuned = adapt_version(registry_with_parent, f"{PARENT}-{SITE}", "latest", site, target_model="wbc-test-tuned",
                          settings=AdaptSettings(force=True), work_dir=tmp_path / "tuned")
    assert tuned.training["augment"] == "texture" and tuned.training["train_top"] == "stage"
    assert tuned.training["epochs"] == 2 and tuned.registered["status"] == "registered"


def test_a_bare_folder_with_an_unreadable_file_via_the_cli(registry_with_parent, data_root, tmp_path):
    from cli.main import app

    folder = tmp_path / "crops"
    folder.mkdir()
    for i, s in enumerate(DataRoot(data_root.root).select([SITE], ["train"])[:105]):
        (folder / f"cell-{i:03d}{s.path.suffix}").symlink_to(s.path)
    (folder / "broken.png").write_bytes(b"not an image")
    result = CliRunner().invoke(app, ["adapt", SITE, "--images", str(folder), "--registry", str(registry_with_parent),
                                      "--model-name", PARENT, "--version", "latest", "--as", "wbc-test-folder",
                                      "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["cells"] == 64 and report["unreadable"] == 1 and report["checked"] is False
    assert report["val_before"] is None and report["registered"]["status"] == "registered"
    assert Registry(registry_with_parent, "wbc-test-folder").resolve("latest").metadata["statistics"]["unreadable"] == 1


def test_too_few_cells_or_no_cells_given_are_refused(registry_with_parent, data_root, tmp_path):
    from cli.main import app
    from federation.adapt_statistics import MIN_CELLS, adapt_statistics

    few = [s.path for s in DataRoot(data_root.root).select([SITE], ["train"])[: MIN_CELLS - 1]]
    with pytest.raises(DataError, match=f"{MIN_CELLS - 1} cell images; at least {MIN_CELLS}"):
        adapt_statistics(registry_with_parent, PARENT, "latest", SITE, few, work_dir=tmp_path)
    result = CliRunner().invoke(app, ["adapt", SITE, "--unlabelled", "--registry", str(registry_with_parent),
                                      "--model-name", PARENT])
    assert result.exit_code == 2 and "--data-root or an --images folder" in result.output
    result = CliRunner().invoke(app, ["adapt", SITE, "--images", str(tmp_path / "nowhere"), "--registry",
                                      str(registry_with_parent), "--model-name", PARENT])
    assert result.exit_code == 2 and "not a folder of cell images" in result.output
