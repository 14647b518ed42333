"""Visual check of the white-cell locator: originals (with the located cell and crop box) beside crops.

    .venv/bin/python scripts/cellcrop_montage.py                      # -> var/cellcrop/montage.png
    .venv/bin/python scripts/cellcrop_montage.py --per-class 2 --tile 80 --out docs/img/cellcrop-montage.png
    .venv/bin/python scripts/cellcrop_montage.py --colour wb          # crops white-balanced

One row per site and class, `--per-class` pairs per row. On each original the located cell is drawn as
a green circle and the crop square (side = scale x diameter) in orange.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from federation.sites import DataRoot, resolve_data_root  # noqa: E402
from models.cellcrop import crop_cell, locate_cell, normalise_stain, white_balance  # noqa: E402
from models.contract import SHARED_CLASSES, CellCrop  # noqa: E402

SITES = ("barcelona-pbc", "tehran-lisc", "jiangxi-tecom", "bccd")
COLOURS = {"wb": white_balance, "stain": normalise_stain}


def annotated_original(image: Image.Image, scale: float, tile: int) -> Image.Image:
    cx, cy, d = locate_cell(image)
    k = tile / max(image.size)
    view = image.convert("RGB").resize((round(image.width * k), round(image.height * k)))
    canvas = Image.new("RGB", (tile, tile), "white")
    canvas.paste(view, ((tile - view.width) // 2, (tile - view.height) // 2))
    draw = ImageDraw.Draw(canvas)
    r, half = d / 2 * k, scale * d / 2 * k
    x, y = cx * k + (tile - view.width) // 2, cy * k + (tile - view.height) // 2
    draw.ellipse((x - r, y - r, x + r, y + r), outline=(0, 200, 0), width=2)
    draw.rectangle((x - half, y - half, x + half, y + half), outline=(255, 140, 0), width=1)
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--sites", nargs="+", default=list(SITES))
    parser.add_argument("--classes", nargs="+", default=list(SHARED_CLASSES))
    parser.add_argument("--per-class", type=int, default=3)
    parser.add_argument("--tile", type=int, default=96)
    parser.add_argument("--scale", type=float, default=1.5)
    parser.add_argument(
        "--colour",
        choices=["rgb", *COLOURS],
        default="rgb",
        help="crops as cut, white-balanced or stain-normalised",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("var/cellcrop/montage.png"))
    args = parser.parse_args()

    data = DataRoot(resolve_data_root(args.data_root))
    rng = random.Random(args.seed)
    spec = CellCrop(scale=args.scale)
    rows: list[list[Image.Image]] = []
    for site in args.sites:
        for label in args.classes:
            samples = data.select([site], classes=[label])
            if not samples:
                continue
            row = []
            for sample in rng.sample(samples, min(args.per_class, len(samples))):
                with Image.open(sample.path) as im:
                    image = im.convert("RGB")
                row.append(annotated_original(image, args.scale, args.tile))
                crop = crop_cell(image, spec)
                if args.colour != "rgb":
                    crop = COLOURS[args.colour](crop)
                row.append(crop.resize((args.tile, args.tile)))
            rows.append(row)

    label_w = 4
    width = label_w + 2 * args.per_class * args.tile + args.per_class * 4
    montage = Image.new("RGB", (width, len(rows) * (args.tile + 2)), "white")
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            x = label_w + j * args.tile + (j // 2) * 4
            montage.paste(tile, (x, i * (args.tile + 2)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    montage.save(args.out, optimize=True)
    print(f"wrote {args.out} ({montage.width}x{montage.height}, {len(rows)} rows)")


if __name__ == "__main__":
    main()
