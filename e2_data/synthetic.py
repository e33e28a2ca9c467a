"""Synthetic fashion products whose identity hinges on small details, written in FashionGen's h5
layout so the real reader reads them.

Every product is a garment silhouette (sub-category) in a base colour, covered by a fabric
texture (composition), with a brand mark (a 3x3 two-colour glyph, ~14% of the image side, about
one ViT patch) at one of three places and a season hang-tag at the neckline. Many products share
sub-category and colour and differ only in brand, mark position, composition or season: telling
them apart from text means reading the small details. Deterministic for a seed.

Two settings make the mark a harder detail: ``mark_cell`` (its size) and ``mark_ink="one"`` (every
brand's mark in the same black on white, so only its 3x3 pattern, unique per brand, tells brands apart).
"""
from __future__ import annotations

import itertools
import json
import os
import errno
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from e2_core.checkpoint import _atomic_write, remove_stale_temporaries
from e2_core.data.fashiongen import FIELDS, IMAGE_FIELD, PRODUCT_FIELD, fashiongen_file

IMAGE_SIZE = 256  # FashionGen's
BYTES_PER_IMAGE = 8192  # room a compressed synthetic image takes on disk, twice what it was measured to (3.9 KB)

SUBCATEGORIES = ("SHIRTS", "DRESSES", "PANTS", "SKIRTS", "JACKETS", "TOPS")
CATEGORY_OF = {"SHIRTS": "TOPS", "TOPS": "TOPS", "JACKETS": "JACKETS & COATS", "DRESSES": "DRESSES",
               "PANTS": "PANTS", "SKIRTS": "SKIRTS"}
SINGULAR = {"SHIRTS": "shirt", "DRESSES": "dress", "PANTS": "pair of pants", "SKIRTS": "skirt",
            "JACKETS": "jacket", "TOPS": "top"}
COLOURS = {"black": (30, 30, 34), "white": (236, 236, 230), "navy": (32, 44, 96), "red": (178, 34, 40),
           "olive": (98, 108, 48), "beige": (214, 196, 160), "grey": (128, 128, 132), "pink": (226, 150, 170)}
# composition -> (texture, description phrase)
COMPOSITIONS = {"100% cotton": ("plain", "smooth cotton"), "100% wool": ("check", "checked wool"),
                "100% linen": ("hstripe", "horizontally striped linen"),
                "100% polyester": ("dots", "dotted polyester"), "100% silk": ("diagonal", "diagonal-weave silk"),
                "denim": ("vstripe", "vertically ribbed denim")}
SEASONS = {"SS2016": (240, 200, 40), "FW2016": (120, 60, 20), "SS2017": (40, 180, 200), "FW2017": (90, 40, 120)}
MARK_PLACES = ("left chest", "right chest", "hem")
MARK_COLOURS = ((250, 250, 250), (10, 10, 10), (230, 30, 30), (30, 90, 230), (250, 200, 0), (0, 160, 80))
_SYLLABLES = ("ar", "lo", "ve", "ka", "de", "mi", "sol", "ren", "ta", "no", "vi", "zu", "pel", "or", "ix", "ma")


@dataclass(frozen=True)
class Product:
    product_id: int
    subcategory: str
    colour: str
    brand: int  # index into brand_names()
    composition: str
    season: str
    mark_place: str


def brand_names(count: int = 32, seed: int = 0) -> List[str]:
    rng = random.Random(f"brands:{seed}")
    names: List[str] = []
    while len(names) < count:
        name = " ".join("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
                        for _ in range(rng.randint(1, 2)))
        if name not in names:
            names.append(name)
    return names


def brand_glyph(brand: int, seed: int = 0, ink: str = "brand") -> Tuple[np.ndarray, Tuple[int, int, int],
                                                                         Tuple[int, int, int]]:
    """A brand's mark: a 3x3 boolean pattern (never uniform) and its two colours, unique per brand (``ink="one"``:
    black on white for every brand, the pattern unique per brand)."""
    if ink == "one":
        patterns = [cells for cells in itertools.product((False, True), repeat=9) if 2 <= sum(cells) <= 7]
        random.Random(f"glyphs:{seed}").shuffle(patterns)
        return np.array(patterns[brand]).reshape(3, 3), (10, 10, 10), (250, 250, 250)
    if ink != "brand":
        raise ValueError(f"mark ink {ink!r}: use 'brand' (each brand its colours) or 'one' (one ink for all)")
    rng = random.Random(f"glyph:{seed}:{brand}")
    pairs = [(a, b) for a in MARK_COLOURS for b in MARK_COLOURS if a != b]
    fg, bg = pairs[brand % len(pairs)]
    while True:
        cells = np.array([rng.random() < 0.5 for _ in range(9)]).reshape(3, 3)
        if 2 <= cells.sum() <= 7:
            return cells, fg, bg


def catalog(seed: int = 0, num_brands: int = 32) -> List[Product]:
    """Every attribute combination once, in a seed-determined order (products are slices of it)."""
    combos = list(itertools.product(SUBCATEGORIES, COLOURS, range(num_brands), COMPOSITIONS, SEASONS, MARK_PLACES))
    random.Random(f"catalog:{seed}").shuffle(combos)
    return [Product(i, *combo) for i, combo in enumerate(combos)]


def tags_of(product: Product, names: Sequence[str]) -> Dict[str, str]:
    brand = names[product.brand]
    texture_phrase = COMPOSITIONS[product.composition][1]
    description = (f"{product.colour.capitalize()} {SINGULAR[product.subcategory]} in {texture_phrase} "
                   f"with the {brand} logo on the {product.mark_place}.")
    return {"subcategory": product.subcategory, "category": CATEGORY_OF[product.subcategory], "brand": brand,
            "description": description, "season": product.season, "composition": product.composition,
            "name": f"{brand} {product.colour} {SINGULAR[product.subcategory]}"}


# --- rendering ------------------------------------------------------------------------------------

def _silhouette(subcategory: str) -> List[List[Tuple[float, float]]]:
    """Polygons in unit coordinates (0..1) of the garment, roughly centred."""
    torso = [(0.32, 0.22), (0.68, 0.22), (0.68, 0.82), (0.32, 0.82)]
    sleeves = [[(0.32, 0.22), (0.18, 0.52), (0.26, 0.56), (0.34, 0.36)],
               [(0.68, 0.22), (0.82, 0.52), (0.74, 0.56), (0.66, 0.36)]]
    if subcategory == "SHIRTS":
        return [torso, *sleeves]
    if subcategory == "JACKETS":
        long_sleeves = [[(0.32, 0.22), (0.14, 0.74), (0.23, 0.77), (0.34, 0.38)],
                        [(0.68, 0.22), (0.86, 0.74), (0.77, 0.77), (0.66, 0.38)]]
        return [[(0.3, 0.2), (0.7, 0.2), (0.71, 0.86), (0.29, 0.86)], *long_sleeves]
    if subcategory == "TOPS":
        return [[(0.36, 0.22), (0.64, 0.22), (0.67, 0.72), (0.33, 0.72)]]
    if subcategory == "DRESSES":
        return [[(0.38, 0.18), (0.62, 0.18), (0.64, 0.42), (0.78, 0.9), (0.22, 0.9), (0.36, 0.42)]]
    if subcategory == "SKIRTS":
        return [[(0.34, 0.36), (0.66, 0.36), (0.78, 0.84), (0.22, 0.84)]]
    return [[(0.32, 0.18), (0.68, 0.18), (0.7, 0.9), (0.54, 0.9), (0.5, 0.42), (0.46, 0.9), (0.3, 0.9)]]  # PANTS


def _texture(kind: str, size: int, colour: Tuple[int, int, int]) -> np.ndarray:
    """The garment fill: base colour modulated by a fabric pattern coarse enough to survive 2x downsampling."""
    y, x = np.mgrid[0:size, 0:size]
    if kind == "plain":
        mask = np.zeros((size, size), bool)
    elif kind == "check":
        mask = ((x // 16) + (y // 16)) % 2 == 0
    elif kind == "hstripe":
        mask = (y // 8) % 2 == 0
    elif kind == "vstripe":
        mask = (x // 8) % 2 == 0
    elif kind == "diagonal":
        mask = ((x + y) // 10) % 2 == 0
    else:  # dots
        mask = ((x % 16 - 8) ** 2 + (y % 16 - 8) ** 2) < 12
    base = np.array(colour, dtype=np.float32)
    shade = np.where(base > 128, base - 60, base + 60)
    return np.where(mask[..., None], shade, base).astype(np.uint8)


def _mark_box(place: str, subcategory: str) -> Tuple[float, float]:
    """Unit-coordinate centre of the brand mark."""
    low = {"SKIRTS": 0.74, "DRESSES": 0.8, "PANTS": 0.8, "TOPS": 0.64, "JACKETS": 0.76}.get(subcategory, 0.72)
    return {"left chest": (0.42, 0.34 if subcategory != "SKIRTS" else 0.46),
            "right chest": (0.58, 0.34 if subcategory != "SKIRTS" else 0.46), "hem": (0.5, low)}[place]


@dataclass(frozen=True)
class Layout:
    """Where a view puts things, in pixels: the garment placement, the brand mark and the season tag."""

    shift: Tuple[float, float]
    scale: float
    tone: Tuple[int, int, int]
    size: int
    mark_box: Tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    tag_box: Tuple[float, float, float, float]

    def to_px(self, u: float, v: float) -> Tuple[float, float]:
        return ((0.5 + (u - 0.5) * self.scale + self.shift[0]) * self.size,
                (0.5 + (v - 0.5) * self.scale + self.shift[1]) * self.size)


MARK_CELL = 0.047  # of the image side; 3 cells: ~14% of the side, about one patch at ViT resolution


def layout(product: Product, view: int, seed: int = 0, size: int = IMAGE_SIZE, mark_cell: float = MARK_CELL) -> Layout:
    """The geometry of one view (views differ by a small shift and scale, and the background tone); the brand
    mark's cells are ``mark_cell`` of the image side."""
    rng = random.Random(f"view:{seed}:{product.product_id}:{view}")
    shift = (rng.uniform(-0.05, 0.05), rng.uniform(-0.04, 0.04))
    scale = rng.uniform(0.92, 1.04)
    tone = rng.randint(200, 250)
    tone = (tone, tone - rng.randint(0, 12), tone - rng.randint(0, 20))
    partial = Layout(shift, scale, tone, size, (0, 0, 0, 0), (0, 0, 0, 0))
    cell = max(1, round(size * mark_cell))
    cx, cy = partial.to_px(*_mark_box(product.mark_place, product.subcategory))
    x0, y0 = round(cx - 1.5 * cell), round(cy - 1.5 * cell)
    tx, ty = partial.to_px(0.5, 0.2 if product.subcategory != "SKIRTS" else 0.37)
    tag = (tx - 0.035 * size, ty, tx + 0.035 * size, ty + 0.05 * size)
    return Layout(shift, scale, tone, size, (x0, y0, x0 + 3 * cell, y0 + 3 * cell), tag)


def garment_mask(product: Product, geometry: Layout) -> Image.Image:
    """The garment's pixels in one view (mode "L", 255 on the garment): everything else is background."""
    mask = Image.new("L", (geometry.size, geometry.size), 0)
    draw = ImageDraw.Draw(mask)
    for polygon in _silhouette(product.subcategory):
        draw.polygon([geometry.to_px(u, v) for u, v in polygon], fill=255)
    return mask


def render(product: Product, view: int, seed: int = 0, size: int = IMAGE_SIZE,
           mark_cell: float = MARK_CELL, mark_ink: str = "brand") -> Image.Image:
    """One view: background, garment, texture, brand mark, season tag."""
    geometry = layout(product, view, seed, size, mark_cell)
    canvas = Image.new("RGB", (size, size), geometry.tone)
    fabric = Image.fromarray(_texture(COMPOSITIONS[product.composition][0], size, COLOURS[product.colour]))
    canvas.paste(fabric, (0, 0), garment_mask(product, geometry))

    cells, fg, bg = brand_glyph(product.brand, seed, mark_ink)
    x0, y0, x1, _ = geometry.mark_box
    cell = (x1 - x0) // 3
    draw = ImageDraw.Draw(canvas)
    for r, c in itertools.product(range(3), range(3)):
        draw.rectangle([x0 + c * cell, y0 + r * cell, x0 + (c + 1) * cell - 1, y0 + (r + 1) * cell - 1],
                       fill=fg if cells[r, c] else bg)
    draw.rectangle(geometry.tag_box, fill=SEASONS[product.season])
    return canvas


# --- writing --------------------------------------------------------------------------------------

SIZES = {"tiny": {"train": 96, "validation": 48}, "small": {"train": 4000, "validation": 1000}}


def write_fashiongen(out_dir: Union[str, os.PathLike], splits: Union[str, Dict[str, int]] = "tiny", seed: int = 0,
                     views: Tuple[int, int] = (1, 3), offset: int = 0, num_brands: int = 32,
                     mark_cell: float = MARK_CELL, mark_ink: str = "brand", progress: bool = False) -> Dict[str, Path]:
    """Write ``fashiongen_256_256_<split>.h5`` files of disjoint products, one per split.

    Args:
        splits: "tiny" / "small", or ``{split: number of products}``.
        views: min and max views per product.
        offset: skip this many products of the catalog first (e.g. to make a disjoint pre-training set).
        mark_cell: the brand mark's cell side, a share of the image side (3 x 3 cells; smaller: a harder detail).
        mark_ink: "brand" (each brand's mark in its own two colours) or "one" (the same black on white for every
            brand: only the mark's pattern tells brands apart).
        progress: show a progress bar per split.

    Example:
        >>> write_fashiongen("data/synthetic", "tiny")  # doctest: +SKIP
    """
    sizes = SIZES[splits] if isinstance(splits, str) else dict(splits)
    products = catalog(seed, num_brands)
    names = brand_names(num_brands, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)  # what a killed generation left
    written, start = {}, offset
    for split, count in sizes.items():
        chosen = products[start:start + count]
        start += count
        rows = [(p, v) for p in chosen for v in range(random.Random(f"views:{seed}:{p.product_id}").randint(*views))]
        target = fashiongen_file(out_dir, split) if split in ("train", "validation") else \
            out_dir / f"fashiongen_256_256_{split}.h5"
        needed = len(rows) * BYTES_PER_IMAGE
        if shutil.disk_usage(out_dir).free < needed:  # HDF5 may crash the process when the disk fills up
            raise OSError(errno.ENOSPC, f"no space left on the device for {len(rows)} synthetic images (about "
                          f"{needed / 1e6:.0f} MB); free space and run the same command again", str(target))
        # a name of its own (two first uses at once each write theirs, the same bytes) and gone if writing fails
        look = dict(mark_cell=mark_cell, mark_ink=mark_ink)
        _atomic_write(target, lambda tmp: _write_split(tmp, rows, seed, names, split, look, progress), needed)
        written[split] = target
    text = json.dumps({"seed": seed, "splits": sizes, "views": list(views), "offset": offset,
                       "num_brands": num_brands, "mark_cell": mark_cell, "mark_ink": mark_ink}, indent=2)
    _atomic_write(out_dir / "synthetic.json", lambda tmp: Path(tmp).write_text(text))
    return written


def _write_split(path: str, rows, seed: int, names, split: str, look: dict, progress: bool) -> None:
    """One split's products in FashionGen's h5 layout, at ``path``."""
    import h5py

    with h5py.File(path, "w") as f:
        images = f.create_dataset(IMAGE_FIELD, (len(rows), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8,
                                  chunks=(1, IMAGE_SIZE, IMAGE_SIZE, 3), compression="gzip", compression_opts=1)
        for i, (product, view) in enumerate(tqdm(rows, desc=f"synthetic {split}", unit="image",
                                                 disable=not progress, dynamic_ncols=True)):
            images[i] = np.asarray(render(product, view, seed, **look))
        f.create_dataset(PRODUCT_FIELD, data=np.array([[p.product_id] for p, _ in rows], dtype=np.int64))
        tags = [tags_of(p, names) for p, _ in rows]
        for tag, field in FIELDS.items():
            f.create_dataset(field, data=np.array([[t[tag].encode("latin-1")] for t in tags]))
        f.create_dataset("input_pose", data=np.array([[f"id_gridfs_{v + 1}".encode()] for _, v in rows]))


# --- FashionIQ layout and caption references ---------------------------------------------------

FASHIONIQ_CATEGORIES = {"dress": "DRESSES", "shirt": "SHIRTS", "toptee": "TOPS"}


def _modify(product: Product, attribute: str, rng: random.Random, names: Sequence[str]) -> Tuple[Product, str]:
    """The product with one attribute changed, and a relative caption saying how."""
    fields = product.__dict__.copy()
    if attribute == "colour":
        fields["colour"] = rng.choice([c for c in COLOURS if c != product.colour])
        caption = rng.choice(["is {new} instead of {old}", "is {new}", "has a {new} colour"]).format(
            new=fields["colour"], old=product.colour)
    elif attribute == "composition":
        fields["composition"] = rng.choice([c for c in COMPOSITIONS if c != product.composition])
        caption = "is made of " + COMPOSITIONS[fields["composition"]][1]
    elif attribute == "brand":
        fields["brand"] = rng.choice([b for b in range(len(names)) if b != product.brand])
        caption = f"has the {names[fields['brand']]} logo"
    else:  # mark place
        fields["mark_place"] = rng.choice([m for m in MARK_PLACES if m != product.mark_place])
        caption = f"has its logo on the {fields['mark_place']}"
    return Product(**fields), caption


def write_fashioniq(out_dir: Union[str, os.PathLike], triplets_per_category: int = 20, seed: int = 0,
                    splits: Sequence[str] = ("train", "val"), distractors: int = 2, num_brands: int = 32) -> Dict[str, int]:
    """Write FashionIQ-layout composed-retrieval data: ``captions/cap.{cat}.{split}.json``,
    ``image_splits/split.{cat}.{split}.json``, ``images/<name>.png``, and ``caption_references.json``
    (image name -> reference captions) for captioning.

    Each triplet's target differs from its reference in one or two attributes (colour, fabric, brand,
    logo position); its two relative captions each describe one change (or the same change twice,
    reworded). The gallery of a category and split holds its references and targets, plus
    ``distractors`` products per triplet that share the target's attributes but one (its season or its
    mark's position) — what the reference image, not the text, tells apart. Splits take disjoint
    references. Returns the number of triplets per ``split/category``.
    """
    out_dir = Path(out_dir)
    for folder in ("captions", "image_splits", "images"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    names = brand_names(num_brands, seed)
    products = catalog(seed, num_brands)
    by_key = {_key(p): p for p in products}
    rng = random.Random(f"fashioniq:{seed}")
    references: Dict[str, List[str]] = {}
    counts = {}
    for category, subcategory in FASHIONIQ_CATEGORIES.items():
        # references from the end of the catalog, far from the products write_fashiongen takes
        pool = [p for p in reversed(products) if p.subcategory == subcategory]
        for s, split in enumerate(splits):
            gallery: Dict[str, Product] = {}
            triplets = []
            for reference in pool[s * triplets_per_category:(s + 1) * triplets_per_category]:
                target, captions = reference, []
                for attribute in rng.sample(["colour", "composition", "brand", "mark_place"], rng.choice([1, 2])):
                    target, caption = _modify(target, attribute, rng, names)
                    captions.append(caption)
                if len(captions) == 1:  # FashionIQ has two captions per triplet: reword the one change
                    captions.append("it " + captions[0])
                target = by_key[_key(target)]  # the catalog's product with those attributes
                for product in (reference, target, *_distractors(target, distractors, rng, by_key)):
                    gallery[f"syn{product.product_id}"] = product
                triplets.append({"candidate": f"syn{reference.product_id}", "target": f"syn{target.product_id}",
                                 "captions": captions})
            for name, product in gallery.items():
                if not (out_dir / "images" / f"{name}.png").is_file():
                    render(product, 0, seed).save(out_dir / "images" / f"{name}.png")
                tags = tags_of(product, names)
                references[name] = [tags["description"],
                                    f"A {product.colour} {SINGULAR[product.subcategory]} by {tags['brand']}.",
                                    f"{tags['brand']} {SINGULAR[product.subcategory]} made of {product.composition}."]
            (out_dir / "captions" / f"cap.{category}.{split}.json").write_text(json.dumps(triplets, indent=1))
            (out_dir / "image_splits" / f"split.{category}.{split}.json").write_text(
                json.dumps(sorted(gallery), indent=1))
            counts[f"{split}/{category}"] = len(triplets)
    (out_dir / "caption_references.json").write_text(json.dumps(references, indent=1))
    return counts


def _key(p: Product) -> Tuple:
    return p.subcategory, p.colour, p.brand, p.composition, p.season, p.mark_place


def _distractors(target: Product, count: int, rng: random.Random, by_key) -> List[Product]:
    """Products equal to ``target`` but for the season or the mark's position."""
    options = [Product(**{**target.__dict__, "season": season}) for season in SEASONS if season != target.season]
    options += [Product(**{**target.__dict__, "mark_place": place}) for place in MARK_PLACES
                if place != target.mark_place]
    return [by_key[_key(p)] for p in rng.sample(options, min(count, len(options)))]
