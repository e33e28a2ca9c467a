"""A second, small data writer, apart from the package's own generator: another vocabulary (names with
``&``, ``/``, commas, digits, apostrophes and accents), other shapes and image sizes, other counts. Tasks
are run on it so that nothing passes only because it was tested on the data it was tuned on.

* :func:`write_catalog`: a catalog folder (``train.jsonl``, ``validation.jsonl``, PNG images);
* :func:`write_fashioniq`: a FashionIQ folder (``captions/``, ``image_splits/``, ``images/``);
* :func:`write_embeddings`: given vectors as an embed shard folder, written by the package's own shard
  writer without an encoder (for indexes at sizes no encoder here could reach).
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Dict, List

from PIL import Image, ImageDraw

BRANDS = ["Kestrel & Co", "Dürer/Lenz", "Maison 1961", "Ólafsdóttir, Ltd.", "O'Hara & Sons", "Zoë-Brandt"]
GARMENTS = ["wrap dress", "oxford shirt", "crop tee", "trench coat", "pleated skirt"]
COLOURS = {"red, white": ((200, 30, 40), (245, 245, 245)), "navy/gold": ((20, 30, 90), (210, 170, 40)),
           "olive": ((90, 100, 40), (90, 100, 40)), "café au lait": ((160, 120, 80), (230, 210, 180)),
           "black & cream": ((15, 15, 15), (240, 230, 200))}
FABRICS = ["100% wool", "55% linen, 45% cotton", "98% cotton/2% elastane", "recycled polyester (70%)"]
FITS = ["relaxed-fit", "slim", "oversized", "cropped"]
SEASONS = ["SS'24", "FW2023", "Resort 25"]
SIZE = (96, 120)  # width, height: not square, not the encoders' input size


def _product(rng: random.Random, i: int) -> Dict[str, str]:
    colour = rng.choice(list(COLOURS))
    return {"brand": rng.choice(BRANDS), "subcategory": rng.choice(GARMENTS), "colour": colour,
            "composition": rng.choice(FABRICS), "season": rng.choice(SEASONS), "fit": rng.choice(FITS), "n": str(i)}


def _render(product: Dict[str, str], path: Path) -> None:
    main, accent = COLOURS[product["colour"]]
    image = Image.new("RGB", SIZE, (236, 232, 226))
    draw = ImageDraw.Draw(image)
    garment = GARMENTS.index(product["subcategory"])
    box = (14 + 2 * garment, 10, SIZE[0] - 14 - 2 * garment, SIZE[1] - 8 - 6 * garment)
    (draw.ellipse if garment % 2 else draw.rectangle)(box, fill=main, outline=accent, width=3)
    mark = BRANDS.index(product["brand"])
    draw.polygon([(20 + 9 * mark, 30), (28 + 9 * mark, 30), (24 + 9 * mark, 22)], fill=accent)  # the brand mark
    stripes = FABRICS.index(product["composition"]) + 1
    for s in range(stripes):
        draw.line((box[0] + 4, 60 + 8 * s, box[2] - 4, 60 + 8 * s), fill=accent, width=1)
    image.save(path)


def _description(p: Dict[str, str]) -> str:
    return (f"{p['brand']} {p['fit']} {p['subcategory']} in {p['colour']}, {p['composition']}; "
            f"{p['season']} collection, style #{p['n']}.")


def write_catalog(root: Path, train: int = 40, validation: int = 24, seed: int = 7) -> Path:
    """A catalog folder with ``train.jsonl`` and ``validation.jsonl`` (image, text, brand, subcategory,
    season, composition columns) and its PNG images; returns the folder."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("validation", validation)):
        rows = []
        for i in range(count):
            product = _product(rng, i)
            name = f"{split}-{i:03d}.png"
            _render(product, root / "images" / name)
            rows.append(json.dumps({"image": f"images/{name}", "text": _description(product),
                                    "description": _description(product), "brand": product["brand"],
                                    "subcategory": product["subcategory"].upper(), "season": product["season"],
                                    "composition": product["composition"]}, ensure_ascii=False))
        (root / f"{split}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


def write_fashioniq(root: Path, gallery: int = 60, triplets: int = 12, seed: int = 11,
                    categories=("dress", "shirt", "toptee"), splits=("train", "val")) -> Path:
    """A FashionIQ folder: per category and split ``gallery`` images and ``triplets`` triplets whose
    relative captions use this module's vocabulary (one of them empty)."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for folder in ("captions", "image_splits"):
        (root / folder).mkdir(exist_ok=True)
    for category in categories:
        for split in splits:
            products = [_product(rng, i) for i in range(gallery)]
            names = [f"{category}{split}{i:03d}" for i in range(gallery)]
            for name, product in zip(names, products):
                _render(product, root / "images" / f"{name}.png")
            entries: List[dict] = []
            for t in range(triplets):
                ref, target = rng.sample(range(gallery), 2)
                p = products[target]
                captions = [f"is {p['colour']} with the {p['brand']} logo", f"is {p['fit']}, {p['composition']}"]
                if t == 0:
                    captions[1] = ""
                entries.append({"candidate": names[ref], "target": names[target], "captions": captions})
            (root / "captions" / f"cap.{category}.{split}.json").write_text(
                json.dumps(entries, ensure_ascii=False), encoding="utf-8")
            (root / "image_splits" / f"split.{category}.{split}.json").write_text(json.dumps(names))
    return root


class _Vectors:
    """What the shard writer asks of an encoder: a name, a fingerprint, entities and a dimension."""
    entities = ()

    def __init__(self, dim: int):
        self.name, self.embed_dim = "given vectors", dim

    def fingerprint(self) -> str:
        return f"vectors-{self.embed_dim}"


def write_embeddings(root: Path, images, texts=None, shard_size: int = 1000) -> Path:
    """An embed shard folder holding ``images`` (N, D) as image rows (``img-{n}.png`` labels) and, given,
    ``texts`` (M, D) as text rows, through ``e2_embed.shards.ShardedRun``; returns the folder."""
    import numpy as np
    import torch

    from e2_embed.shards import ShardedRun

    run = ShardedRun(Path(root), _Vectors(images.shape[1]), shard_size, batch_size=shard_size, regions=False,
                     progress=False)
    for kind, vectors, name in (("img", images, "image_features"), ("text", texts, "text_features")):
        if vectors is None:
            continue
        vectors = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
        labels = [f"{kind}-{n}.png" if kind == "img" else f"text {n}" for n in range(len(vectors))]
        run.write(kind, labels, "given", lambda batches: ((b, {name: vectors[b]}, []) for b in batches))
    run.finish()
    return Path(root)
