"""The benchmark machinery on tiny inputs: trunk/top splits, cached views, partitions, in-process federation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

from federation.augment import AugmentConfig
from federation.features import trunk_features
from federation.benchmark.handlers import SiteFeatures
from federation.benchmark.partition import describe, dirichlet_partition
from federation.benchmark.protocols import PROTOCOL_SITES, paper_layout
from federation.prepared import PreparedImages
from federation.benchmark.runs import Recipe, train_federated, train_pooled
from federation.sites import DataRoot, Sample
from federation.task import build_contract
from federation.trunk import split_model
from models.contract import SHARED_CLASSES
from models.preprocess import preprocess
from models.zoo import create_model


@pytest.mark.parametrize(
    "architecture, size",
    [("tf_efficientnet_lite0", 64), ("vit_small_patch14_dinov2", 28), ("resnet34", 64)],
)
@pytest.mark.parametrize("top", ["head", "stage", "two-stages"])
def test_top_of_trunk_is_the_whole_model(architecture: str, size: int, top: str) -> None:
    torch.manual_seed(0)
    model = create_model(architecture, 5, pretrained=False, img_size=size).eval()
    split = split_model(model, top)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        whole = model(x)
        split.top.eval()
        parts = split.top(split.trunk_features(x))
    torch.testing.assert_close(parts, whole, rtol=1e-4, atol=1e-4)
    keys = split.top_state_keys()
    assert keys and set(keys) < set(model.state_dict())
    split.freeze_trunk()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable <= set(keys)


@pytest.mark.parametrize("architecture", ["tf_efficientnet_lite0", "vit_small_patch14_dinov2", "resnet34"])
def test_each_wider_top_trains_what_the_narrower_one_does_and_one_block_group_more(architecture: str) -> None:
    model = create_model(architecture, 5, pretrained=False, img_size=28 if "vit" in architecture else 64)
    head, stage, two = (set(split_model(model, top).top_state_keys()) for top in ("head", "stage", "two-stages"))
    assert head < stage < two
    added = {".".join(k.split(".")[:2]) if k.startswith("blocks.") else k.split(".")[0] for k in two - stage}
    assert len(added) == 1, added  # exactly one more block group (or ResNet layer)


def test_views_are_exact_then_seeded_and_cached(data_root: DataRoot, tmp_path: Path) -> None:
    samples = data_root.select(["bccd"], ["val"])[:3]
    contract = build_contract("tf_efficientnet_lite0", 32)
    prepared = PreparedImages.build(samples, contract, tmp_path / "prepared", log=lambda _s: None)
    again = PreparedImages.build(samples[1:], contract, tmp_path / "prepared", log=lambda _s: None)
    assert np.array_equal(again.array(0), prepared.array(1))

    split = split_model(create_model("tf_efficientnet_lite0", 5, pretrained=False).eval(), "head")
    feats = trunk_features(
        split,
        samples,
        prepared,
        contract,
        views=2,
        augment=AugmentConfig(),
        cache_dir=tmp_path / "features",
        log=lambda _s: None,
    )
    assert feats.shape == (3, 3, 1280) and feats.dtype == np.float16
    from PIL import Image

    with Image.open(samples[0].path) as img:
        exact = split.trunk_features(torch.from_numpy(preprocess(img, contract))[None]).numpy()[0]
    np.testing.assert_allclose(feats[0, 0], exact, rtol=2e-2, atol=2e-2)  # view 0 = the service's input
    assert not np.allclose(feats[0, 1], feats[0, 0])
    cached = trunk_features(
        split,
        samples,
        prepared,
        contract,
        views=2,
        augment=AugmentConfig(),
        cache_dir=tmp_path / "features",
        log=lambda _s: None,
    )
    assert np.array_equal(np.asarray(cached), feats)


def _samples(counts: dict[str, int]) -> list[Sample]:
    return [Sample(Path(f"/x/{c}{i}.jpg"), "s", c, "train", "") for c, n in counts.items() for i in range(n)]


@pytest.mark.parametrize("held", ["barcelona-pbc", "tehran-lisc", "jiangxi-tecom", "bccd"])
def test_leave_one_site_out_layout_never_trains_on_the_held_out_site(data_root: DataRoot, held: str) -> None:
    """Protocol 3: each of the four sites in turn is the external set, the other three train; Barcelona held
    out is protocol 1's layout."""
    layout = paper_layout(data_root, external_site=held)
    sites = {s.site for s in layout.samples}
    assert sites == set(PROTOCOL_SITES) and held not in layout.train and held not in layout.val
    assert set(layout.train) == set(layout.val) == sites - {held}
    placed = [i for part in (layout.train, layout.val, layout.evaluation) for idx in part.values() for i in idx]
    assert len(placed) == len(set(placed)) == len(layout.samples), "every cell in exactly one set"
    for name, split in (("train", layout.train), ("val", layout.val)):
        assert all(layout.samples[i].site == site and layout.samples[i].split == name
                   for site, idx in split.items() for i in idx)
    assert {(layout.samples[i].site, layout.samples[i].split) for i in layout.evaluation["internal"]} == {
        (site, "test") for site in sites - {held}}
    external = [layout.samples[i] for i in layout.evaluation["external"]]
    assert [s.path for s in external] == [s.path for s in data_root.select([held], classes=SHARED_CLASSES)]
    assert {s.label for s in layout.samples} == set(SHARED_CLASSES)
    if held == "barcelona-pbc":
        assert paper_layout(data_root) == layout
    with pytest.raises(ValueError, match="not one of"):
        paper_layout(data_root, external_site="elsewhere")


def test_dirichlet_partition_is_seeded_complete_and_skewed() -> None:
    samples = _samples({"a": 200, "b": 150, "c": 100, "d": 80})
    parts = dirichlet_partition(samples, 4, 0.5, seed=3)
    assert parts == dirichlet_partition(samples, 4, 0.5, seed=3)
    assert sorted(i for p in parts for i in p) == list(range(len(samples)))
    shares = np.array([[c.get(k, 0) for k in "abcd"] for c in describe(samples, parts)], dtype=float)
    shares /= shares.sum(axis=0, keepdims=True)
    assert shares.max() > 0.5  # some site holds most of some class: label skew
    assert parts != dirichlet_partition(samples, 4, 0.5, seed=4)


def test_dirichlet_partition_keeps_groups_together() -> None:
    samples = [Sample(Path(f"/x/{i}.jpg"), "s", "ab"[i % 2], "train", f"g{i // 4}") for i in range(80)]
    parts = dirichlet_partition(samples, 3, 0.5, seed=0, min_per_site=1)
    where = {i: k for k, p in enumerate(parts) for i in p}
    for g in range(20):
        assert len({where[i] for i in range(80) if samples[i].group == f"g{g}"}) == 1


def _site(name: str, rng: np.random.Generator, n: int = 40) -> SiteFeatures:
    y = np.arange(n) % 5
    centres = np.eye(5, 1280, dtype=np.float32) * 6.0
    x = (centres[y][:, None, :] + rng.normal(0, 0.1, (n, 2, 1280))).astype(np.float16)
    vy = np.arange(10) % 5
    vx = (centres[vy] + rng.normal(0, 0.1, (10, 1280))).astype(np.float16)
    return SiteFeatures(name, x, y, vx, vy)


@pytest.mark.parametrize("strategy", ["fedavg", "fedmedian", "fedadam"])
def test_federated_top_runs_flower_strategies_in_process(strategy: str) -> None:
    rng = np.random.default_rng(0)
    sites = {s: _site(s, rng) for s in ("site-a", "site-b")}
    contract = build_contract("tf_efficientnet_lite0", 64)
    recipe = Recipe(rounds=2, local_epochs=2, lr=0.01, batch_size=16)
    before = TaskIdentity._run_id
    model = train_federated(strategy, contract, "head", sites, recipe, seed=0)
    assert TaskIdentity._run_id == before  # the in-process server identity is given back
    assert model.messages == 2 * 2 * 2  # rounds x (train + evaluate) x sites
    assert set(model.curves) == set(sites) and all(len(c) == 2 for c in model.curves.values())
    assert model.val_calibration is not None and model.val_calibration.n == 20
    x = np.concatenate([s.val_x for s in sites.values()])
    y = np.concatenate([s.val_y for s in sites.values()])
    assert (model.logits(x).argmax(1) == y).mean() > 0.8


def test_pooled_and_federated_rows_start_from_the_same_seeded_model() -> None:
    rng = np.random.default_rng(1)
    site = _site("only", rng)
    contract = build_contract("tf_efficientnet_lite0", 64)
    recipe = Recipe(rounds=1, local_epochs=1, lr=1e-9, batch_size=64)  # ~no training: the start shows
    a = train_pooled(contract, "head", site.train_x, site.train_y, [], recipe, seed=5)
    b = train_federated("fedavg", contract, "head", {"only": site}, recipe, seed=5)
    np.testing.assert_allclose(a.logits(site.val_x), b.logits(site.val_x), rtol=1e-4, atol=1e-4)
    assert SHARED_CLASSES == contract.class_names


@pytest.mark.slow  # ~1 min idle, several under load: four real ClientApp messages training EfficientNet-Lite0
def test_full_rows_run_the_deployments_clientapp_in_process(
    data_root: DataRoot, tiny_root_factory, tmp_path: Path
) -> None:
    from federation.benchmark.full import train_full_federated

    sites = ("jiangxi-tecom", "bccd")
    classes = ("eosinophil", "lymphocyte", "neutrophil")
    root = DataRoot(
        tiny_root_factory(data_root, tmp_path / "data", sites, classes, train_per_class=2, val_per_class=1)
    )
    contract = build_contract("tf_efficientnet_lite0", 32, class_names=classes)
    recipe = Recipe(rounds=1, local_epochs=1, lr=1e-3, batch_size=4)
    model = train_full_federated(
        "fedavg", contract, root, sites, recipe, 0, tmp_path / "sites", train_top="stage"
    )
    assert model.messages == 1 * 2 * 2
    assert set(model.curves) == set(sites)
    assert model.val_calibration is not None and model.val_calibration.n == len(sites) * len(classes)
    logits = model.logits(root.select(list(sites), ["val"]))
    assert logits.shape == (len(sites) * len(classes), len(classes))
