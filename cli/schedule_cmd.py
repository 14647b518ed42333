"""`wbc schedule`: federation runs on a cron schedule on this machine (see federation/schedule.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import DataRootOption, RegistryOption, console, fail
from federation.sites import DEFAULT_TRAINING_SITES
from models.registry import default_registry_root


def schedule(
    cron: Annotated[str, typer.Option("--cron", help="Cron expression (5 fields), e.g. '0 2 * * *' = 02:00 daily.")],
    data_root: DataRootOption = None,
    sites: Annotated[list[str], typer.Option("--site", help="A training site (repeat).")] = list(DEFAULT_TRAINING_SITES),
    registry: RegistryOption = default_registry_root(),
    workdir: Annotated[Path, typer.Option("--workdir", envvar="WBC_FEDERATION_WORKDIR",
                                          help="Deployment state, run records and schedule.jsonl.")] = Path("var/federation"),
    reviewed_dir: Annotated[Path | None, typer.Option(
        "--reviewed-dir", help="Folder of reviewed exports: <dir>/<site> (from `wbc review export`) is added to "
        "that site's training data whenever it exists at run time.")] = Path("var/site-data"),
    extra: Annotated[list[str], typer.Option("--extra-data-root", help="SITE=PATH: another data root a site "
                                             "always trains on (repeat).")] = [],
    set_: Annotated[list[str], typer.Option("--set", help="Run-config key=value (as for wbc federate).")] = [],
    secure: Annotated[bool, typer.Option("--tls/--insecure", help="TLS between SuperLink and SuperNodes.")] = True,
    auth: Annotated[bool, typer.Option("--auth/--no-auth", help="SuperNode authentication (needs --tls).")] = True,
    timezone: Annotated[str, typer.Option("--timezone", help="Time zone of the cron expression.")] = "UTC",
    run_now: Annotated[bool, typer.Option("--run-now", help="Also run once at start.")] = False,
    max_runs: Annotated[int | None, typer.Option("--max-runs", help="Stop after this many runs.")] = None,
) -> None:
    """Run the federation on a schedule; each run picks up the sites' newly reviewed cells. Ctrl-C stops."""
    from cli.federate_cmd import parse_overrides
    from federation.schedule import ScheduledFederation, run_schedule

    extra_roots: dict[str, list[str]] = {}
    for item in extra:
        site, sep, path = item.partition("=")
        if not sep or site not in sites:
            fail(f"--extra-data-root {item!r}: expected SITE=PATH with SITE one of {', '.join(sites)}")
        extra_roots.setdefault(site, []).append(path)
    if auth and not secure:
        fail("--auth needs --tls (Flower authenticates SuperNodes over TLS only)")
    job = ScheduledFederation(data_root, sites, registry, parse_overrides(set_), workdir, reviewed_dir=reviewed_dir,
                              extra_roots=extra_roots, insecure=not secure, auth=auth)
    try:
        runs = run_schedule(cron, job, max_runs=max_runs, run_now=run_now, timezone=timezone, on_event=console.print)
    except ValueError as exc:
        fail(f"--cron {cron!r}: {exc}")
    console.print(f"schedule stopped after {runs} run(s); history: {Path(workdir) / 'schedule.jsonl'}")


def register(app: typer.Typer) -> None:
    app.command("schedule")(schedule)
