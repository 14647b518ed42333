"""`wbc schedule`'s parts: reviewed exports picked up per run, one history line per run, cron checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from federation.schedule import HISTORY_FILE, ScheduledFederation, run_schedule
from federation.site_data import SiteData
from federation.sites import DataRoot, Sample, write_manifest


def reviewed_export(source: DataRoot, dest: Path, site: str) -> Path:
    """A data root like `wbc review export` writes: a few of the site's cells under dest/sites/<site>/."""
    picked = []
    for s in source.select([site], ["train"])[:3]:
        link = dest / "sites" / site / s.label / s.path.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(s.path)
        picked.append(Sample(link, site, s.label, "train", s.group))
    write_manifest(dest, picked)
    return dest


def test_a_reviewed_export_is_used_from_the_next_run_on(data_root: DataRoot, tmp_path: Path) -> None:
    job = ScheduledFederation(data_root.root, ["bccd", "jiangxi-tecom"], tmp_path / "reg", {}, tmp_path / "work",
                              reviewed_dir=tmp_path / "reviewed")
    assert job.node_config() == {}
    export = reviewed_export(data_root, tmp_path / "reviewed" / "bccd", "bccd")
    assert job.node_config() == {"bccd": {"extra-data-roots": str(export.resolve())}}

    # What the SuperNode then trains on: its base root plus the export, with the sources named.
    site = SiteData.from_node_config({"site": "bccd", "data-root": str(data_root.root),
                                      **job.node_config()["bccd"]})
    samples, sources = site.select("train", ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"))
    base = len(data_root.select(["bccd"], ["train"]))
    assert len(samples) == base + 3
    assert [s["rows"] for s in sources] == [base, 3] and all(len(s["manifest_sha256"]) == 16 for s in sources)


def test_a_missing_extra_root_fails_loudly() -> None:
    site = SiteData.from_node_config({"site": "bccd", "data-root": "/nonexistent/a", "extra-data-roots": "/x/y"})
    with pytest.raises(ValueError, match="no manifest.csv"):
        site.select("train", ("eosinophil",))
    with pytest.raises(ValueError, match="absolute"):
        SiteData.from_node_config({"site": "bccd", "data-root": "/a", "extra-data-roots": "relative/path"})


def test_each_scheduled_run_leaves_a_history_line_and_failures_do_not_stop_it(
    data_root: DataRoot, tmp_path: Path
) -> None:
    # A site the data root does not have: run_federation refuses before starting any process.
    job = ScheduledFederation(data_root.root, ["st-elsewhere"], tmp_path / "reg", {}, tmp_path / "work")
    said: list[str] = []
    runs = run_schedule("0 3 * * *", job, max_runs=1, run_now=True, on_event=said.append)
    assert runs == 1 and said[0].startswith("scheduled '0 3 * * *' (UTC); first run now")
    history = [json.loads(line) for line in (tmp_path / "work" / HISTORY_FILE).read_text().splitlines()]
    assert len(history) == 1 and history[0]["status"] == "error" and "st-elsewhere" in history[0]["error"]


def test_a_bad_cron_expression_is_refused() -> None:
    with pytest.raises(ValueError):
        run_schedule("every night", lambda: None, max_runs=1)
