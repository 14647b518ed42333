"""Research probe: which frozen features + preprocessing + augmented views transfer to a new hospital?

    .venv/bin/python benchmarks/generalisation.py --arch tf_efficientnet_lite0 --size 128 --views 0 8
    .venv/bin/python benchmarks/generalisation.py --arch vit_small_patch14_dinov2 --size 112 --color gray

Centralised linear heads (class-balanced multinomial logistic regression, L-BFGS) on frozen pooled
features of the three training sites' `train` splits (clean view + K augmented views per image). The L2
strength is chosen by the leave-one-training-site-out criterion (train on two sites' train splits, test
on the third site's train+val+test; mean balanced accuracy over the three) — never on Barcelona.
Reported: internal test, LOSO, Barcelona (5 classes, all splits). Features cached under var/benchmark/.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from federation.augment import AugmentConfig
from federation.features import trunk_features
from federation.prepared import PreparedImages
from federation.sites import DEFAULT_TRAINING_SITES, EXTERNAL_SITE, DataRoot, resolve_data_root
from federation.task import build_contract
from federation.trunk import split_model
from models.contract import SHARED_CLASSES, CellCrop
from models.evaluate import Metrics, confusion_matrix
from models.zoo import create_model

VAR = ROOT / "var" / "benchmark"


def fit_logreg(x: np.ndarray, y: np.ndarray, l2: float, classes: int) -> torch.nn.Linear:
    counts = np.bincount(y, minlength=classes).astype(np.float32)
    w = np.where(counts > 0, counts.sum() / (classes * np.maximum(counts, 1)), 0.0)
    w = np.minimum(w, 5.0)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    head = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(
        head.parameters(), lr=1.0, max_iter=200, history_size=20, line_search_fn="strong_wolfe"
    )
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor(w, dtype=torch.float32))

    def closure():
        opt.zero_grad()
        loss = loss_fn(head(xt), yt) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def metrics(head, x, y) -> Metrics:
    with torch.no_grad():
        pred = head(torch.from_numpy(x)).argmax(1).numpy()
    return Metrics(SHARED_CLASSES, confusion_matrix(y, pred, len(SHARED_CLASSES)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="tf_efficientnet_lite0")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--color", default="rgb")
    ap.add_argument("--norm", default="white-balance")
    ap.add_argument("--crop", type=float, default=1.3)
    ap.add_argument("--views", type=int, nargs="+", default=[0, 8])
    ap.add_argument("--augment", default="default", choices=["default", "geometry"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--barcelona-per-class", type=int, default=150, help="seeded subsample (0 = all)")
    ap.add_argument("--lowpass", type=int, default=0, help="resize the prepared cell to this side first")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variant = ""
    if args.lowpass:
        import federation.features as fb
        from models.preprocess import finish as _finish

        def lowpassed(image, contract):
            side = args.lowpass
            return _finish(image.resize((side, side), Image.Resampling.BOX), contract)

        fb.finish = lowpassed
        variant = f"lowpass{args.lowpass}"

    data = DataRoot(resolve_data_root(None))
    internal = data.select(DEFAULT_TRAINING_SITES, classes=SHARED_CLASSES)
    external = data.select([EXTERNAL_SITE], classes=SHARED_CLASSES)
    if args.barcelona_per_class:
        rng = np.random.default_rng(0)
        keep = set()
        for c in SHARED_CLASSES:
            idx = [i for i, s in enumerate(external) if s.label == c]
            keep |= set(rng.choice(idx, min(len(idx), args.barcelona_per_class), replace=False).tolist())
        external = [s for i, s in enumerate(external) if i in keep]
    samples = internal + external
    y = np.array([SHARED_CLASSES.index(s.label) for s in samples])
    contract = build_contract(
        args.arch,
        args.size,
        cell_crop=CellCrop(scale=args.crop) if args.crop else None,
        color=args.color,
        color_norm=args.norm,
    )
    prepared = PreparedImages.build(samples, contract, VAR / "prepared")
    split = split_model(
        create_model(args.arch, len(SHARED_CLASSES), pretrained=True, img_size=args.size), "head"
    )
    aug = AugmentConfig() if args.augment == "default" else AugmentConfig.geometry_only()
    clean = trunk_features(split, samples, prepared, contract, cache_dir=VAR / "features", variant=variant)[
        :, 0
    ].astype(np.float32)
    idx = {
        k: np.array([i for i, s in enumerate(samples) if s.site != EXTERNAL_SITE and s.split == k])
        for k in ("train", "val", "test")
    }
    ext = np.array([i for i, s in enumerate(samples) if s.site == EXTERNAL_SITE])
    site_of = np.array([s.site for s in samples])
    train_internal = [s for s in samples if s.site != EXTERNAL_SITE and s.split == "train"]
    prep_train = PreparedImages.build(train_internal, contract, VAR / "prepared")
    for views in args.views:
        if views:
            feats = trunk_features(
                split,
                train_internal,
                prep_train,
                contract,
                views=views,
                augment=aug,
                seed=0,
                cache_dir=VAR / "features",
                variant=variant,
            ).astype(np.float32)
        else:
            feats = clean[idx["train"]][:, None]
        xtr = feats.reshape(-1, feats.shape[-1])
        ytr = np.repeat(y[idx["train"]], feats.shape[1])
        str_ = np.repeat(site_of[idx["train"]], feats.shape[1])
        mean, std = xtr.mean(0), xtr.std(0) + 1e-6
        z = lambda a: ((a - mean) / std).astype(np.float32)
        rows = []
        for l2 in (1e-4, 1e-3, 1e-2, 1e-1):
            loso = []
            for held in DEFAULT_TRAINING_SITES:
                keep = str_ != held
                head = fit_logreg(z(xtr[keep]), ytr[keep], l2, 5)
                hi = np.array([i for i, s in enumerate(samples) if s.site == held])
                loso.append(metrics(head, z(clean[hi]), y[hi]).balanced_accuracy)
            head = fit_logreg(z(xtr), ytr, l2, 5)
            m_test = metrics(head, z(clean[idx["test"]]), y[idx["test"]])
            m_val = metrics(head, z(clean[idx["val"]]), y[idx["val"]])
            m_ext = metrics(head, z(clean[ext]), y[ext])
            rows.append((l2, np.mean(loso), loso, m_val.balanced_accuracy, m_test.balanced_accuracy, m_ext))
        best = max(rows, key=lambda r: r[1])
        for r in rows:
            mark = "*" if r is best else " "
            print(
                f"{mark} {args.arch} {args.size} lp{args.lowpass} {args.color} {args.norm} crop{args.crop} views={views} "
                f"aug={args.augment} l2={r[0]:g} LOSO {r[1]:.3f} ({' '.join(f'{v:.2f}' for v in r[2])}) "
                f"val {r[3]:.3f} test {r[4]:.3f} | Barcelona {r[5].balanced_accuracy:.3f} "
                f"recall {' '.join(f'{v:.2f}' for v in r[5].recall)}",
                flush=True,
            )


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"[{time.time() - t0:.0f} s]")
