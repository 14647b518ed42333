"""Federation runs on a schedule (single machine): a cron expression, APScheduler, one run at a time.

    job = ScheduledFederation(data_root, sites, registry, run_config, workdir, reviewed_dir="var/site-data")
    run_schedule("0 2 * * *", job)           # every night at 02:00, until stopped

Every run is a full `run_federation` (its own SuperLink and SuperNodes, its own run directory) and each
site trains on its base data plus, when `reviewed_dir/<site>/manifest.csv` exists at that moment, the
cells clinicians reviewed (`wbc review export --site S` writes there; see `federation.site_data`). A run
that is still going when the next one is due is not doubled up: the late trigger is skipped (and
recorded). Every run appends one line to `workdir/schedule.jsonl`: when, which extra data, the outcome,
the registered versions and what the registry lifecycle did. Deployments on Kubernetes use the CronJob
in k8s/ instead.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from federation.sites import MANIFEST

HISTORY_FILE = "schedule.jsonl"


@dataclass
class ScheduledFederation:
    data_root: str | Path | None
    sites: Sequence[str]
    registry: str | Path
    run_config: Mapping[str, Any]
    workdir: str | Path
    reviewed_dir: str | Path | None = None
    extra_roots: Mapping[str, Sequence[str | Path]] = field(default_factory=dict)  # always used, per site
    insecure: bool = True
    auth: bool = False
    runner: Callable[..., Any] | None = None  # run_federation; replaceable for a dry schedule
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def node_config(self) -> dict[str, dict[str, str]]:
        """Per site: `extra-data-roots` from the fixed list plus a reviewed export present right now."""
        out: dict[str, dict[str, str]] = {}
        for site in self.sites:
            roots = [str(Path(p).expanduser().resolve()) for p in self.extra_roots.get(site, ())]
            if self.reviewed_dir is not None:
                export = Path(self.reviewed_dir).expanduser().resolve() / site
                if (export / MANIFEST).is_file() and str(export) not in roots:
                    roots.append(str(export))
            if roots:
                out[site] = {"extra-data-roots": ",".join(roots)}
        return out

    def __call__(self) -> dict[str, Any]:
        if not self._lock.acquire(blocking=False):  # APScheduler's max_instances=1 also guards this
            return self._record({"status": "skipped", "reason": "the previous run is still going"})
        try:
            return self._run_once()
        finally:
            self._lock.release()

    def _run_once(self) -> dict[str, Any]:
        from federation.deploy import run_federation

        runner = self.runner or run_federation
        node_config = self.node_config()
        started = time.time()
        entry: dict[str, Any] = {
            "started": _now(),
            "extra_data_roots": {site: cfg["extra-data-roots"].split(",") for site, cfg in node_config.items()},
        }
        try:
            result = runner(
                self.data_root,
                list(self.sites),
                self.registry,
                dict(self.run_config),
                self.workdir,
                insecure=self.insecure,
                auth=self.auth,
                show_progress=False,
                node_config=node_config,
            )
        except Exception as exc:  # noqa: BLE001 - one failed run must not end the schedule; recorded
            entry.update(status="error", error=f"{type(exc).__name__}: {exc}")
        else:
            summary = result.summary()
            lifecycle = [r.get("lifecycle") for r in result.rounds if r.get("lifecycle")]
            entry.update(status="ok" if result.ok else "failed", summary=summary, lifecycle=lifecycle)
        entry["seconds"] = round(time.time() - started, 1)
        return self._record(entry)

    def _record(self, entry: dict[str, Any]) -> dict[str, Any]:
        entry.setdefault("at", _now())
        path = Path(self.workdir).expanduser() / HISTORY_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as fh:
            fh.write(json.dumps(entry, default=str) + "\n")
        return entry


def run_schedule(
    cron: str,
    job: Callable[[], Any],
    *,
    max_runs: int | None = None,
    run_now: bool = False,
    timezone: str = "UTC",
    on_event: Callable[[str], None] = print,
) -> int:
    """Run `job` on the cron schedule until stopped (Ctrl-C / SIGTERM) or after `max_runs` runs."""
    from apscheduler.schedulers.blocking import BlockingScheduler
    from apscheduler.triggers.cron import CronTrigger

    trigger = CronTrigger.from_crontab(cron, timezone=timezone)  # ValueError on a bad expression
    scheduler = BlockingScheduler(timezone=timezone)
    done = [0]

    def tick() -> None:
        outcome = job()
        done[0] += 1
        on_event(f"run {done[0]}: {_describe(outcome)}")
        if max_runs is not None and done[0] >= max_runs:
            scheduler.shutdown(wait=False)

    options: dict[str, Any] = {"next_run_time": datetime.now(UTC)} if run_now else {}  # None would pause it
    scheduler.add_job(
        tick,
        trigger,
        id="federation",
        max_instances=1,  # never two federations at once
        coalesce=True,  # missed triggers (machine asleep, long run) fold into one
        misfire_grace_time=3600,
        **options,
    )
    first = "now" if run_now else trigger.get_next_fire_time(None, datetime.now(UTC))
    on_event(f"scheduled '{cron}' ({timezone}); first run {first}")
    try:
        scheduler.start()
    except (KeyboardInterrupt, SystemExit):
        pass
    return done[0]


def _describe(outcome: Any) -> str:
    if not isinstance(outcome, dict):
        return str(outcome)
    summary = outcome.get("summary") or {}
    versions = [f"v{r['version']}" for r in summary.get("registered", [])]
    return f"{outcome.get('status')} in {outcome.get('seconds', '?')} s; registered {versions or 'none'}" + (
        f"; {outcome['error']}" if outcome.get("error") else ""
    )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
