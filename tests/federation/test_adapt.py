"""`wbc adapt`: a registered federated version fine-tuned on one site's cells becomes that site's own
model, with lineage back to its parent; versions without weights and sites without val cells are refused.

Real parts: a timm test network exported and registered by the federation's Publisher (ONNX + parity +
weights), real Barcelona cells in a site data root, the real training loop and ONNX export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from federation.sites import DataError, DataRoot, Sample, write_manifest
from federation.site_data import SiteData
from models.contract import SHARED_CLASSES, ModelContract
from models.registry import Registry, RegistryError

torch = pytest.importorskip("torch", reason="adapting needs the train extras (torch)")
timm = pytest.importorskip("timm", reason="adapting needs the train extras (timm)")

SITE = "barcelona-pbc"
PARENT = "wbc-test"
CONTRACT = ModelContract(architecture="test_efficientnet", class_names=SHARED_CLASSES, input_size=64,
                         mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), temperature=1.3)
TRAINED = {"training": {"num_server_rounds": 1, "local_epochs": 2, "lr": 0.01, "batch_size": 8, "seed": 0},
           "flower": {"run_config": {"train-top": "stage", "augment": "texture"}}}


def site_root(data_root: DataRoot, dest: Path, train_per_class: int, val_per_class: int) -> Path:
    """A data root holding a few of one site's cells (class folders symlinked, its own manifest)."""
    picked = []
    for label in SHARED_CLASSES:
        for split, n in (("train", train_per_class), ("val", val_per_class)):
            picked += data_root.select([SITE], [split], [label])[:n]
    folder = dest / "sites" / SITE
    folder.mkdir(parents=True)
    for label in {s.label for s in picked}:
        (folder / label).symlink_to(next(s.path.parent for s in picked if s.label == label))
    write_manifest(dest, [Sample(folder / s.label / s.path.name, s.site, s.label, s.split, s.group) for s in picked])
    return dest


@pytest.fixture(scope="module")
def registry_with_parent(tmp_path_factory, data_root: DataRoot) -> Path:
    from federation.publish import Publisher

    root = tmp_path_factory.mktemp("registry")
    torch.manual_seed(0)
    model = timm.create_model(CONTRACT.architecture, pretrained=False, num_classes=CONTRACT.num_classes)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        # trained-looking statistics, so that a reset to the initial 0 / 1 shows as a change in the tests
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.8, 1.5)
    cells = [data_root.select(["tehran-lisc"], ["test"], [c])[0].path for c in SHARED_CLASSES]
    publisher = Publisher(registry_root=root, model_name=PARENT, contract=CONTRACT, model=model,
                          parity_images=cells, work_dir=tmp_path_factory.mktemp("work"))
    outcome = publisher.publish(model.state_dict(), dict(TRAINED))
    assert outcome.registered, outcome.reason
    return root


def test_the_federation_registers_weights_beside_the_onnx(registry_with_parent: Path):
    from safetensors.torch import load_file

    parent = Registry(registry_with_parent, PARENT).resolve("latest")
    weights = load_file(str(parent.verify_weights()))
    model = timm.create_model(CONTRACT.architecture, pretrained=False, num_classes=CONTRACT.num_classes)
    model.load_state_dict(weights, strict=True)  # every tensor, nothing extra
    original = parent.weights_path.read_bytes()
    parent.weights_path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    try:
        with pytest.raises(RegistryError, match="does not match"):
            parent.verify_weights()
    finally:  # the other tests adapt from this version
        parent.weights_path.write_bytes(original)


def test_adapting_registers_the_sites_own_version_with_lineage(registry_with_parent, data_root, tmp_path):
    from safetensors.torch import load_file

    from federation.adapt import AdaptSettings, adapt_version

    root = site_root(data_root, tmp_path / "site", train_per_class=4, val_per_class=3)
    outcome = adapt_version(registry_with_parent, PARENT, "latest", SiteData(SITE, root),
                            settings=AdaptSettings(force=True), work_dir=tmp_path / "work")
    assert outcome.registered and outcome.registered["status"] == "registered", outcome.registered
    assert outcome.target_model == f"{PARENT}-{SITE}" and outcome.train_counts == {c: 4 for c in SHARED_CLASSES}
    assert outcome.before.n == outcome.after.n == 15
    assert outcome.training["epochs"] == 2 and outcome.training["train_top"] == "stage"

    parent = Registry(registry_with_parent, PARENT).resolve("latest")
    child = Registry(registry_with_parent, outcome.target_model).resolve("latest")
    assert child.metadata["adapted_from"] == {"model_name": PARENT, "version": parent.version, "sha256": parent.sha256}
    assert child.metadata["site"] == SITE and child.metadata["sites"][SITE]["train_examples"] == 20
    assert child.contract.temperature == pytest.approx(child.metadata["calibration"]["temperature"])
    assert child.sha256 != parent.sha256
    assert child.metadata["training"]["augment"] == "texture" and child.metadata["training"]["epochs"] == 2
    # Only the federation's trained top moved: the frozen trunk is the parent's, tensor for tensor.
    before, after = load_file(str(parent.verify_weights())), load_file(str(child.verify_weights()))
    from federation.trunk import split_model

    top = set(split_model(timm.create_model(CONTRACT.architecture, num_classes=5), "stage").top_state_keys())
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and moved <= top, sorted(moved - top)
    assert any(k.startswith("classifier") for k in moved) and len(top) < len(before)

    # An adapted version adapts again with the recipe it recorded (not the defaults).
    again = adapt_version(registry_with_parent, outcome.target_model, "latest", SiteData(SITE, root),
                          target_model="wbc-test-again", settings=AdaptSettings(force=True), work_dir=tmp_path / "w2")
    assert again.training == outcome.training and again.registered["status"] == "registered"


def test_refused_without_weights_or_val_cells_or_under_the_parents_name(registry_with_parent, data_root, tmp_path):
    from federation.adapt import adapt_version

    few_val = site_root(data_root, tmp_path / "few", train_per_class=2, val_per_class=1)
    with pytest.raises(DataError, match="5 val cells; at least 10"):
        adapt_version(registry_with_parent, PARENT, "latest", SiteData(SITE, few_val), work_dir=tmp_path)
    with pytest.raises(RegistryError, match="another model name"):
        adapt_version(registry_with_parent, PARENT, "latest", SiteData(SITE, few_val), target_model=PARENT)

    old = Registry(registry_with_parent, "wbc-old")
    parent = Registry(registry_with_parent, PARENT).resolve("latest")
    old.register(parent.onnx_path, CONTRACT, dict(TRAINED))  # as registered before weights were kept
    result = CliRunner().invoke(_app(), ["adapt", SITE, "--data-root", str(few_val), "--registry",
                                         str(registry_with_parent), "--model-name", "wbc-old", "--version", "1"])
    assert result.exit_code == 2
    assert "registered without its network weights" in result.output


def _app():
    from cli.main import app

    return app


def test_the_cli_reports_before_and_after_as_json(registry_with_parent, data_root, tmp_path):
    root = site_root(data_root, tmp_path / "site", train_per_class=3, val_per_class=2)
    result = CliRunner().invoke(_app(), ["adapt", SITE, "--data-root", str(root), "--registry", str(registry_with_parent),
                                         "--model-name", PARENT, "--version", "1", "--as", "wbc-test-json",
                                         "--epochs", "1", "--force", "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    assert body["registered"]["status"] == "registered" and body["target_model"] == "wbc-test-json"
    assert body["val_before"]["n"] == body["val_after"]["n"] == 10 and body["training"]["epochs"] == 1
