"""Registry lifecycle: candidate → production by policy or by hand, rollback, gc, integrity before promotion."""

from __future__ import annotations

import pytest

from models import lifecycle
from models.registry import IntegrityError, Registry, RegistryError
from onnx_builders import build_tiny_classifier

SAME_VAL = {"a": [[3, 1], [0, 4]], "b": [[2, 0], [1, 1]]}  # rows: true class (val counts 4,4 and 2,2)
OTHER_VAL = {"a": [[5, 1], [0, 4]], "b": [[2, 0], [1, 1]]}


@pytest.fixture()
def registry(tmp_path, tiny_contract):
    onnx = build_tiny_classifier(tiny_contract.with_updates(class_names=("x", "y")), tmp_path / "src" / "m.onnx")
    reg = Registry(tmp_path / "reg", "m")

    def add(ba: float, per_site=SAME_VAL, **extra) -> int:
        metrics = {"pooled_val": {"balanced_accuracy": ba}, "per_site_val": {s: {"confusion": c} for s, c in per_site.items()}}
        return reg.register(onnx, tiny_contract.with_updates(class_names=("x", "y")), {"metrics": metrics, **extra}).version

    reg.add = add  # type: ignore[attr-defined]
    return reg


def test_first_registered_version_becomes_candidate_and_production(registry) -> None:
    v1 = registry.add(0.70)
    out = lifecycle.after_registration(registry, v1, margin=0.01)
    assert out["promoted"] and out["reason"] == "no production version yet"
    assert registry.aliases()["candidate"] == v1 and registry.aliases()["production"] == v1


def test_candidate_is_promoted_only_when_it_beats_production_by_the_margin(registry) -> None:
    lifecycle.after_registration(registry, registry.add(0.70), margin=0.02)
    small = registry.add(0.71)
    out = lifecycle.after_registration(registry, small, margin=0.02)
    assert not out["promoted"] and "does not beat" in out["reason"]
    assert registry.aliases()["candidate"] == small and registry.aliases()["production"] == 1
    big = registry.add(0.75)
    out = lifecycle.after_registration(registry, big, margin=0.02)
    assert out["promoted"] and registry.aliases()["production"] == big


def test_versions_measured_on_different_validation_data_wait_for_a_person(registry) -> None:
    lifecycle.after_registration(registry, registry.add(0.70), margin=0.0)
    other = registry.add(0.95, per_site=OTHER_VAL)
    out = lifecycle.after_registration(registry, other, margin=0.0)
    assert not out["promoted"] and "different validation data" in out["reason"]
    assert registry.aliases()["production"] == 1
    lifecycle.promote(registry, other, actor="dr-a", reason="reviewed the new data")
    assert registry.aliases()["production"] == other


def test_auto_promotion_can_be_switched_off(registry) -> None:
    v1 = registry.add(0.7)
    out = lifecycle.after_registration(registry, v1, margin=0.0, auto_promote=False)
    assert not out["promoted"] and registry.aliases().get("production") is None


def test_rollback_walks_back_through_promotions(registry) -> None:
    for ba in (0.6, 0.7, 0.8):
        lifecycle.promote(registry, registry.add(ba), actor="t")
    assert registry.aliases()["production"] == 3
    lifecycle.rollback(registry, actor="t")
    assert registry.aliases()["production"] == 2
    lifecycle.rollback(registry, actor="t")
    assert registry.aliases()["production"] == 1  # two rollbacks: two versions back, not back and forth
    with pytest.raises(RegistryError, match="no earlier production"):
        lifecycle.rollback(registry, actor="t")
    assert [h["action"] for h in registry.aliases()["history"]][-2:] == ["rollback", "rollback"]


def test_a_modified_file_is_never_promoted(registry) -> None:
    v1 = registry.add(0.7)
    with registry.get(v1).onnx_path.open("r+b") as fh:
        fh.seek(-2, 2)
        fh.write(b"\x00\x00")
    with pytest.raises(IntegrityError):
        lifecycle.promote(registry, v1, actor="t")
    with pytest.raises(IntegrityError):
        lifecycle.after_registration(registry, v1, margin=0.0)
    assert registry.aliases().get("production") is None


def test_gc_keeps_the_newest_and_never_an_aliased_version_or_the_rollback_target(registry) -> None:
    versions = [registry.add(0.5 + i / 100) for i in range(6)]
    lifecycle.promote(registry, versions[0], actor="t")
    lifecycle.promote(registry, versions[1], actor="t")  # rollback target: v1
    registry.set_alias("candidate", versions[2], actor="t")
    int8 = registry.add(0.5, quantization={"source_version": versions[1]})  # a variant of production
    dry = lifecycle.gc(registry, keep=2, dry_run=True)
    assert dry["deleted"] == [4, 5] and [v.version for v in registry.versions()] == [*versions, int8]
    out = lifecycle.gc(registry, keep=2)
    assert out["deleted"] == [4, 5] and out["protected"] == [1, 2, 3, 7]
    assert [v.version for v in registry.versions()] == [1, 2, 3, 6, 7]
    with pytest.raises(RegistryError, match="aliased or protected"):
        registry.delete_version(2)
    with pytest.raises(RegistryError, match="at least 1"):
        lifecycle.gc(registry, keep=0)
