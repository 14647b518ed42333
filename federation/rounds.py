"""What happens around each round on the server: live reply events, per-site records, pooling, the gate.

`RoundBook` is the strategy's observer (see `federation.strategies.SiteTracking`) and Flower's
`evaluate_fn`, which `Strategy.start` calls after each round's federated evaluation with that round's
global arrays. It keeps every site's raw train and validation results, pools validation by summing the
sites' confusion matrices, asks `federation.gate` for a decision and, when accepted, hands the weights to
the publisher. It writes `<run-dir>/rounds/round-NNN.json` and events to `<run-dir>/events.jsonl`.

Rejected rounds: every round starts from the last *accepted* global weights (the initial weights until a
round is accepted). A rejected aggregate is never trained on further, so one bad round (a site with
corrupted labels, a diverging server step) cannot drag the federation down; the next round reruns local
training from the accepted point with a new per-round seed, so it is not a replay of the rejected one.
FedOpt's server moments keep their history across a rejection.

Averaged rounds (`average_rounds` > 1, `federation.averaging`): what the sites evaluate, the gate judges
and the registry gets is the mean of this round's aggregate and the last accepted rounds' aggregates;
training goes on from the plain aggregate of the last accepted round, not from the mean.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid

from federation import events as ev
from federation.averaging import RoundWindow
from federation.gate import decide
from federation.strategies import CONFIG_KEY, SiteReply
from models.evaluate import Metrics

ROUNDS_DIR = "rounds"


def round_record_path(run_dir: str | Path, server_round: int) -> Path:
    return Path(run_dir) / ROUNDS_DIR / f"round-{server_round:03d}.json"


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(ev.json_safe(obj), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


@dataclass
class Accepted:
    round: int  # 0: the initial (pretrained) weights
    balanced_accuracy: float | None
    arrays: ArrayRecord  # what was evaluated and registered (with averaged rounds: the mean)
    version: int | None = None
    train_arrays: ArrayRecord | None = None  # with averaged rounds: the round's plain aggregate, trained on

    @property
    def start(self) -> ArrayRecord:
        return self.train_arrays if self.train_arrays is not None else self.arrays


# What the publisher gets: (server_round, arrays, lineage metadata) → outcome dict (see federation.publish).
PublishFn = Callable[[int, ArrayRecord, dict[str, Any]], dict[str, Any]]


class RoundBook:
    def __init__(
        self,
        *,
        run_dir: str | Path,
        events: ev.EventLog,
        class_names: tuple[str, ...],
        initial_arrays: ArrayRecord,
        gate_tolerance: float,
        min_sites: int,
        publish: PublishFn | None,
        lineage: dict[str, Any],
        on_round_closed: Callable[[RoundBook, dict[str, Any]], None] | None = None,
        on_registered: Callable[[RoundBook, dict[str, Any]], dict[str, Any] | None] | None = None,
        average_rounds: int = 1,
    ):
        self.run_dir = Path(run_dir)
        self.events = events
        self.class_names = tuple(class_names)
        self.gate_tolerance = gate_tolerance
        self.min_sites = min_sites
        self.publish = publish
        self.lineage = lineage  # run id, strategy, training settings, contract, weight source
        self.node_sites: dict[int, str] = {}
        self.records: dict[int, dict[str, Any]] = {}
        self.accepted = Accepted(0, None, initial_arrays)
        self._candidates: dict[int, ArrayRecord | None] = {}
        self.window = RoundWindow(average_rounds, run_dir)
        self._plain: dict[int, ArrayRecord] = {}  # this round's aggregate, while its mean is judged
        self._t0: dict[int, float] = {}
        # `on_round_closed(book, record)`: after the decision, before publishing (checkpoint: see
        # federation.resume); `on_registered(book, record)` → what the registry lifecycle did (aliases).
        self.on_round_closed = on_round_closed
        self.on_registered = on_registered

    # ---- strategy hooks ----------------------------------------------------------------------------
    def start_weights(self, server_round: int, proposed: ArrayRecord) -> ArrayRecord:
        """Every round trains from the last accepted global weights (see the module docstring)."""
        self._t0[server_round] = time.time()
        record = self._record(server_round)
        previous = self.records.get(server_round - 1, {}).get("gate", {})
        record["start_weights"] = {
            "from_round": self.accepted.round,
            "registered_version": self.accepted.version,
            "why": (
                "initial weights"
                if server_round == 1
                else "previous round accepted"
                if previous.get("accepted")
                else f"round {server_round - 1} not accepted: back to the last accepted weights"
            ),
        }
        self.events.emit(ev.ROUND_STARTED, round=server_round, start_weights=record["start_weights"])
        return self.accepted.start

    def serve(self, server_round: int, aggregate: ArrayRecord) -> ArrayRecord:
        """The round's candidate from its aggregate: the aggregate itself, or with averaged rounds the
        mean of it and the last accepted rounds' aggregates (see `federation.averaging`)."""
        if self.window.size == 1:
            return aggregate
        self._plain[server_round] = aggregate
        self._record(server_round)["averaged_rounds"] = self.window.candidate_rounds(server_round)
        return self.window.candidate(aggregate)

    def record_replies(self, server_round: int, phase: str, replies: list[SiteReply]) -> None:
        record = self._record(server_round)
        for reply in replies:
            site = reply.site or f"node-{reply.node_id}"
            entry = record["sites"].setdefault(site, {"node_id": reply.node_id})
            entry[phase] = self._site_result(phase, reply)
            if not entry[phase]["ok"]:
                record["failures"].append(
                    {"site": site, "node_id": reply.node_id, "phase": phase, "error": entry[phase]["error"]}
                )

    def record_aggregate(self, server_round: int, arrays: ArrayRecord | None) -> None:
        self._candidates[server_round] = arrays

    def record_step_problem(self, server_round: int, phase: str, problem: str) -> None:
        """A step that could not run as asked (too few sites connected or answering); recorded, not fatal."""
        record = self._record(server_round)
        record.setdefault("problems", []).append({"phase": phase, "problem": problem})
        self.events.emit(ev.STEP_PROBLEM, round=server_round, phase=phase, problem=problem)

    def record_no_reply(
        self, server_round: int, phase: str, node_ids: Iterable[int], timeout: float | None
    ) -> None:
        record = self._record(server_round)
        for node_id in node_ids:
            site = self.node_sites.get(node_id, f"node-{node_id}")
            error = f"no reply within the round timeout ({timeout:g} s)" if timeout else "no reply"
            record["failures"].append({"site": site, "node_id": node_id, "phase": phase, "error": error})
            self.events.emit(
                ev.SITE_REPLIED,
                round=server_round,
                phase=phase,
                site=site,
                node_id=node_id,
                ok=False,
                error=error,
            )

    def live_reply(self, server_round: int | None, msg: Message) -> None:
        """One reply as it arrives (before the whole round is in): an event for the progress display."""
        reply = SiteReply.from_message(msg, self.node_sites)
        summary: dict[str, Any] = {}
        if reply.ok and reply.phase == "train":
            summary = {k: reply.metrics.get(k) for k in ("num-examples", "train-loss", "seconds")}
        elif reply.ok:
            summary = {k: reply.metrics.get(k) for k in ("num-examples", "balanced-accuracy", "loss")}
        self.events.emit(
            ev.SITE_REPLIED,
            round=server_round,
            phase=reply.phase,
            site=reply.site or f"node-{reply.node_id}",
            node_id=reply.node_id,
            ok=reply.ok,
            error=reply.error,
            summary=summary,
        )

    # ---- Flower's evaluate_fn: the end of a round ----------------------------------------------------
    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return (
                None  # Strategy.start calls it once before round 1; the initial weights are not a candidate
            )
        record = self._record(server_round)
        site_metrics = self._site_metrics(record)
        pooled = self._pooled(site_metrics)
        record["pooled"] = pooled
        per_site_ba = {s: m["balanced_accuracy"] for s, m in site_metrics.items()}
        self.events.emit(
            ev.ROUND_EVALUATED,
            round=server_round,
            balanced_accuracy=pooled.get("balanced_accuracy"),
            sites=per_site_ba,
            n=pooled.get("n", 0),
        )

        candidate = self._candidates.get(server_round)
        decision = decide(
            balanced_accuracy=pooled.get("balanced_accuracy") if candidate is not None else None,
            recall=pooled.get("recall", {}),
            tolerance=self.gate_tolerance,
            reference_balanced_accuracy=self.accepted.balanced_accuracy if self.accepted.round else None,
            reference_round=self.accepted.round or None,
            evaluated_sites=list(site_metrics),
            expected_sites=sorted(set(self.node_sites.values())),
            min_sites=self.min_sites,
        )
        gate = decision.as_dict()
        if candidate is None:
            problems = [p["problem"] for p in record.get("problems", [])]
            why = "; ".join(problems) if problems else "no site returned a trained model this round"
            gate.update(accepted=False, reason=f"no aggregate this round: {why}")
        record["gate"] = gate
        self.events.emit(
            ev.GATE_DECISION, round=server_round, accepted=gate["accepted"], reason=gate["reason"]
        )

        record["publish"] = {"status": "pending"} if gate["accepted"] else None
        plain = self._plain.pop(server_round, None)
        if gate["accepted"]:
            if plain is not None:
                self.window.keep(server_round, plain)
            self.accepted = Accepted(server_round, decision.balanced_accuracy, arrays, train_arrays=plain)
        # The decision is on disk (record, then checkpoint) before registration starts; see federation.resume.
        self.close_round(server_round, record)
        if gate["accepted"]:
            self.publish_accepted(server_round, arrays, record)
            self.close_round(server_round, record)

        out = MetricRecord({"n": int(pooled.get("n", 0)), "accepted": int(gate["accepted"])})
        if pooled.get("balanced_accuracy") is not None:
            out["balanced-accuracy"] = float(pooled["balanced_accuracy"])
        return out

    def close_round(self, server_round: int, record: dict[str, Any]) -> None:
        record["finished_at"] = time.time()
        record["seconds"] = round(
            record["finished_at"] - self._t0.get(server_round, record.get("started_at", record["finished_at"])), 3
        )
        write_json_atomic(round_record_path(self.run_dir, server_round), record)
        if self.on_round_closed is not None:
            self.on_round_closed(self, record)

    def restore(self, accepted: Accepted, upto_round: int) -> None:
        """Continue a resumed run: the last accepted weights, and the records of rounds 1..`upto_round`."""
        self.window.restore(upto_round)
        if accepted.train_arrays is None:  # averaged rounds: train on from the plain aggregate, kept on disk
            accepted.train_arrays = self.window.aggregate_of(accepted.round)
        self.accepted = accepted
        for server_round in range(1, upto_round + 1):
            path = round_record_path(self.run_dir, server_round)
            if path.is_file():
                self.records[server_round] = json.loads(path.read_text())
                for site, entry in self.records[server_round].get("sites", {}).items():
                    if "node_id" in entry:
                        self.node_sites.setdefault(int(entry["node_id"]), site)

    # ---- helpers -----------------------------------------------------------------------------------
    def _record(self, server_round: int) -> dict[str, Any]:
        if server_round not in self.records:
            self.records[server_round] = {
                "round": server_round,
                "run_id": self.lineage.get("run_id"),
                "strategy": self.lineage.get("strategy"),
                "started_at": time.time(),
                "class_names": list(self.class_names),
                "sites": {},
                "failures": [],
            }
        return self.records[server_round]

    def _site_result(self, phase: str, reply: SiteReply) -> dict[str, Any]:
        if not reply.ok:
            return {"ok": False, "error": reply.error}
        m, info = reply.metrics, reply.info
        names = tuple(info.get("class-names") or self.class_names)
        if names != self.class_names:
            return {
                "ok": False,
                "error": f"site answered for classes {list(names)}, expected {list(self.class_names)}",
            }
        if phase == "train":
            counts = info.get("class-counts") or []
            return {
                "ok": True,
                "num_examples": int(m.get("num-examples", 0)),
                "train_loss": m.get("train-loss"),
                "train_accuracy": m.get("train-accuracy"),
                "steps": m.get("steps"),
                "seconds": m.get("seconds"),
                "class_counts": dict(zip(self.class_names, (int(c) for c in counts))),
                "data_sources": _json_or_none(info.get("data-sources")),
                # per-class relative-size sums (models.size_prior), for the size opinion fitted at export
                "size": {k: list(v) for k, v in m.items() if k.startswith("size-")} or None,
                # and of granule density (models.granule_prior), for the granule opinion
                "granules": {k: list(v) for k, v in m.items() if k.startswith("granule-")} or None,
            }
        c = len(self.class_names)
        flat = list(m.get("confusion") or [])
        if len(flat) != c * c:
            return {"ok": False, "error": f"confusion matrix with {len(flat)} cells, expected {c * c}"}
        metrics = Metrics.from_confusion(self.class_names, np.asarray(flat, dtype=np.int64).reshape(c, c))
        return {
            "ok": True,
            **metrics.as_dict(),
            "loss": m.get("loss"),
            "ece": m.get("ece"),
            "reported_balanced_accuracy": m.get("balanced-accuracy"),
            # the site's calibration summary (models.calibration), for the temperature fitted at export
            "calibration": {k: v for k, v in m.items() if k.startswith("cal-")} or None,
        }

    @staticmethod
    def _site_metrics(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {
            site: entry["evaluate"]
            for site, entry in sorted(record["sites"].items())
            if entry.get("evaluate", {}).get("ok")
        }

    def _pooled(self, site_metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
        if not site_metrics:
            return {"n": 0, "balanced_accuracy": None, "recall": {}, "sites": []}
        confusion = sum(np.asarray(m["confusion"], dtype=np.int64) for m in site_metrics.values())
        pooled = Metrics.from_confusion(self.class_names, confusion).as_dict()
        weighted = [
            (m["n"], m["loss"]) for m in site_metrics.values() if m.get("loss") is not None and m["n"]
        ]
        total = sum(n for n, _ in weighted)
        pooled["loss"] = sum(n * float(loss) for n, loss in weighted) / total if total else None
        pooled["sites"] = list(site_metrics)
        return pooled

    def publish_accepted(self, server_round: int, arrays: ArrayRecord, record: dict[str, Any]) -> None:
        """Register the accepted round and apply the registry lifecycle (also used when a run resumes)."""
        record["publish"] = self._publish(server_round, arrays, record, self._site_metrics(record))
        if record["publish"].get("status") == "registered":
            self.accepted.version = record["publish"]["version"]
            if self.on_registered is not None:
                try:
                    record["lifecycle"] = self.on_registered(self, record)
                except Exception as exc:  # noqa: BLE001 - an alias problem must not end the federation
                    record["lifecycle"] = {"error": f"{type(exc).__name__}: {exc}"}

    def _publish(
        self,
        server_round: int,
        arrays: ArrayRecord,
        record: dict[str, Any],
        site_metrics: dict[str, dict[str, Any]],
    ) -> dict[str, Any]:
        if self.publish is None:
            return {"status": "not-configured", "reason": "no registry configured"}
        sites = {
            site: {
                "train_examples": entry.get("train", {}).get("num_examples"),
                "class_counts": entry.get("train", {}).get("class_counts"),
                "data_sources": entry.get("train", {}).get("data_sources"),
                "val_examples": entry.get("evaluate", {}).get("n"),
                "size": entry.get("train", {}).get("size"),
                "granules": entry.get("train", {}).get("granules"),
            }
            for site, entry in sorted(record["sites"].items())
        }
        metadata = {
            **self.lineage,
            "source": "federated",
            "round": server_round,
            "sites": sites,
            "metrics": {"pooled_val": record["pooled"], "per_site_val": site_metrics},
            "gate": record["gate"],
            "start_weights": record.get("start_weights"),
            "averaged_rounds": record.get("averaged_rounds"),
        }
        try:
            outcome = self.publish(server_round, arrays, metadata)
        except Exception as exc:  # noqa: BLE001 - a failed export must not end the federation; recorded
            outcome = {"status": "export-failed", "reason": f"{type(exc).__name__}: {exc}"}
        if outcome.get("status") == "registered":
            self.events.emit(
                ev.VERSION_REGISTERED,
                round=server_round,
                model_name=self.lineage.get("model_name"),
                version=outcome.get("version"),
                path=outcome.get("path"),
                parity_max_abs_diff=outcome.get("parity", {}).get("max_abs_diff"),
            )
        else:
            self.events.emit(ev.REGISTRATION_SKIPPED, round=server_round, reason=outcome.get("reason"))
        return outcome

    def summary(self) -> dict[str, Any]:
        rounds = [self.records[r] for r in sorted(self.records)]
        return {
            "rounds": len(rounds),
            "decisions": [
                {
                    "round": r["round"],
                    "accepted": r.get("gate", {}).get("accepted"),
                    "reason": r.get("gate", {}).get("reason"),
                }
                for r in rounds
            ],
            "registered": [
                {"round": r["round"], "version": r["publish"]["version"], "path": r["publish"]["path"]}
                for r in rounds
                if (r.get("publish") or {}).get("status") == "registered"
            ],
            "last_accepted_round": self.accepted.round or None,
        }


class ReportingGrid(Grid):
    """Flower's Grid with a `send_and_receive` that reports each reply as it arrives.

    Everything else is delegated. Flower's own loop pulls every 3 s; this one pulls every
    `poll_interval` seconds (loopback, a handful of nodes) and tells the book about every reply and
    about nodes that did not answer before the timeout.
    """

    def __init__(self, inner: Grid, book: RoundBook, poll_interval: float = 1.0):
        self.inner = inner
        self.book = book
        self.poll_interval = poll_interval

    def set_run(self, run: Any) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Any:
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        if not messages:
            return []
        server_round = _round_of(messages[0])
        phase = "train" if "train" in messages[0].metadata.message_type else "evaluate"
        pending_nodes = {int(m.metadata.dst_node_id) for m in messages}
        ids = list(self.push_messages(messages))  # in the order of `messages`
        destination = dict(zip(ids, (int(m.metadata.dst_node_id) for m in messages)))
        pending = set(ids)
        del messages
        deadline = None if timeout is None else time.time() + timeout
        replies: list[Message] = []
        while pending and (deadline is None or time.time() < deadline):
            for msg in self.pull_messages(pending):
                if int(msg.metadata.src_node_id) == SUPERLINK_NODE_ID:
                    # The SuperLink answers for a node that stopped sending heartbeats ("node
                    # unavailable"): attribute the error to that node, not to the SuperLink.
                    node = destination.get(msg.metadata.reply_to_message_id)
                    if node is not None:
                        msg.metadata.__dict__["_src_node_id"] = node
                replies.append(msg)
                pending.discard(msg.metadata.reply_to_message_id)
                pending_nodes.discard(int(msg.metadata.src_node_id))
                self.book.live_reply(server_round, msg)
            if pending:
                time.sleep(self.poll_interval)
        if pending_nodes and server_round is not None:
            self.book.record_no_reply(server_round, phase, sorted(pending_nodes), timeout)
        return replies


def _json_or_none(text: Any) -> Any:
    try:
        return json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
        return None


def _round_of(msg: Message) -> int | None:
    try:
        return int(msg.content[CONFIG_KEY]["server-round"])
    except (KeyError, TypeError, ValueError):
        return None
