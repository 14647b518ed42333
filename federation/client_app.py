"""The ClientApp: one hospital's local training and validation, wired to `federation.task`.

Node config (per SuperNode, set by whoever runs the site): `site="<name>" data-root="/abs/path"`
(a data root that holds this site; `federation.sites.materialize_site` makes one holding only it),
optionally `extra-data-roots="/abs/a,/abs/b"` (reviewed exports, see `federation.site_data`) and
`threads=<n>` for torch. Mods: `federation.privacy.clip_when_asked` (Flower's DP clipping, only when
the server's DP strategy asks for it). Flower starts a fresh process for every message, so nothing is kept
in module globals: everything a step needs arrives in the message (weights, the model contract as JSON,
training settings) or is read from the site's own folder.
"""

from __future__ import annotations

import json
import math
import sys
import time
import zlib
from collections import Counter
from dataclasses import replace
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from federation.packing import LAYOUT_KEY, Layout, is_packed
from federation.privacy import clip_when_asked
from federation.site_data import SiteConfigError, SiteData
from federation.strategies import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, SITE_KEY, WEIGHT_KEY

app = ClientApp(mods=[clip_when_asked])
_STARTED = time.time()  # for the log only (a fresh process serves each message)

__all__ = ["SiteConfigError", "app", "site_of"]


def site_of(context: Context) -> tuple[str, Path]:
    data = SiteData.from_node_config(context.node_config)
    return data.site, data.base_root


def site_seed(seed: int, server_round: int, site: str) -> int:
    """Different for every site and round (a rerun after a rejected round is not a replay), reproducible."""
    return (seed * 1_000_003 + server_round * 7919 + zlib.crc32(site.encode())) % (2**31)


def _log(site: str, text: str) -> None:
    """Goes to the SuperNode's log (the only place ClientApp output appears)."""
    print(f"{time.strftime('%H:%M:%S')} [{site}] {text}", file=sys.stdout, flush=True)


def local_train_config(config, site: str):
    """This site's loss and optimiser settings for the round, from the server's train config."""
    from federation.task import TrainConfig

    # Logit adjustment with the site's own class prior replaces the class weights (run config
    # logit-adjustment; docs/results.md, "Label skew: logit adjustment at the sites"). 0 = the weights.
    tau = float(config.get("logit-adjustment", 0.0))
    return TrainConfig(
        epochs=int(config["local-epochs"]),
        lr=float(config["lr"]),
        batch_size=int(config["batch-size"]),
        class_balanced=tau == 0,
        logit_adjustment=tau,
        proximal_mu=float(config.get("proximal-mu", 0.0)),  # set by FedProx only
        seed=site_seed(int(config["seed"]), int(config.get("server-round", 0)), site),
    )


def _setup(msg: Message, context: Context):
    import torch

    from federation.sites import DataError
    from federation.task import create_model_from_contract
    from models.contract import ModelContract

    threads = int(context.node_config.get("threads", 0) or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    site_data = SiteData.from_node_config(context.node_config)
    site = site_data.site
    _log(
        site,
        f"{msg.metadata.message_type} message received (app module loaded {time.time() - _STARTED:.1f} s ago)",
    )
    config = msg.content[CONFIG_KEY]
    contract = ModelContract.from_json(str(config["contract"]))
    split = "train" if msg.metadata.message_type == "train" else "val"
    samples, sources = site_data.select(split, contract.class_names)
    if not samples:
        roots = ", ".join(str(r) for r in site_data.roots)
        raise DataError(f"site {site}: no {split} samples of classes {list(contract.class_names)} in {roots}")
    model = create_model_from_contract(contract, pretrained=False)  # weights come from the message
    layout, arrays = Layout.of_model(model), msg.content[ARRAYS_KEY]
    if is_packed(arrays) and str(config.get(LAYOUT_KEY, layout.digest)) != layout.digest:
        raise ValueError(f"the server's model layout {config.get(LAYOUT_KEY)} is not this site's {layout.digest}")
    model.load_state_dict(layout.to_torch(arrays), strict=True)  # packed (federation.packing) or plain
    config["data-sources"] = json.dumps(sources)  # read back by the handlers for their reply
    config["reply-packed"] = is_packed(arrays)  # answer in the format the server used
    return site, config, contract, samples, model


@app.train()
def train(msg: Message, context: Context) -> Message:
    from federation.augment import named_augmentation
    from federation.site_cache import CACHE_KEY, SiteCache
    from federation.task import train_local

    site, config, contract, samples, model = _setup(msg, context)
    server_round = int(config.get("server-round", 0))
    train_config = local_train_config(config, site)
    mu = train_config.proximal_mu
    global_params = [p.detach().clone() for p in model.parameters() if p.requires_grad] if mu > 0 else None
    t0 = time.time()
    top = str(config.get("train-top", "full"))
    augment = named_augmentation(str(config.get("augment", "default")))
    pool, cache = int(config.get("view-pool", 0)), SiteCache.of(context.node_config)
    if pool > 0 and top != "full" and cache is not None and not augment.style_p:
        result = _train_on_view_pool(model, samples, contract, train_config, cache, top, augment, pool,
                                     int(config["seed"]), _progress(site, server_round))
        _prune(site, cache, t0)
    else:
        if pool > 0:
            _log(site, f"view-pool {pool} needs a frozen trunk (train-top head, stage or two-stages), node "
                       f"config {CACHE_KEY} and no style augmentation: training on fresh augmentation instead")
        result = train_local(
            model,
            samples,
            contract,
            train_config,
            global_params=global_params,
            progress=_progress(site, server_round),
            top=top,
            augment=replace(augment, clean_p=float(config.get("clean-view-p", 0.0))),
        )
    seconds = time.time() - t0
    # Per-class sums of the cells' relative size and granule density (models.size_prior,
    # models.granule_prior): counts and sums, no cell.
    size, granules = result.pop("size", None), result.pop("granules", None)
    counts = Counter(s.label for s in samples)
    _log(site, f"round {server_round}: trained on {len(samples)} cells in {seconds:.1f} s: {result}")
    content = RecordDict(
        {
            ARRAYS_KEY: (
                Layout.of_model(model).pack(model.state_dict())
                if bool(config["reply-packed"])
                else ArrayRecord(model.state_dict())
            ),
            METRICS_KEY: MetricRecord(
                {
                    WEIGHT_KEY: len(samples),
                    "train-loss": float(result["train_loss"]),
                    "train-accuracy": float(result["train_accuracy"]),
                    "steps": int(result["steps"]),
                    "seconds": float(seconds),
                    **(size.to_record() if size is not None else {}),
                    **(granules.to_record("granule") if granules is not None else {}),
                }
            ),
            SITE_KEY: ConfigRecord(
                {
                    "site": site,
                    "class-names": list(contract.class_names),
                    "class-counts": [int(counts[c]) for c in contract.class_names],
                    "data-sources": str(config["data-sources"]),
                }
            ),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from federation.site_cache import SiteCache
    from federation.task import evaluation_record, predict_logits

    started = time.time()
    site, config, contract, samples, model = _setup(msg, context)
    top, cache = str(config.get("train-top", "full")), SiteCache.of(context.node_config)
    if top != "full" and cache is not None:  # the frozen trunk's outputs of every test view, cached
        logits, targets = _cached_logits(model, samples, contract, cache, top)
        _prune(site, cache, started)
    else:
        logits, targets = predict_logits(model, samples, contract, batch_size=int(config.get("batch-size", 64)))
    # Metrics, confusion matrix and the calibration summary (models.calibration): counts only, no cells.
    record = evaluation_record(logits, targets, contract)
    _log(
        site,
        f"round {config.get('server-round')}: val n={record[WEIGHT_KEY]} "
        f"balanced accuracy {record['balanced-accuracy']:.4f}",
    )
    content = RecordDict(
        {
            METRICS_KEY: MetricRecord(record),  # type: ignore[arg-type]
            SITE_KEY: ConfigRecord({"site": site, "class-names": list(contract.class_names)}),
        }
    )
    return Message(content=content, reply_to=msg)


def _train_on_view_pool(model, samples, contract, config, cache, top, augment, views, seed, progress):
    """The benchmark's recipe at a real site: the top trained on the cached trunk outputs of a finite
    pool of views of each cell (the clean one + `views` seeded augmentations, the same all run), one drawn
    per cell and epoch (`federation.top_training.train_top`); the trunk runs once per view and run."""
    import numpy as np

    from federation.top_training import train_top
    from federation.task import granule_statistics_of, size_statistics_of
    from federation.trunk import split_model

    split = split_model(model, top)
    split.freeze_trunk()
    prepared = cache.prepared(samples, contract)
    x = cache.view_pool(split, samples, prepared, contract, augment, views, seed)
    index = {c: i for i, c in enumerate(contract.class_names)}
    y = np.array([index[s.label] for s in samples], dtype=np.int64)
    global_params = [p.detach().clone() for p in split.trainable_parameters()] if config.proximal_mu > 0 else None
    result = train_top(split, x, y, contract.num_classes, config, global_params=global_params, progress=progress)
    return {**result, "size": size_statistics_of(prepared.diameters, y.tolist(), contract),
            "granules": granule_statistics_of(prepared.granules, y.tolist(), contract)}


def _cached_logits(model, samples, contract, cache, top):
    import numpy as np

    from federation.site_cache import view_averaged_logits
    from federation.trunk import split_model

    split = split_model(model, top)
    split.freeze_trunk()
    prepared = cache.prepared(samples, contract)
    feats = cache.test_view_features(split, samples, prepared, contract)
    index = {c: i for i, c in enumerate(contract.class_names)}
    return view_averaged_logits(split, feats, contract), np.array([index[s.label] for s in samples], np.int64)


def _prune(site: str, cache, started: float) -> None:
    """Keep the site cache within its budget; what this message used stays (1 s: file time granularity)."""
    pruned = cache.prune(started - 1.0)
    if pruned.removed_files:
        _log(site, f"site cache: removed {pruned.removed_files} entries unused for longest "
                   f"({pruned.removed_bytes / 2**20:.0f} MB), {pruned.kept_bytes / 2**20:.0f} MB kept")
    if pruned.over_budget:
        _log(site, f"site cache: this round's entries alone take {pruned.kept_bytes / 2**20:.0f} MB, over its "
                   f"budget ({cache.budget_bytes / 2**20:.0f} MB, node config cache-max-mb); they stay: raise "
                   "the budget (and the volume's size) to match")


def _finite(value: float | None) -> float:
    return float(value) if value is not None and math.isfinite(value) else float("nan")


def _progress(site: str, server_round: int):
    last = [0.0]

    def report(step: int, total: int, loss: float) -> None:
        now = time.time()
        if step == total or now - last[0] > 10:  # the SuperNode log, not a flood
            last[0] = now
            _log(site, f"round {server_round}: step {step}/{total} loss {loss:.4f}")

    return report
