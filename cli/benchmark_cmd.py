"""`wbc benchmark ...`: the paper's cross-site table and the in-domain protocol (docs/results.md)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from cli.common import DataRootOption, console, fail

app = typer.Typer(help="Benchmarks: the paper protocol and the in-domain protocol.", no_args_is_help=True)

OutOption = Annotated[
    Path, typer.Option("--out", help="Folder for the table (.md), the rows (.json) and plots.")
]
CacheOption = Annotated[
    Path, typer.Option("--cache", help="Cache of prepared images and frozen-trunk features (safe to delete).")
]
SeedsOption = Annotated[str, typer.Option("--seeds", help="Comma-separated training seeds.")]
StrategiesOption = Annotated[
    str,
    typer.Option(
        "--strategies", help="Comma-separated federated strategies (fedavg, fedmedian, fedprox, fedadam)."
    ),
]
ThreadsOption = Annotated[
    int,
    typer.Option(
        "--threads",
        help="torch CPU threads (1 is fastest for the small top models; more only helps on an idle machine).",
    ),
]


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        fail(f"--seeds must be comma-separated integers, got {text!r}")
    if not seeds:
        fail("--seeds is empty")
    return seeds


def _strategies(text: str) -> list[str]:
    from federation.strategies import STRATEGY_NAMES

    names = [s.strip().lower() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in STRATEGY_NAMES]
    if unknown:
        fail(f"unknown strategy {unknown}; choose from {', '.join(STRATEGY_NAMES)}")
    return names


def _arms(names: str, presets: dict) -> list:
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in presets]
    if unknown:
        fail(f"unknown arm(s) {unknown}; choose from {', '.join(presets)}")
    return [presets[n] for n in chosen]


@app.command("paper")
def paper(
    data_root: DataRootOption = None,
    out: OutOption = Path("var/benchmark/paper"),
    cache: CacheOption = Path("var/benchmark"),
    seeds: SeedsOption = "0,1,2",
    arms: Annotated[str, typer.Option(help="Comma-separated arms (backbone configurations).")] = "",
    threads: ThreadsOption = 1,
    quick: Annotated[bool, typer.Option(help="One seed, the default arm only (a few minutes warm).")] = False,
    strategies: StrategiesOption = "fedavg,fedmedian,fedprox,fedadam",
) -> None:
    """Protocol 1: single-site, centralised and federated (FedAvg, FedMedian, FedProx, FedOpt) models."""
    from federation.benchmark.presets import DEFAULT_PAPER_ARMS, PAPER_ARMS, seeds_for
    from federation.benchmark.suite import run_paper
    from federation.sites import DataError, DataRoot, resolve_data_root

    try:
        data = DataRoot(resolve_data_root(data_root))
    except DataError as exc:
        fail(str(exc))
    chosen = _arms(arms or ",".join(DEFAULT_PAPER_ARMS), PAPER_ARMS)
    seed_list = [0] if quick else _seeds(seeds)
    if quick:
        chosen = chosen[:1]
    t0 = time.time()
    result = run_paper(
        data, chosen, seeds=seed_list, strategies=_strategies(strategies), out=out, cache=cache,
        seeds_for=seeds_for(seed_list), threads=threads, log=console.print,
    )  # fmt: skip
    console.print((out / "paper.md").read_text())
    console.print(
        f"[green]wrote[/] {out}/paper.md, paper.json and plots in {time.time() - t0:.0f} s "
        f"({len(result['rows'])} rows)"
    )


@app.command("in-domain")
def in_domain(
    data_root: DataRootOption = None,
    out: OutOption = Path("var/benchmark/in-domain"),
    cache: CacheOption = Path("var/benchmark"),
    seeds: SeedsOption = "0",
    partition_seed: Annotated[int, typer.Option(help="Seed of the Dirichlet(0.5) partition.")] = 0,
    arms: Annotated[str, typer.Option(help="Comma-separated arms.")] = "",
    threads: ThreadsOption = 1,
    strategies: StrategiesOption = "fedavg,fedmedian,fedprox,fedadam",
) -> None:
    """Protocol 2: barcelona-pbc over 4 Dirichlet(0.5) label-skewed sites, 8 classes."""
    from federation.benchmark.presets import DEFAULT_IN_DOMAIN_ARMS, IN_DOMAIN_ARMS
    from federation.benchmark.suite import run_in_domain
    from federation.sites import DataError, DataRoot, resolve_data_root

    try:
        data = DataRoot(resolve_data_root(data_root))
    except DataError as exc:
        fail(str(exc))
    chosen = _arms(arms or ",".join(DEFAULT_IN_DOMAIN_ARMS), IN_DOMAIN_ARMS)
    t0 = time.time()
    run_in_domain(
        data,
        chosen,
        seeds=_seeds(seeds),
        strategies=_strategies(strategies),
        out=out,
        cache=cache,
        partition_seed=partition_seed,
        threads=threads,
        log=console.print,
    )
    console.print((out / "in-domain.md").read_text())
    console.print(f"[green]wrote[/] {out}/in-domain.md, in-domain.json and plots in {time.time() - t0:.0f} s")
