"""The training recipe: capped class weights, seeded augmentation, the shared loop, the validation reply."""

from __future__ import annotations

import copy
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torch import nn
from torch.nn import functional as F

from federation.augment import AugmentConfig, CellAugment, named_augmentation
from federation.features import _augment_key
from federation.sites import DataRoot
from federation.task import (
    TrainConfig,
    build_contract,
    class_weights,
    evaluation_record,
    fit,
    predict_logits,
    train_local,
)
from models.calibration import CalibrationSummary
from models.contract import SHARED_CLASSES, ModelContract


def test_class_weights_are_capped_and_keep_the_loss_scale() -> None:
    # jiangxi-tecom's train split: one basophil among 213 cells.
    targets = [0] * 1 + [1] * 16 + [2] * 38 + [3] * 34 + [4] * 124
    w = class_weights(targets, 5, cap=3.0)
    counts = np.bincount(targets, minlength=5)
    assert float((w.numpy() * counts).sum()) == pytest.approx(len(targets), rel=1e-5)  # mean weight 1
    assert float(w.max() / w.min()) <= 3.0 / (len(targets) / (5 * 124)) + 1e-4  # the cap bounds the ratio
    assert w[0] == w.max()


def test_absent_classes_get_no_weight() -> None:
    w = class_weights([1, 1, 2], 5)
    assert w[0] == 0 and w[3] == 0 and w[4] == 0 and w[1] > 0


def test_pooled_counts_give_every_site_the_centralised_weights() -> None:
    site_a = [0] * 1 + [1] * 16 + [4] * 124  # few eosinophils (1) here: locally they would weigh 3x
    site_b = [1] * 60 + [2] * 50 + [4] * 40
    pooled = np.bincount(site_a + site_b, minlength=5)
    centralised = class_weights(site_a + site_b, 5)
    for site in (site_a, site_b):
        w = class_weights(site, 5, counts=pooled)
        assert torch.allclose(w, centralised)
        assert not torch.allclose(w, class_weights(site, 5))
    with pytest.raises(ValueError, match="3 classes"):
        class_weights(site_a, 5, counts=[1, 2, 3])


def _cell(side: int = 90) -> Image.Image:
    arr = np.full((side, side, 3), 235, np.uint8)
    yy, xx = np.mgrid[:side, :side]
    arr[(yy - side / 2) ** 2 + (xx - side / 2) ** 2 < (side / 4) ** 2] = (90, 40, 140)
    return Image.fromarray(arr)


def test_augmentation_is_reproducible_from_its_seed_and_changes_the_cell() -> None:
    aug = CellAugment(64)
    a = np.asarray(aug(_cell(), random.Random(7)))
    b = np.asarray(aug(_cell(), random.Random(7)))
    c = np.asarray(aug(_cell(), random.Random(8)))
    assert a.shape == (64, 64, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_no_augmentation_is_a_plain_resize() -> None:
    out = CellAugment(45, AugmentConfig.none())(_cell(90), random.Random(0))
    ref = _cell(90).resize((45, 45), Image.Resampling.BILINEAR)
    assert np.abs(np.asarray(out, float) - np.asarray(ref, float)).mean() < 6.0  # flips aside: same cell
    assert np.asarray(out)[0, 0].tolist() == [235, 235, 235]  # corners keep the background, no black fill


def test_clean_draws_leave_the_prepared_cell_as_the_service_would_see_it() -> None:
    cell = _cell(90)
    texture = AugmentConfig.texture()
    always = CellAugment(64, replace(texture, clean_p=1.0))
    assert np.array_equal(np.asarray(always(cell, random.Random(0))), np.asarray(cell))  # unchanged, full size
    # Any clean_p > 0 spends a random number per view, so its views differ from the cached ones; at 0 it
    # spends none and is left out of the benchmark's cache key (views cached before the field stay valid).
    a = np.asarray(CellAugment(64, texture)(cell, random.Random(3)))
    b = np.asarray(CellAugment(64, replace(texture, clean_p=1e-12))(cell, random.Random(3)))
    assert a.shape == b.shape == (64, 64, 3) and not np.array_equal(a, b)
    assert "clean_p" not in _augment_key(texture) and "clean_p" in _augment_key(replace(texture, clean_p=0.1))
    ninth = CellAugment(64, replace(texture, clean_p=1 / 9))
    rng = random.Random(5)
    clean = sum(ninth(cell, rng).size == cell.size for _ in range(900))
    assert 60 <= clean <= 140  # ~100 of 900


def _edge_energy(image: Image.Image) -> float:
    arr = np.asarray(image.convert("L"), dtype=np.float32)
    return float(np.mean(np.diff(arr, axis=0) ** 2) + np.mean(np.diff(arr, axis=1) ** 2))


def test_sharpening_adds_texture_and_the_default_recipe_never_draws_it() -> None:
    only_sharpen = AugmentConfig(**{**AugmentConfig.none().__dict__, "sharpen_p": 1.0})
    cell = _cell(64).filter(ImageFilter.GaussianBlur(2.0))  # a soft cell, as the low-resolution sites give
    sharpened = CellAugment(64, only_sharpen)(cell, random.Random(0))
    assert _edge_energy(sharpened) > 1.3 * _edge_energy(cell)
    # Views cached before sharpening existed stay valid: with sharpen_p = 0 the draws are unchanged.
    assert AugmentConfig().sharpen_p == 0.0
    assert AugmentConfig.texture().sharpen_p > 0 and AugmentConfig.texture().blur_p > AugmentConfig().blur_p


@pytest.mark.parametrize("name", ["default", "texture", "texture-amplitude", "strong-colour", "geometry", "none"])
def test_named_augmentations_exist_and_unknown_names_are_refused(name: str) -> None:
    assert isinstance(named_augmentation(name), AugmentConfig)
    with pytest.raises(ValueError, match="not one of"):
        named_augmentation("sepia")


def test_fit_learns_a_separable_problem_and_reports_its_steps() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long()
    model = nn.Linear(4, 2)
    batches = lambda _e: [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    out = fit(model, list(model.parameters()), batches, 4, y.tolist(), 2, TrainConfig(epochs=15, lr=0.05))
    assert out["steps"] == 60 and out["num_examples"] == 64
    assert (model(x).argmax(1) == y).float().mean() > 0.9


@pytest.mark.parametrize("frozen", [False, True])
def test_batchnorm_statistics_follow_the_site_unless_frozen(frozen: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 4) * 3.0 + 5.0  # a site whose features sit far from the pretrained statistics
    y = (x[:, 0] > 5.0).long()
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2))
    batches = lambda _e: [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    config = TrainConfig(epochs=3, lr=0.05, frozen_bn_stats=frozen)
    fit(model, list(model.parameters()), batches, 4, y.tolist(), 2, config)
    bn = model[0]
    if frozen:
        assert torch.equal(bn.running_mean, torch.zeros(4)) and torch.equal(bn.running_var, torch.ones(4))
        assert not torch.equal(bn.weight, torch.ones(4))  # the affine part still trains
    else:
        assert bn.running_mean.mean() > 3.0


def test_logit_adjustment_keeps_the_sites_class_prior_out_of_the_model() -> None:
    # A site with nine cells of class 0 for each of class 1 and none of class 2, on features that barely
    # tell 0 and 1 apart. Plain cross-entropy puts the site's prior into the biases (class 0 up by about
    # log 9, the absent class pushed down); with logit adjustment the loss already holds the prior, so the
    # model keeps what the features say. The absent class's gradient is near zero there, but AdamW rescales
    # small gradients, so it still drifts down, less than without.
    torch.manual_seed(0)
    y = torch.tensor([0] * 180 + [1] * 20)
    x = torch.randn(200, 2) + 0.3 * y[:, None]
    biases = {}
    for tau in (0.0, 1.0):
        model = nn.Linear(2, 3)
        nn.init.zeros_(model.bias)
        cfg = TrainConfig(epochs=200, lr=0.05, class_balanced=False, logit_adjustment=tau, label_smoothing=0.0)
        fit(model, list(model.parameters()), lambda _e: [(x, y)], 1, y.tolist(), 3, cfg)
        biases[tau] = model.bias.detach()
    assert biases[0.0][0] - biases[0.0][1] > 1.5 and biases[0.0][2] < -0.5
    assert abs(biases[1.0][0] - biases[1.0][1]) < 0.5 and biases[1.0][2] > biases[0.0][2] + 0.5


def test_fedprox_term_keeps_weights_near_the_global_ones() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    runs = {}
    for mu in (0.0, 10.0):
        model = nn.Linear(4, 2)
        nn.init.zeros_(model.weight)
        nn.init.zeros_(model.bias)
        anchors = [p.detach().clone() for p in model.parameters()]
        cfg = TrainConfig(epochs=10, lr=0.05, proximal_mu=mu, class_balanced=False)
        fit(
            model, list(model.parameters()), lambda _e: [(x, y)], 1, y.tolist(), 2, cfg, global_params=anchors
        )
        runs[mu] = float(model.weight.detach().norm())
    assert runs[10.0] < runs[0.0]


@pytest.mark.parametrize("tail", [0.0, 0.5])
def test_weight_averaging_ends_at_the_mean_of_the_last_iterates(tail: float) -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long()
    model = nn.Linear(4, 2)
    iterates: list[torch.Tensor] = []
    batches = lambda _e: [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    config = TrainConfig(epochs=5, lr=0.05, average_tail=tail)
    fit(model, list(model.parameters()), batches, 4, y.tolist(), 2, config,
        progress=lambda _step, _total, _loss: iterates.append(model.weight.detach().clone()))
    assert len(iterates) == 20
    expected = torch.stack(iterates[10:]).mean(0) if tail else iterates[-1]
    torch.testing.assert_close(model.weight.detach(), expected)
    assert not torch.equal(iterates[-1], torch.stack(iterates[10:]).mean(0))  # the two answers differ
    assert (model(x).argmax(1) == y).float().mean() > 0.9


def test_gradient_correction_turns_a_sites_first_step_to_the_federations_gradient() -> None:
    # SCAFFOLD's control variates (benchmarks/client_drift.py): site A's loss plus (mean gradient - A's
    # gradient) at the start descends the two sites' mean loss, not A's own.
    torch.manual_seed(0)
    xa, xb = torch.randn(32, 6), torch.randn(32, 6) + 1.5
    ya, yb = (xa[:, 0] > 0).long(), (xb[:, 1] > 1.5).long()
    start = nn.Linear(6, 2)
    grads = []
    for x, y in ((xa, ya), (xb, yb)):
        start.zero_grad()
        F.cross_entropy(start(x), y).backward()
        grads.append([p.grad.clone() for p in start.parameters()])
    mean = [(a + b) / 2 for a, b in zip(*grads)]
    config = TrainConfig(epochs=1, lr=1e-3, weight_decay=0.0, label_smoothing=0.0, class_balanced=False)
    steps = {}
    for name, correction in (("own", None), ("corrected", [m - a for m, a in zip(mean, grads[0])])):
        model = copy.deepcopy(start)
        fit(model, list(model.parameters()), lambda _e: [(xa, ya)], 1, ya.tolist(), 2, config,
            gradient_correction=correction)
        steps[name] = [p.detach() - q.detach() for p, q in zip(model.parameters(), start.parameters())]
    # Adam's first step moves every weight by lr against the sign of the gradient it was given
    for step, target in ((steps["corrected"], mean), (steps["own"], grads[0])):
        for s, g in zip(step, target):
            assert torch.equal(torch.sign(s), -torch.sign(g))
    assert any(not torch.equal(torch.sign(a), torch.sign(b)) for a, b in zip(mean, grads[0]))  # they differ


@pytest.mark.parametrize("frozen", [False, True])
def test_a_frozen_classifier_stays_where_it_started_while_the_stage_trains(frozen: bool) -> None:
    from federation.top_training import train_top
    from federation.trunk import split_model
    from models.zoo import create_model

    torch.manual_seed(0)
    split = split_model(create_model("tf_efficientnet_lite0", 3, pretrained=False, img_size=64), "stage")
    split.freeze_trunk()
    nn.init.normal_(split.model.get_classifier().weight, std=0.1)
    before = {k: v.clone() for k, v in split.top_state().items()}
    x = np.random.default_rng(0).normal(size=(12, 2, 192, 2, 2)).astype(np.float32)  # 2 views per cell
    train_top(split, x, np.arange(12) % 3, 3, TrainConfig(epochs=2, batch_size=4, frozen_classifier=frozen))
    after = split.top_state()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    classifier = {k for k in before if k.startswith("classifier.")}
    assert classifier and changed - classifier  # the stage below it trained either way
    assert (changed & classifier == set()) is frozen


class _TinyNet(nn.Module):
    def __init__(self, classes: int):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.head = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize("augment", ["default", "texture-amplitude"])
def test_train_local_on_real_cells_then_a_validation_reply(data_root: DataRoot, augment: str) -> None:
    samples = [s for c in SHARED_CLASSES for s in data_root.select(["jiangxi-tecom"], ["train"], [c])[:2]]
    contract = build_contract("tf_efficientnet_lite0", 32)
    model = _TinyNet(len(SHARED_CLASSES))
    # "texture-amplitude": half the views take another of these cells' amplitude spectra (federation.style)
    out = train_local(
        model, samples, contract, TrainConfig(epochs=1, batch_size=4), augment=named_augmentation(augment)
    )
    assert out["num_examples"] == len(samples) and out["steps"] >= 1
    assert np.isfinite(out["train_loss"]) and out["train_loss"] < 5.0  # capped weights: no 6-10 losses
    # every cell was prepared here, so its located size is in the site's size sums (models.size_prior)
    assert out["size"].count.tolist() == [sum(s.label == c for s in samples) for c in SHARED_CLASSES]
    assert np.isfinite(out["size"].total).all() and (out["size"].squares >= 0).all()
    # ... and its granule density, where the locator could measure it (models.granule_prior)
    per_class = [sum(s.label == c for s in samples) for c in SHARED_CLASSES]
    assert all(0 <= n <= m for n, m in zip(out["granules"].count.tolist(), per_class))
    assert out["granules"].count.sum() > 0 and np.isfinite(out["granules"].total).all()

    logits, targets = predict_logits(model, samples, contract)
    record = evaluation_record(logits, targets, contract)
    assert record["num-examples"] == len(samples)
    assert len(record["confusion"]) == len(SHARED_CLASSES) ** 2
    summary = CalibrationSummary.from_record(record)
    assert summary.n == len(samples)


def test_contract_temperature_is_used_in_the_reply() -> None:
    contract = ModelContract(
        architecture="x",
        class_names=("a", "b"),
        input_size=32,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        temperature=4.0,
    )
    logits = np.array([[4.0, 0.0], [0.0, 4.0]])
    hot = evaluation_record(logits, np.array([0, 1]), contract.with_updates(temperature=1.0))
    cool = evaluation_record(logits, np.array([0, 1]), contract)
    assert cool["loss"] > hot["loss"]  # softer probabilities on correct answers: higher NLL
