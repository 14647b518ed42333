"""The site cache (federation.site_cache): what a frozen trunk computed once answers what it would compute again."""

from __future__ import annotations

import multiprocessing
import os
import time
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from federation.augment import AugmentConfig
from federation.disk_cache import save_array
from federation.site_cache import SiteCache, view_averaged_logits
from federation.sites import DataRoot, Sample
from federation.task import (
    CellDataset,
    TrainConfig,
    build_contract,
    create_model_from_contract,
    predict_logits,
    granule_statistics_of,
    seed_everything,
    size_statistics_of,
    train_local,
)
from federation.trunk import split_model
from models.contract import SHARED_CLASSES


def _cells(data_root: DataRoot, per_class: int = 2) -> list[Sample]:
    return [s for c in SHARED_CLASSES for s in data_root.select(["jiangxi-tecom"], ["train"], [c])[:per_class]]


def _split(contract, seed: int = 0, top: str = "stage"):
    seed_everything(seed)
    split = split_model(create_model_from_contract(contract, pretrained=False), top)
    split.freeze_trunk()
    return split


@pytest.mark.parametrize("views, top", [("turns-zooms", "stage"), ("none", "stage"), ("turns-zooms", "two-stages")])
def test_cached_test_views_answer_what_the_full_model_answers(
    data_root: DataRoot, tmp_path: Path, views: str, top: str
) -> None:
    samples = _cells(data_root)
    contract = build_contract("tf_efficientnet_lite0", 64, test_views=views)
    split = _split(contract, top=top)
    cache = SiteCache(tmp_path)
    prepared = cache.prepared(samples, contract)
    feats = cache.test_view_features(split, samples, prepared, contract)
    cached = view_averaged_logits(split, feats, contract)
    direct, _targets = predict_logits(split.model, samples, contract)
    np.testing.assert_allclose(cached, direct, rtol=1e-4, atol=1e-4)
    # A second evaluation reads the file; a different trunk (another run's weights) does not.
    (stored,) = (tmp_path / "features").glob("test-views-*.npy")
    again = cache.test_view_features(split, samples, prepared, contract)
    assert np.array_equal(again, feats) and len(list((tmp_path / "features").glob("test-views-*.npy"))) == 1
    other = _split(contract, seed=1, top=top)
    with torch.no_grad():
        other.model.conv_stem.weight.mul_(1.01)
    cache.test_view_features(other, samples, prepared, contract)
    assert len(list((tmp_path / "features").glob("test-views-*.npy"))) == 2 and stored.is_file()


def test_prepared_cells_carry_the_measures_the_fresh_path_sends(data_root: DataRoot, tmp_path: Path) -> None:
    samples = _cells(data_root)
    contract = build_contract("tf_efficientnet_lite0", 64)
    prepared = SiteCache(tmp_path).prepared(samples, contract)
    dataset = CellDataset(samples, contract)
    fresh_size, fresh_granules = dataset.opinion_statistics()
    cached_size = size_statistics_of(prepared.diameters, dataset.targets, contract)
    cached_granules = granule_statistics_of(prepared.granules, dataset.targets, contract)
    for fresh, cached in ((fresh_size, cached_size), (fresh_granules, cached_granules)):
        assert fresh is not None and cached is not None
        np.testing.assert_allclose(cached.total, fresh.total)
        np.testing.assert_allclose(cached.squares, fresh.squares)
        assert cached.count.tolist() == fresh.count.tolist() and cached.count.sum() > 0
    for i in range(len(samples)):
        assert np.array_equal(prepared.array(i), np.asarray(dataset.prepared(i)))
    # Read back from disk the second time: the same cells and sizes.
    again = SiteCache(tmp_path).prepared(samples, contract)
    assert np.array_equal(again.buffer, prepared.buffer) and np.array_equal(again.diameters, prepared.diameters)
    assert np.array_equal(again.granules, prepared.granules, equal_nan=True)


def test_view_pool_is_clean_first_then_seeded_views_and_follows_the_files(data_root: DataRoot, tmp_path: Path) -> None:
    source = _cells(data_root, per_class=1)
    folder = tmp_path / "site"
    folder.mkdir()
    samples = []
    for s in source:  # copies, so that one can be replaced as a hospital might
        shutil.copy(s.path, folder / s.path.name)
        samples.append(Sample(folder / s.path.name, s.site, s.label, s.split, s.group))
    contract = build_contract("tf_efficientnet_lite0", 64)
    split = _split(contract)
    cache = SiteCache(tmp_path / "cache")
    prepared = cache.prepared(samples, contract)
    pool = cache.view_pool(split, samples, prepared, contract, AugmentConfig.texture(), 3, seed=0)
    assert pool.shape[:2] == (len(samples), 4) and pool.dtype == np.float16
    clean = cache.test_view_features(split, samples, prepared, contract.with_updates(test_views="none"))
    np.testing.assert_allclose(pool[:, 0].astype(np.float32), clean[:, 0], rtol=2e-3, atol=2e-3)
    assert not np.allclose(pool[:, 1], pool[:, 2])  # different views, not copies
    assert np.array_equal(cache.view_pool(split, samples, prepared, contract, AugmentConfig.texture(), 3, seed=0), pool)
    reseeded = cache.view_pool(split, samples, prepared, contract, AugmentConfig.texture(), 3, seed=1)
    assert np.array_equal(reseeded[:, 0], pool[:, 0]) and not np.array_equal(reseeded[:, 1:], pool[:, 1:])
    # An image replaced under the same name is prepared and run through the trunk again.
    shutil.copy(source[-1].path, samples[0].path)
    os.utime(samples[0].path, ns=(1, 1))
    replaced = cache.prepared(samples, contract)
    assert not np.array_equal(replaced.array(0), prepared.array(0))
    after = cache.view_pool(split, samples, replaced, contract, AugmentConfig.texture(), 3, seed=0)
    assert not np.allclose(after[0], pool[0], atol=1e-2)
    np.testing.assert_allclose(after[1:].astype(np.float32), pool[1:].astype(np.float32), rtol=1e-3, atol=1e-3)


def test_training_on_the_pool_learns_like_fresh_augmentation(data_root: DataRoot, tmp_path: Path) -> None:
    """The pool path (what a SuperNode with a cache runs) and the fresh path both fit these cells."""
    from federation.top_training import train_top

    samples = _cells(data_root, per_class=4)
    contract = build_contract("tf_efficientnet_lite0", 64)
    config = TrainConfig(epochs=8, batch_size=8, lr=3e-3)
    cache = SiteCache(tmp_path)
    split = _split(contract)
    prepared = cache.prepared(samples, contract)
    x = cache.view_pool(split, samples, prepared, contract, AugmentConfig.texture(), 4, seed=0)
    y = np.array([SHARED_CLASSES.index(s.label) for s in samples])
    pooled = train_top(split, x, y, contract.num_classes, config)
    fresh_split = _split(contract)
    fresh = train_local(fresh_split.model, samples, contract, config, augment=AugmentConfig.texture(), top="stage")
    assert pooled["steps"] == fresh["steps"] and pooled["num_examples"] == fresh["num_examples"]
    for result in (pooled, fresh):
        assert result["train_accuracy"] > 1.5 / contract.num_classes, result


def _pool_files(cache: SiteCache) -> list[Path]:
    return sorted((cache.root / "features").glob("*-v2-*.npy"))


def test_an_over_budget_cache_drops_what_went_unused_longest_and_keeps_what_the_round_read(
    data_root: DataRoot, tmp_path: Path
) -> None:
    """A hospital that replaced its images, or an older recipe, leaves a view pool behind: the budget removes
    it, not the pool this round read, and a removed entry is computed again, the same, when next needed."""
    samples = _cells(data_root, per_class=1)
    contract = build_contract("tf_efficientnet_lite0", 64)
    split = _split(contract)
    cache = SiteCache(tmp_path)
    prepared = cache.prepared(samples, contract)
    old_recipe = cache.view_pool(split, samples, prepared, contract, AugmentConfig.texture(), 2, seed=1)
    (stale,) = _pool_files(cache)
    current = cache.view_pool(split, samples, prepared, contract, AugmentConfig.texture(), 2, seed=0)
    (fresh,) = set(_pool_files(cache)) - {stale}
    everything = [p for p in tmp_path.rglob("*") if p.is_file()]
    for path in everything:  # all written a day ago ...
        os.utime(path, (time.time() - 86400, time.time() - 86400))
    round_start = time.time() - 1.0
    cache.prepared(samples, contract)  # ... then this round reads its cells and its own pool
    cache.view_pool(split, samples, prepared, contract, AugmentConfig.texture(), 2, seed=0)
    total = sum(p.stat().st_size for p in everything)

    stale_bytes = stale.stat().st_size

    budget = SiteCache(tmp_path, budget_bytes=total - 1)
    pruned = budget.prune(round_start)
    assert not stale.exists() and fresh.is_file(), "the pool unused for longest goes first"
    assert (pruned.removed_files, pruned.removed_bytes) == (1, stale_bytes)
    assert pruned.kept_bytes == total - stale_bytes <= budget.budget_bytes and not pruned.over_budget
    assert all(p.is_file() for p in everything if p != stale), "one removal was enough"
    again = budget.view_pool(split, samples, prepared, contract, AugmentConfig.texture(), 2, seed=1)
    assert np.array_equal(again, old_recipe) and not np.array_equal(again, current)

    # A budget below what this round read removes everything else, never the round's own, and says so.
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    tight = SiteCache(tmp_path, budget_bytes=1).prune(round_start)
    assert tight.removed_files == 1 and not stale.exists() and tight.over_budget
    assert fresh.is_file() and all(p.is_file() for p in everything if p != stale), "what the round read stays"


def test_the_cache_budget_comes_from_the_node_config(tmp_path: Path) -> None:
    assert SiteCache.of({"cache-dir": str(tmp_path), "cache-max-mb": 512}).budget_bytes == 512 << 20
    assert SiteCache.of({"cache-dir": str(tmp_path)}).budget_bytes == 6144 << 20
    for bad in (0, -5, "lots", "inf", "nan"):
        with pytest.raises(ValueError, match="cache-max-mb"):
            SiteCache.of({"cache-dir": str(tmp_path), "cache-max-mb": bad})


def _write_entry_repeatedly(path: str, value: int, times: int) -> None:
    for _ in range(times):
        save_array(Path(path), np.full(4096, value, np.float32))


def test_two_processes_writing_the_same_cache_entry_both_finish_and_leave_one_whole_file(tmp_path: Path) -> None:
    # Two benchmarks (or a benchmark beside a SuperNode) sharing a cache compute the same entry at once;
    # with one temporary name for both, one writer's rename took the other's file away (FileNotFoundError).
    entry = tmp_path / "entry.npy"
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_write_entry_repeatedly, args=(str(entry), v, 400)) for v in (1, 2)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(120)
    assert [w.exitcode for w in writers] == [0, 0]
    stored = np.load(entry)
    assert stored.shape == (4096,) and len(set(stored.tolist())) == 1  # one writer's array, whole
    assert [p.name for p in tmp_path.iterdir()] == ["entry.npy"]  # no temporary left behind
