"""The ServerApp: builds the contract and the initial model, runs the chosen strategy, closes each round.

Run config (flat, `[tool.flwr.app.config]` in the root pyproject.toml): see `RunSettings`. Paths are
absolute because the ServerApp runs in the SuperLink's working directory.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from federation import events as ev
from federation.strategies import STRATEGY_NAMES, make_strategy, strategy_params

app = ServerApp()


@dataclass(frozen=True)
class RunSettings:
    """The run config, typed and checked (keys are the run-config keys with `-` → `_`)."""

    num_server_rounds: int = 5
    strategy: str = "fedavg"
    proximal_mu: float = 0.01  # FedProx only
    server_lr: float = 0.01  # FedAdam / FedYogi / FedAdagrad only
    local_epochs: int = 2
    lr: float = 3e-3
    batch_size: int = 32
    architecture: str = "tf_efficientnet_lite0"
    input_size: int = 128
    classes: str = ""  # comma-separated; "" = the five shared leukocyte classes
    color: str = "rgb"
    cell_crop: float = 1.3  # CellCrop scale; 0 = no cell crop
    color_norm: str = "white-balance"  # none | white-balance | stain
    detail: int = 0  # contract low-pass: the framed cell reduced to this many pixels a side; 0 = off
    # models.test_views: none | flips | dihedral | turns-zooms, averaged inside the exported graph; the
    # 12-view turns-zooms won the leave-one-site-out criterion (docs/results.md, "Test-time views")
    test_views: str = "turns-zooms"
    # What the sites train, the rest frozen (federation.trunk). "stage" (last block group + classifier) beat
    # "full" on the external hospital in the same 5-round deployment (docs/results.md, "The shipped default").
    train_top: str = "stage"
    augment: str = "texture"  # federation.augment.named_augmentation: default | texture | strong-colour | ...
    # How often a site trains on the clean cell instead of an augmented one (AugmentConfig.clean_p): 1 in 9,
    # as the benchmark's recipe draws it from its 8 augmented views + the clean one; without it Barcelona
    # loses ~0.03 (docs/results.md, "The clean cell in training").
    clean_view_p: float = 0.111
    # With a frozen trunk (train-top head, stage or two-stages) and a site cache (node config cache-dir),
    # each site trains on the cached trunk outputs of a fixed pool of views per cell: the clean one + this many
    # seeded augmentations, one drawn per cell and epoch (the clean one 1 time in 1 + view-pool, so
    # clean-view-p is then unused): the benchmark's recipe, and the trunk runs once per view and run
    # (federation.site_cache; docs/results.md, "A finite pool of views"). 0 = fresh augmentation every step.
    view_pool: int = 8
    # Each site's loss on logits + tau·log(its own class prior) instead of class weights (Menon et al. 2021,
    # per site as in FedLC), for consortia whose sites see very different class mixes. In-domain (one
    # domain, Dirichlet(0.5) label skew) it lifts plain FedMedian as far as the server's recalibration does;
    # across hospitals it costs 0.03-0.04 at Barcelona, so 0 (off) ships (docs/results.md, "Label skew:
    # logit adjustment at the sites").
    logit_adjustment: float = 0.0
    seed: int = 0
    min_nodes: int = 3
    round_timeout: float = 1800.0  # seconds to wait for replies per train/evaluate step, and for nodes
    gate_tolerance: float = 0.02
    # fitted: the temperature with the lowest pooled val NLL; soften-only: never below 1 (docs/results.md)
    temperature_rule: str = "fitted"
    # Weight of the relative-size opinion (models.size_prior) against the network's; 0 = off. 2 won the
    # leave-one-site-out criterion (docs/results.md, "Relative cell size").
    size_weight: float = 2.0
    # Weight of the granule-density opinion (models.granule_prior); 0 = off. 1 won the federated
    # leave-one-site-out criterion among 0 / 0.5 / 1, with size at 2 (docs/results.md, "Granules").
    granule_weight: float = 1.0
    # What is evaluated, gated and registered each round: the mean of its aggregate and the last accepted
    # rounds' (federation.averaging; training goes on from the plain aggregates); 1 = the aggregate alone.
    # 5 (with the shipped 5 rounds: every accepted round) won the federated leave-one-site-out criterion
    # (docs/results.md, "Averaged rounds").
    average_rounds: int = 5
    num_malicious: int = 1  # krum / multikrum: sites assumed hostile
    multikrum_keep: int = 2  # multikrum: updates averaged
    trim_beta: float = 0.34  # trimmedmean: fraction cut per tail (>= 1/3 trims one of three sites)
    dp_noise: float = 0.0  # noise multiplier of central DP; 0 = DP off (see federation.privacy)
    dp_clip: float = 1.0  # L2 clipping norm of each site's update
    dp_delta: float = 1e-5
    resume: bool = False  # continue the run in run-dir from its checkpoint (see federation.resume)
    auto_promote: bool = True  # registry lifecycle: promote a candidate that beats production
    promote_margin: float = 0.01  # ... by at least this pooled val balanced accuracy
    registry: str = ""
    model_name: str = "wbc-classifier"
    run_dir: str = ""
    parity_images: str = ""

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> RunSettings:
        fields = cls.__dataclass_fields__
        values: dict[str, Any] = {}
        for key, raw in config.items():
            name = key.replace("-", "_")
            if name not in fields:
                raise ValueError(f"unknown run-config key {key!r}")
            kind = type(fields[name].default)
            if kind is bool:
                if isinstance(raw, str) and raw.strip().lower() in ("true", "false"):
                    raw = raw.strip().lower() == "true"
                if not isinstance(raw, bool):
                    raise ValueError(f"run-config {key}={raw!r}: expected true or false")
            if kind is int and isinstance(raw, float) and not raw.is_integer():
                raise ValueError(f"run-config {key}={raw!r}: expected a whole number")
            try:
                values[name] = kind(raw)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"run-config {key}={raw!r}: expected {kind.__name__}") from exc
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        problems = []
        if self.strategy.lower() not in STRATEGY_NAMES:
            problems.append(f"strategy {self.strategy!r} is not one of {', '.join(STRATEGY_NAMES)}")
        for key in ("num_server_rounds", "local_epochs", "batch_size", "min_nodes", "input_size", "average_rounds"):
            if getattr(self, key) < 1:
                problems.append(f"{key.replace('_', '-')} must be >= 1")
        for key in ("lr", "server_lr", "round_timeout"):
            if not getattr(self, key) > 0:
                problems.append(f"{key.replace('_', '-')} must be > 0")
        if self.temperature_rule not in ("soften-only", "fitted"):
            problems.append(f"temperature-rule {self.temperature_rule!r} is not one of soften-only, fitted")
        if not 0.0 <= self.clean_view_p <= 1.0:
            problems.append(f"clean-view-p {self.clean_view_p} is not within [0, 1]")
        if not 0.0 <= self.logit_adjustment <= 5.0:
            problems.append(f"logit-adjustment {self.logit_adjustment} is not within [0, 5]")
        if not 0 <= self.view_pool <= 64:
            problems.append(f"view-pool {self.view_pool} is not within 0-64 views")
        if not 0.0 <= self.size_weight <= 10.0:
            problems.append(f"size-weight {self.size_weight} is not within [0, 10]")
        if not 0.0 <= self.granule_weight <= 10.0:
            problems.append(f"granule-weight {self.granule_weight} is not within [0, 10]")
        try:
            from federation.augment import named_augmentation

            named_augmentation(self.augment)
        except ValueError as exc:
            problems.append(str(exc))
        from federation.trunk import TOPS

        if self.train_top not in TOPS:
            problems.append(f"train-top {self.train_top!r} is not one of {', '.join(TOPS)}")
        if self.detail != 0 and not 8 <= self.detail <= 1024:
            problems.append(f"detail must be 0 (off) or 8-1024 pixels, not {self.detail}")
        from typing import get_args

        from models.contract import TestViews

        view_sets = get_args(TestViews)
        if self.test_views not in view_sets:
            problems.append(f"test-views {self.test_views!r} is not one of {', '.join(view_sets)}")
        if self.proximal_mu < 0 or self.gate_tolerance < 0:
            problems.append("proximal-mu and gate-tolerance must be >= 0")
        if self.dp_noise < 0 or not self.dp_clip > 0 or not 0 < self.dp_delta < 1:
            problems.append("dp-noise must be >= 0, dp-clip > 0 and dp-delta in (0, 1)")
        if self.dp_noise > 0 and self.strategy.lower() not in ("fedavg", "fedprox"):
            problems.append(f"dp-noise needs fedavg or fedprox (equal-weight mean of clipped updates), not {self.strategy}")
        try:
            from federation.strategies import make_strategy

            make_strategy(
                self.strategy,
                min_nodes=self.min_nodes,
                num_malicious=self.num_malicious,
                multikrum_keep=self.multikrum_keep,
                trim_beta=self.trim_beta,
            )
        except ValueError as exc:
            if self.strategy.lower() in STRATEGY_NAMES:
                problems.append(str(exc))
        for key in ("run_dir", "registry", "parity_images"):
            value = getattr(self, key)
            if not value or not Path(value).is_absolute():
                problems.append(f"{key.replace('_', '-')} must be an absolute path (got {value!r})")
        if problems:
            raise ValueError("bad run config: " + "; ".join(problems))

    @property
    def class_names(self) -> tuple[str, ...]:
        from models.contract import SHARED_CLASSES

        names = tuple(c.strip() for c in self.classes.split(",") if c.strip())
        return names or SHARED_CLASSES

    def training(self) -> dict[str, Any]:
        return {
            "local_epochs": self.local_epochs,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "num_server_rounds": self.num_server_rounds,
            "min_nodes": self.min_nodes,
            "gate_tolerance": self.gate_tolerance,
            "round_timeout": self.round_timeout,
            "average_rounds": self.average_rounds,
        }

    def dp_config(self):
        """The run's differential privacy, or None when off."""
        if self.dp_noise <= 0:
            return None
        from federation.privacy import DPConfig

        return DPConfig(self.dp_noise, self.dp_clip, self.min_nodes, self.dp_delta)


def build_contract_from_settings(settings: RunSettings):
    from federation.task import build_contract
    from models.contract import CellCrop

    return build_contract(
        settings.architecture,
        settings.input_size,
        class_names=settings.class_names,
        cell_crop=CellCrop(scale=settings.cell_crop) if settings.cell_crop > 0 else None,
        color=settings.color,
        color_norm=settings.color_norm,
        detail=settings.detail or None,
        test_views=settings.test_views,
    )


def wait_for_nodes(grid: Grid, minimum: int, timeout: float, events: ev.EventLog) -> list[int]:
    """Flower's own sampler waits forever; a federation whose hospitals never connect must fail instead."""
    deadline = time.time() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            events.emit(ev.NODES_READY, nodes=len(nodes))
            return nodes
        if time.time() > deadline:
            raise TimeoutError(f"only {len(nodes)} of {minimum} SuperNodes connected within {timeout:g} s")
        time.sleep(1.0)


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = RunSettings.from_run_config(context.run_config)
    run_dir = Path(settings.run_dir)
    events = ev.EventLog(run_dir)
    t0 = time.time()
    try:
        summary = _run(grid, context, settings, events)
    except BaseException as exc:
        events.emit(ev.RUN_FAILED, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        raise
    events.emit(ev.RUN_FINISHED, seconds=round(time.time() - t0, 3), **summary)


def train_config_record(settings: RunSettings, contract_json: str, layout_digest: str) -> ConfigRecord:
    """What every site trains with each round (read back by `client_app.local_train_config`)."""
    from federation.packing import LAYOUT_KEY

    return ConfigRecord(
        {
            "contract": contract_json,
            LAYOUT_KEY: layout_digest,
            "local-epochs": settings.local_epochs,
            "train-top": settings.train_top,
            "augment": settings.augment,
            "clean-view-p": settings.clean_view_p,
            "view-pool": settings.view_pool,
            "logit-adjustment": settings.logit_adjustment,
            "lr": settings.lr,
            "batch-size": settings.batch_size,
            "seed": settings.seed,
        }
    )


def _run(grid: Grid, context: Context, settings: RunSettings, events: ev.EventLog) -> dict[str, Any]:
    # Heavy imports here, not at module level: `deploy.py` imports RunSettings without torch.
    from federation import resume as rs
    from federation.packing import LAYOUT_KEY, Layout, buffer_groups
    from federation.publish import Publisher, find_parity_images
    from federation.rounds import Accepted, ReportingGrid, RoundBook, write_json_atomic
    from federation.task import create_model_from_contract, seed_everything
    from models.calibration import calibrate_sites, without_summaries
    from models.granule_prior import fit_granule_prior
    from models.size_prior import SizeStatistics, anchor_of, fit_prior
    from models.zoo import weight_source

    params = strategy_params(
        settings.strategy,
        proximal_mu=settings.proximal_mu,
        server_lr=settings.server_lr,
        num_malicious=settings.num_malicious,
        multikrum_keep=settings.multikrum_keep,
        trim_beta=settings.trim_beta,
    )
    strategy_info = {"name": settings.strategy.lower(), **params}
    dp = settings.dp_config()
    checkpoint = rs.start_or_resume(settings.run_dir, settings.num_server_rounds, settings.resume, context.run_id)
    events.emit(
        ev.RUN_STARTED,
        run_id=context.run_id,
        federation_run=checkpoint.federation_run,
        strategy=strategy_info,
        rounds=settings.num_server_rounds,
        min_nodes=settings.min_nodes,
        dp=None if dp is None else {"noise_multiplier": dp.noise_multiplier, "clipping_norm": dp.clipping_norm},
    )
    wait_for_nodes(grid, settings.min_nodes, settings.round_timeout, events)

    seed_everything(settings.seed)  # the new head's initial weights depend on it
    contract = build_contract_from_settings(settings)
    model = create_model_from_contract(contract, pretrained=True)
    source = weight_source(model).as_dict()
    # Three big arrays on the wire instead of one per tensor (federation.packing: Flower moves each Array as
    # its own object); FedOpt averages the buffer groups instead of stepping them.
    layout = Layout.of_model(model)
    initial = layout.pack(model.state_dict())
    buffers = buffer_groups(initial)

    parity_paths = find_parity_images(settings.parity_images, contract)
    publisher = Publisher(
        registry_root=settings.registry,
        model_name=settings.model_name,
        contract=contract,
        model=model,
        parity_images=parity_paths,
        work_dir=Path(settings.run_dir) / "export",
    )
    if not publisher.images:
        raise ValueError(
            f"parity-images {settings.parity_images}: no images found for the export parity check"
        )

    def publish(server_round: int, arrays: ArrayRecord, metadata: dict[str, Any]) -> dict[str, Any]:
        metadata = {
            **metadata,
            "privacy": {
                "dp": None if dp is None else dp.lineage(releases=server_round),
                "secure_aggregation": None,
            },
        }
        found = rs.find_registered(publisher.registry, checkpoint.federation_run, server_round)
        if found is not None:  # registered before a restart cut the round short: never twice
            return {"status": "registered", "reason": f"already registered as v{found.version} before a restart",
                    "version": found.version, "path": str(found.path), "sha256": found.sha256, "parity": {}}
        # Temperature and abstain threshold from the sites' pooled validation summaries (no cells pooled).
        per_site = metadata.get("metrics", {}).get("per_site_val", {})
        soften_only = settings.temperature_rule == "soften-only"
        calibration = calibrate_sites(per_site, contract.num_classes, soften_only=soften_only)
        version_contract = contract
        if calibration is not None:
            version_contract = contract.with_updates(
                temperature=calibration.temperature, abstain_threshold=calibration.abstain_threshold
            )
            metadata["metrics"] = {**metadata["metrics"], "per_site_val": without_summaries(per_site)}
        metadata["calibration"] = calibration.as_dict() if calibration else None
        # The relative-size opinion from the sites' per-class size sums (no cell's size left any site).
        size_prior = None
        if settings.size_weight > 0:
            stats = [SizeStatistics.from_record(site.get("size") or {}) for site in metadata.get("sites", {}).values()]
            size_prior = fit_prior([s for s in stats if s is not None], settings.size_weight,
                                   anchor=anchor_of(version_contract.class_names))
        if size_prior is not None:
            version_contract = version_contract.with_updates(size_prior=size_prior.model_dump())
        metadata["size_prior"] = size_prior.model_dump() if size_prior else None
        # ... and the granule-density opinion from their per-class granule sums.
        granule_prior = None
        if settings.granule_weight > 0:
            stats = [SizeStatistics.from_record(site.get("granules") or {}, "granule")
                     for site in metadata.get("sites", {}).values()]
            granule_prior = fit_granule_prior([s for s in stats if s is not None], settings.granule_weight,
                                              version_contract.class_names, anchor_of(version_contract.class_names))
        if granule_prior is not None:
            version_contract = version_contract.with_updates(granule_prior=granule_prior.model_dump())
        metadata["granule_prior"] = granule_prior.model_dump() if granule_prior else None
        return publisher.publish(layout.to_torch(arrays), metadata, version_contract).as_dict()

    def lifecycle(book: RoundBook, record: dict[str, Any]) -> dict[str, Any]:
        from models.lifecycle import after_registration

        outcome = after_registration(
            publisher.registry,
            int(record["publish"]["version"]),
            margin=settings.promote_margin,
            auto_promote=settings.auto_promote,
        )
        events.emit(ev.LIFECYCLE, round=record["round"], **outcome)
        return outcome

    def save_checkpoint(book: RoundBook, record: dict[str, Any]) -> None:
        server_round = int(record["round"])
        if book.accepted.round == server_round and checkpoint.accepted_round != server_round:
            checkpoint.save_weights(settings.run_dir, book.accepted.arrays)
            checkpoint.accepted_round = server_round
            checkpoint.accepted_balanced_accuracy = book.accepted.balanced_accuracy
        checkpoint.accepted_version = book.accepted.version
        checkpoint.completed_rounds = max(checkpoint.completed_rounds, server_round)
        pending = (record.get("publish") or {}).get("status") == "pending"
        checkpoint.pending_publish = server_round if pending else None
        checkpoint.save(settings.run_dir)

    lineage = {
        "run_id": context.run_id,
        "federation_run": checkpoint.federation_run,
        "model_name": settings.model_name,
        "strategy": strategy_info,
        "training": settings.training(),
        "weight_source": source,
        "flower": {"version": _flwr_version(), "run_config": dict(context.run_config)},
    }
    book = RoundBook(
        run_dir=settings.run_dir,
        events=events,
        class_names=contract.class_names,
        initial_arrays=initial,
        gate_tolerance=settings.gate_tolerance,
        min_sites=settings.min_nodes,
        publish=publish,
        lineage=lineage,
        on_round_closed=save_checkpoint,
        on_registered=lifecycle,
        average_rounds=settings.average_rounds,
    )
    strategy = make_strategy(
        settings.strategy,
        min_nodes=settings.min_nodes,
        proximal_mu=settings.proximal_mu,
        server_lr=settings.server_lr,
        client_lr=settings.lr,
        num_malicious=settings.num_malicious,
        multikrum_keep=settings.multikrum_keep,
        trim_beta=settings.trim_beta,
        node_wait=settings.round_timeout,
        uniform_weights=dp is not None,
        observer=book,
        buffer_keys=buffers,
    )
    if dp is not None:
        from federation.privacy import with_dp

        strategy = with_dp(strategy, dp)

    if checkpoint.completed_rounds:  # resumed: continue from the last accepted weights
        arrays = checkpoint.load_weights(settings.run_dir) if checkpoint.accepted_round else initial
        book.restore(
            Accepted(checkpoint.accepted_round, checkpoint.accepted_balanced_accuracy, arrays,
                     checkpoint.accepted_version),
            checkpoint.completed_rounds,
        )
        events.emit(
            ev.RUN_RESUMED,
            federation_run=checkpoint.federation_run,
            completed_rounds=checkpoint.completed_rounds,
            accepted_round=checkpoint.accepted_round,
            accepted_version=checkpoint.accepted_version,
            pending_publish=checkpoint.pending_publish,
        )
        if checkpoint.pending_publish is not None:  # the registration the restart cut short
            record = book.records[checkpoint.pending_publish]
            book.publish_accepted(checkpoint.pending_publish, arrays, record)
            book.close_round(checkpoint.pending_publish, record)
    contract_json = contract.to_json()
    train_config = train_config_record(settings, contract_json, layout.digest)
    evaluate_config = ConfigRecord(
        {"contract": contract_json, LAYOUT_KEY: layout.digest, "batch-size": settings.batch_size,
         "train-top": settings.train_top}  # a frozen trunk's test-view outputs may come from the site cache
    )
    rs.run_rounds(
        strategy,
        ReportingGrid(grid, book),
        book.accepted.arrays,
        first_round=checkpoint.completed_rounds + 1,
        last_round=settings.num_server_rounds,
        timeout=settings.round_timeout,
        train_config=train_config,
        evaluate_config=evaluate_config,
        evaluate_fn=book,
        serve=book.serve,
    )
    summary = book.summary()
    write_json_atomic(
        Path(settings.run_dir) / "summary.json",
        {
            **summary,
            "run_id": context.run_id,
            "federation_run": checkpoint.federation_run,
            "flower_runs": checkpoint.flower_runs,
            "strategy": strategy_info,
            "settings": asdict(settings),
        },
    )
    return summary


def _flwr_version() -> str:
    import importlib.metadata as md

    return md.version("flwr")
