"""The benchmark's site: a Flower ClientApp that trains the model's top on its own cached trunk features.

Same message shapes as `federation.client_app` (one ArrayRecord of weights, a MetricRecord with
`num-examples` and the same metric keys, a ConfigRecord naming the site), and the same training loop
(`federation.task.fit`) with the same recipe settings from the train config. What differs: the weights
exchanged are the top's (the trunk is frozen and identical at every site, so sending it would change
nothing), and the inputs are the site's cached trunk outputs of its own images (clean + augmented views)
instead of images. Each node's Context names its site in `node_config`; the site's arrays are looked up
in this process's `SITE_DATA` under the node's `bench-key` (a site only ever sees its own arrays).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from federation.strategies import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, SITE_KEY, WEIGHT_KEY
from federation.task import TrainConfig, create_model_from_contract, evaluation_record
from federation.top_training import top_logits, train_top
from federation.trunk import Split, split_model
from models.contract import ModelContract


@dataclass
class SiteFeatures:
    """One site's cached trunk outputs: train (N, 1 + views, ...) and clean val (M, ...)."""

    site: str
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray


SITE_DATA: dict[str, SiteFeatures] = {}
_SPLITS: dict[tuple[str, str], Split] = {}


def site_split(contract: ModelContract, top: str) -> Split:
    """A model skeleton per (contract, top); its top weights are replaced by every message."""
    key = (contract.to_json(), top)
    if key not in _SPLITS:
        split = split_model(create_model_from_contract(contract, pretrained=False), top)
        split.freeze_trunk()
        _SPLITS[key] = split
    return _SPLITS[key]


app = ClientApp()


def _setup(msg: Message, context: Context) -> tuple[SiteFeatures, ConfigRecord, ModelContract, Split]:
    data = SITE_DATA[str(context.node_config["bench-key"])]
    if data.site != context.node_config["site"]:
        raise ValueError(f"node for {context.node_config['site']} was given {data.site}'s data")
    config = msg.content[CONFIG_KEY]
    contract = ModelContract.from_json(str(config["contract"]))
    split = site_split(contract, str(config["top"]))
    state = msg.content[ARRAYS_KEY].to_torch_state_dict()
    split.load_top_state(state)
    return data, config, contract, split


@app.train()
def train(msg: Message, context: Context) -> Message:
    from federation.client_app import site_seed

    data, config, contract, split = _setup(msg, context)
    server_round = int(config.get("server-round", 0))
    mu = float(config.get("proximal-mu", 0.0))
    global_params = [p.detach().clone() for p in split.trainable_parameters()] if mu > 0 else None
    defaults = TrainConfig()
    train_config = TrainConfig(
        epochs=int(config["local-epochs"]),
        lr=float(config["lr"]),
        batch_size=int(config["batch-size"]),
        weight_decay=float(config.get("weight-decay", defaults.weight_decay)),
        label_smoothing=float(config.get("label-smoothing", defaults.label_smoothing)),
        class_balanced=bool(config.get("class-balanced", defaults.class_balanced)),
        class_weight_cap=float(config.get("class-weight-cap", defaults.class_weight_cap)),
        logit_adjustment=float(config.get("logit-adjustment", defaults.logit_adjustment)),
        frozen_bn_stats=bool(config.get("frozen-bn-stats", defaults.frozen_bn_stats)),
        average_tail=float(config.get("average-tail", defaults.average_tail)),
        frozen_classifier=bool(config.get("frozen-classifier", defaults.frozen_classifier)),
        class_counts=tuple(config["class-counts"]) if "class-counts" in config else None,  # type: ignore[arg-type]
        proximal_mu=mu,
        seed=site_seed(int(config["seed"]), server_round, data.site),
    )
    t0 = time.time()
    result = train_top(
        split, data.train_x, data.train_y, contract.num_classes, train_config, global_params=global_params
    )
    counts = np.bincount(data.train_y, minlength=contract.num_classes)
    content = RecordDict(
        {
            ARRAYS_KEY: ArrayRecord(split.top_state()),
            METRICS_KEY: MetricRecord(
                {
                    WEIGHT_KEY: len(data.train_y),
                    "train-loss": float(result["train_loss"]),
                    "train-accuracy": float(result["train_accuracy"]),
                    "steps": int(result["steps"]),
                    "seconds": float(time.time() - t0),
                }
            ),
            SITE_KEY: ConfigRecord(
                {
                    "site": data.site,
                    "class-names": list(contract.class_names),
                    "class-counts": [int(c) for c in counts],
                }
            ),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    data, _config, contract, split = _setup(msg, context)
    record = evaluation_record(top_logits(split, data.val_x), data.val_y, contract)
    content = RecordDict(
        {
            METRICS_KEY: MetricRecord(record),  # type: ignore[arg-type]
            SITE_KEY: ConfigRecord({"site": data.site, "class-names": list(contract.class_names)}),
        }
    )
    return Message(content=content, reply_to=msg)
