"""A live view of a federation run, drawn with rich from the ServerApp's event log (`federation.events`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Self

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from federation import events as ev


class ProgressView:
    """Rounds, and per site what it did in the current round; decisions and versions below."""

    def __init__(
        self, rounds: int, sites: Iterable[str], *, enabled: bool = True, console: Console | None = None
    ):
        self.rounds = rounds
        self.sites = list(sites)
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self.round = 0
        self.state: dict[str, dict[str, str]] = {s: {} for s in self.sites}
        self.lines: list[str] = []
        self.header = "waiting for the ServerApp"
        self._live: Live | None = None

    def __enter__(self) -> Self:
        # Piped output (CI logs, `| tee`) gets one line per event instead of a live frame, which a
        # non-terminal would only show at the very end.
        if self.enabled and self.console.is_terminal:
            self._live = Live(self.render(), console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.update(self.render())
            self._live.__exit__(*exc)
            self._live = None

    def update(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            before = len(self.lines)
            self.apply(event)
            if self.enabled and self._live is None:
                self._print_plain(event, self.lines[before:])
        if self._live is not None and events:
            self._live.update(self.render())

    def apply(self, event: dict[str, Any]) -> None:
        kind = event.get("kind")
        if kind == ev.RUN_STARTED:
            strategy = event.get("strategy", {})
            self.header = f"run {event.get('run_id')} · {strategy.get('name')} · waiting for {event.get('min_nodes')} sites"
        elif kind == ev.NODES_READY:
            self.header = self.header.split(" · waiting")[0] + f" · {event.get('nodes')} sites connected"
        elif kind == ev.ROUND_STARTED:
            self.round = int(event.get("round", 0))
            self.state = {s: {"train": "training…"} for s in self.sites}
        elif kind == ev.SITE_REPLIED:
            site = str(event.get("site"))
            row = self.state.setdefault(site, {})
            summary = event.get("summary") or {}
            if not event.get("ok"):
                row[event.get("phase", "train")] = f"[red]failed: {escape(str(event.get('error'))[:60])}"
            elif event.get("phase") == "train":
                row["train"] = (
                    f"{summary.get('num-examples')} cells, loss {_num(summary.get('train-loss'))}, {_num(summary.get('seconds'), 1)} s"
                )
                row["evaluate"] = row.get("evaluate") or "…"
            else:
                row["evaluate"] = (
                    f"n={summary.get('num-examples')}, bal. acc {_num(summary.get('balanced-accuracy'))}"
                )
        elif kind == ev.ROUND_EVALUATED:
            self.lines.append(
                f"round {event.get('round')}: pooled val balanced accuracy {_num(event.get('balanced_accuracy'))}"
            )
        elif kind == ev.GATE_DECISION:
            verdict = "[green]accepted" if event.get("accepted") else "[yellow]rejected"
            self.lines.append(
                f"round {event.get('round')}: {verdict}[/] — {escape(str(event.get('reason')))}"
            )
        elif kind == ev.VERSION_REGISTERED:
            self.lines.append(
                f"round {event.get('round')}: [bold green]registered {event.get('model_name')} v{event.get('version')}"
            )
        elif kind == ev.REGISTRATION_SKIPPED:
            self.lines.append(
                f"round {event.get('round')}: [red]not registered[/] — {escape(str(event.get('reason')))}"
            )
        elif kind == ev.RUN_FINISHED:
            self.header += f" · finished in {_num(event.get('seconds'), 1)} s"
        elif kind == ev.RUN_FAILED:
            self.lines.append(f"[red]ServerApp failed: {escape(str(event.get('error')))}")

    def render(self) -> Group:
        table = Table(title=f"Round {self.round}/{self.rounds}", title_justify="left", expand=False)
        table.add_column("site")
        table.add_column("local training")
        table.add_column("validation")
        for site in sorted(self.state):
            row = self.state[site]
            table.add_row(site, row.get("train", ""), row.get("evaluate", ""))
        return Group(
            Text(self.header, style="bold"), table, *(Text.from_markup(line) for line in self.lines[-12:])
        )

    def _print_plain(self, event: dict[str, Any], new_lines: list[str]) -> None:
        kind = event.get("kind")
        if kind in (ev.RUN_STARTED, ev.NODES_READY):
            self.console.print(self.header)
        elif kind == ev.ROUND_STARTED:
            self.console.print(f"round {self.round}/{self.rounds} started")
        elif kind == ev.SITE_REPLIED:
            site = str(event.get("site"))
            phase = event.get("phase", "train")
            self.console.print(f"  {site} {phase}: {self.state.get(site, {}).get(phase, '')}")
        for line in new_lines:
            self.console.print(line)

    def finish(self, status: str) -> None:
        if self.enabled:
            self.console.print(f"Flower run status: {escape(status)}")


def _num(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "–"
