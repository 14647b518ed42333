"""The registry lifecycle: `candidate` and `production` aliases, promotion, rollback, garbage collection.

Policy (applied by the federation after each registered round, see `after_registration`):
  - every accepted, registered round becomes `candidate`;
  - it is promoted to `production` automatically when there is no production yet, or when its pooled
    site-validation balanced accuracy beats production's by at least `margin` *on the same validation
    data* (same sites and per-site class counts, read from the recorded confusion matrices). When the
    validation data differ (new reviewed cells, another site), the numbers are not comparable and the
    candidate waits for a person: `wbc registry promote N`;
  - `rollback` puts back the production version that preceded the current one (a stack replayed from the
    alias history, so two rollbacks go two versions back, not back and forth);
  - `gc --keep K` deletes old versions but never an aliased one, the rollback target, or an INT8 variant
    made from one of those.
Every version is checked against its recorded sha256 before it is promoted. The service follows
`production` (registry watch); nothing here touches a running service.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from models.registry import Registry, RegistryError, VersionInfo

CANDIDATE = "candidate"
PRODUCTION = "production"


@dataclass(frozen=True)
class PromotionDecision:
    promoted: bool
    reason: str
    candidate: int
    production_before: int | None
    candidate_balanced_accuracy: float | None
    production_balanced_accuracy: float | None
    margin: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- reading recorded metrics -------------------------------------------------------------------------
def pooled_balanced_accuracy(info: VersionInfo) -> float | None:
    value = ((info.metadata.get("metrics") or {}).get("pooled_val") or {}).get("balanced_accuracy")
    return float(value) if value is not None else None


def validation_fingerprint(info: VersionInfo) -> dict[str, list[int]] | None:
    """Per site, the number of validation cells per class (row sums of the recorded confusion matrix)."""
    per_site = (info.metadata.get("metrics") or {}).get("per_site_val") or {}
    out: dict[str, list[int]] = {}
    for site, metrics in sorted(per_site.items()):
        confusion = metrics.get("confusion")
        if not confusion:
            return None
        out[site] = [int(sum(row)) for row in confusion]
    return out or None


def comparable(candidate: VersionInfo, production: VersionInfo) -> str | None:
    """None when both were measured on the same validation data with the same classes, else why not."""
    if tuple(candidate.contract.class_names) != tuple(production.contract.class_names):
        return "candidate and production predict different classes"
    a, b = validation_fingerprint(candidate), validation_fingerprint(production)
    if a is None or b is None:
        return "a version has no per-site validation record"
    if a != b:
        return "production was measured on different validation data (sites or per-class counts differ)"
    return None


# ---- policy --------------------------------------------------------------------------------------------
def decide_promotion(candidate: VersionInfo, production: VersionInfo | None, margin: float) -> PromotionDecision:
    cand_ba = pooled_balanced_accuracy(candidate)
    if production is None:
        return PromotionDecision(True, "no production version yet", candidate.version, None, cand_ba, None, margin)
    prod_ba = pooled_balanced_accuracy(production)
    common = dict(
        candidate=candidate.version,
        production_before=production.version,
        candidate_balanced_accuracy=cand_ba,
        production_balanced_accuracy=prod_ba,
        margin=margin,
    )
    if production.version == candidate.version:
        return PromotionDecision(False, "already production", **common)
    why_not = comparable(candidate, production)
    if why_not is not None:
        return PromotionDecision(False, f"not compared: {why_not}; promote by hand if wanted", **common)
    if cand_ba is None or prod_ba is None:
        return PromotionDecision(False, "missing pooled validation balanced accuracy", **common)
    if cand_ba >= prod_ba + margin:
        return PromotionDecision(
            True, f"pooled val balanced accuracy {cand_ba:.4f} beats production's {prod_ba:.4f} by >= {margin:g}",
            **common,
        )
    return PromotionDecision(
        False, f"pooled val balanced accuracy {cand_ba:.4f} does not beat production's {prod_ba:.4f} by {margin:g}",
        **common,
    )


def after_registration(
    registry: Registry, version: int, *, margin: float, auto_promote: bool = True, actor: str = "federation"
) -> dict[str, Any]:
    """Make `version` the candidate and promote it when the policy says so; returns what happened."""
    info = registry.get(version)
    info.verify()
    registry.set_alias(CANDIDATE, version, reason="accepted round registered", actor=actor, action="candidate")
    aliases = registry.aliases()
    production = registry.get(int(aliases[PRODUCTION])) if aliases.get(PRODUCTION) is not None else None
    decision = decide_promotion(info, production, margin)
    if decision.promoted and not auto_promote:
        decision = PromotionDecision(False, "auto-promotion disabled for this run", **{
            k: v for k, v in decision.as_dict().items() if k not in ("promoted", "reason")
        })
    if decision.promoted:
        registry.set_alias(PRODUCTION, version, reason=f"auto: {decision.reason}", actor=actor, action="promote")
    return {"candidate": version, **decision.as_dict(), "production": registry.aliases().get(PRODUCTION)}


# ---- manual operations ---------------------------------------------------------------------------------
def promote(registry: Registry, version: int, *, actor: str, reason: str = "manual promotion") -> dict[str, Any]:
    info = registry.get(version)
    info.verify()  # never point production at a file that changed since registration
    return registry.set_alias(PRODUCTION, version, reason=reason, actor=actor, action="promote")


def production_stack(registry: Registry) -> list[int]:
    """Production versions in promotion order, rollbacks replayed (the last item is the current one)."""
    stack: list[int] = []
    for entry in registry.aliases().get("history", []):
        if entry.get("alias") != PRODUCTION or entry.get("to") is None:
            continue
        to = int(entry["to"])
        if len(stack) >= 2 and stack[-2] == to:  # back to the previous one (whoever moved it) is a rollback
            stack.pop()
            continue
        if entry.get("action") == "rollback" and stack:
            stack.pop()
        if not stack or stack[-1] != to:
            stack.append(to)
    return stack


def rollback_target(registry: Registry) -> int | None:
    stack = production_stack(registry)
    current = registry.aliases().get(PRODUCTION)
    if current is None or not stack or stack[-1] != current:
        return stack[-1] if stack and stack[-1] != current else None
    return stack[-2] if len(stack) >= 2 else None


def rollback(registry: Registry, *, actor: str, reason: str = "manual rollback") -> dict[str, Any]:
    target = rollback_target(registry)
    if target is None:
        raise RegistryError(f"{registry.model_name}: no earlier production version to roll back to")
    registry.get(target).verify()
    return registry.set_alias(PRODUCTION, target, reason=reason, actor=actor, action="rollback")


def protected_versions(registry: Registry) -> set[int]:
    """Aliased versions, the rollback target, and INT8 variants quantized from any of them."""
    aliases = registry.aliases()
    keep = {int(aliases[a]) for a in (CANDIDATE, PRODUCTION) if aliases.get(a) is not None}
    target = rollback_target(registry)
    if target is not None:
        keep.add(target)
    for info in registry.versions():
        source = (info.metadata.get("quantization") or {}).get("source_version")
        if source is not None and int(source) in keep:
            keep.add(info.version)
    return keep


def gc(registry: Registry, keep: int, *, dry_run: bool = False) -> dict[str, Any]:
    """Delete all but the newest `keep` versions, never a protected one; returns what was (or would be) removed."""
    if keep < 1:
        raise RegistryError(f"gc --keep must be at least 1, got {keep}")
    versions = [v.version for v in registry.versions()]
    protected = protected_versions(registry)
    newest = set(versions[-keep:])
    doomed = [v for v in versions if v not in newest and v not in protected]
    if not dry_run:
        for number in doomed:
            registry.delete_version(number, protected=protected)
    return {"kept": sorted(set(versions) - set(doomed)), "deleted": doomed, "protected": sorted(protected),
            "dry_run": dry_run}
