"""E2 vs CLIP-FT on products from a second generator, one the method was never tuned on.

The generator here shares nothing with the package's own (``e2_data.synthetic``) but the idea that a
product's identity hinges on small details. It draws otherwise on purpose: portrait photos (176 x 224, so
the encoders see a centre crop) on a graded backdrop with a floor shadow; garments from rounded shapes,
ellipses and trapezoids; the brand as a small bar-code mark (three bars whose widths and two colours name
the brand, about 0.8 ViT patch at 128 px) at one of three places on the garment's body; the season as a
two-stripe woven label at the garment's right edge; fabrics as other weaves; and another vocabulary (brands
with ``&``, ``/``, commas, digits and accents; colours with commas and slashes). It writes a catalog folder
(``train.jsonl``, ``validation.jsonl``, PNG images) that ``--dataset catalog`` reads.

From a CLIP pre-trained from scratch with the demo recipe on 8,000 other items of this generator (as the
synthetic benchmark's start is on its own generator's), per seed, CLIP-FT, the control (``clip-ft-entities``:
E2's entity losses on CLIP's own image embedding) and E2 are fine-tuned on its 4,000 training items with the
demo recipe's defaults, untouched, and scored on its 1,000 validation items: full-protocol T2I / I2T R@1,
sample-100 SumR, and a detail probe (is an item's own photo ranked above the same item with one attribute
changed? chance 50%).

    python benchmarks/other_products.py --seeds 0 1 2                      # the demo recipe's 1,800 steps
    python benchmarks/other_products.py --seeds 0 --finetune-steps 300 --workers 0
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
from dataclasses import astuple, dataclass, replace
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw

import e2_core
from e2_core.data import open_dataset
from e2_train.demo import DEMO, cache_root, finetune, pretrain_clip
from e2_vs_clipft import CONTROL, leads, probe_table, probe_wins, retrieval_r1, retrieval_table, \
    step_seconds

SIZE = (176, 224)  # width, height
GARMENTS = ("hoodie", "trench coat", "jumpsuit", "wide-leg trousers", "A-line skirt", "puffer vest")
COLOURS = {"sage": (150, 170, 140), "rust, washed": (170, 80, 50), "ink/indigo": (40, 45, 90),
           "café crème": (200, 170, 130), "oat": (225, 215, 190), "cherry": (150, 20, 40)}
# composition -> weave
FABRICS = {"organic cotton": "plain", "72% wool, 28% nylon": "melange", "wool/cashmere blend": "herringbone",
           "cotton-linen (55/45)": "grid", "recycled nylon": "wave"}
SEASONS = {"AW25": ((20, 20, 20), (230, 120, 0)), "SS 2026": ((250, 240, 90), (40, 150, 210)),
           "Resort/Cruise '24": ((255, 255, 255), (0, 130, 90)), "Pre-Fall 25": ((150, 0, 90), (250, 250, 250))}
PLACES = ("top left", "bottom right", "centre front")
MARK_COLOURS = ((245, 245, 245), (15, 15, 15), (220, 40, 40), (40, 80, 220), (240, 190, 20), (20, 150, 90))
NUM_BRANDS = 24
_STEMS = ("Kestrel", "Dürer", "Ólafs", "Mirò", "Søren", "Bexley", "Halden", "Noé", "Varga", "Åkes", "Lenz",
          "Corvo")


@dataclass(frozen=True)
class Item:
    number: int
    garment: str
    colour: str
    brand: int
    fabric: str
    season: str
    place: str


def brands(count: int = NUM_BRANDS) -> List[str]:
    """Brand names in four styles: "A & B", "A/B", "Maison A 1961", "A, B & Fils"."""
    rng = random.Random("other-brands")
    names: List[str] = []
    while len(names) < count:
        a, b = rng.sample(_STEMS, 2)
        name = rng.choice([f"{a} & {b}", f"{a}/{b}", f"Maison {a} {rng.randint(1900, 1999)}", f"{a}, {b} & Fils"])
        if name not in names:
            names.append(name)
    return names


def items() -> List[Item]:
    """Every attribute combination once, in a fixed shuffled order."""
    combos = list(itertools.product(GARMENTS, COLOURS, range(NUM_BRANDS), FABRICS, SEASONS, PLACES))
    random.Random("other-catalog").shuffle(combos)
    return [Item(i, *combo) for i, combo in enumerate(combos)]


def texts(item: Item, names: List[str]) -> Dict[str, str]:
    """The catalog row's text columns: the global text and the entities."""
    description = f"{item.colour.capitalize()} {item.garment} in {item.fabric}, bar-code mark at the {item.place}."
    return {"text": f"{description[:-1]}; {names[item.brand]}, {item.season} collection.",
            "description": description, "brand": names[item.brand], "subcategory": item.garment.upper(),
            "season": item.season, "composition": item.fabric}


# --- drawing --------------------------------------------------------------------------------------

def _body(item: Item, jitter: Tuple[float, float, float]) -> Tuple[List[Tuple[str, tuple]], tuple]:
    """The garment's shapes (kind, pixel box or points) and its body box, where the mark and label go."""
    dx, dy, s = jitter
    cx, top = 88 + dx, 46 + dy

    def box(x0, y0, x1, y1):
        return (cx + x0 * s, top + y0 * s, cx + x1 * s, top + y1 * s)

    def poly(*points):
        return [(cx + x * s, top + y * s) for x, y in points]

    g = item.garment
    if g == "hoodie":
        body = box(-34, 14, 34, 112)
        shapes = [("ellipse", box(-20, -6, 20, 30)), ("rounded", body), ("rounded", box(-54, 16, -30, 100)),
                  ("rounded", box(30, 16, 54, 100))]
    elif g == "trench coat":
        body = box(-32, 6, 32, 120)
        shapes = [("polygon", poly((-30, 0), (30, 0), (44, 136), (-44, 136))), ("polygon", poly(
            (-30, 2), (-56, 96), (-44, 100), (-24, 30))), ("polygon", poly((30, 2), (56, 96), (44, 100), (24, 30)))]
    elif g == "jumpsuit":
        body = box(-30, 4, 30, 70)
        shapes = [("rounded", box(-32, 0, 32, 74)), ("rectangle", box(-32, 64, -4, 136)),
                  ("rectangle", box(4, 64, 32, 136))]
    elif g == "wide-leg trousers":
        body = box(-32, 10, 32, 60)
        shapes = [("polygon", poly((-34, 4), (34, 4), (46, 136), (6, 136), (0, 56), (-6, 136), (-46, 136)))]
    elif g == "A-line skirt":
        body = box(-34, 26, 34, 100)
        shapes = [("polygon", poly((-30, 20), (30, 20), (58, 116), (-58, 116)))]
    else:  # puffer vest
        body = box(-36, 8, 36, 104)
        shapes = [("rounded", box(-40, 0, 40, 110))]
    return shapes, body


def _weave(kind: str, colour: Tuple[int, int, int], rng: random.Random) -> np.ndarray:
    """The garment's fill over the whole canvas: its colour and a weave coarse enough to survive the resize."""
    y, x = np.mgrid[0:SIZE[1], 0:SIZE[0]]
    if kind == "plain":
        mask = np.zeros(x.shape, bool)
    elif kind == "melange":
        cells = np.random.default_rng(rng.randrange(2 ** 31)).random((SIZE[1] // 4 + 1, SIZE[0] // 4 + 1)) < 0.35
        mask = cells[y // 4, x // 4]
    elif kind == "herringbone":
        mask = ((y + np.abs(x % 16 - 8)) // 5) % 2 == 0
    elif kind == "grid":
        mask = (x % 12 < 3) | (y % 12 < 3)
    else:  # wave
        mask = ((y + 4 * np.sin(x / 5.0)) // 7).astype(int) % 2 == 0
    base = np.array(colour, np.float32)
    other = np.clip(base * 0.6 if base.mean() > 110 else base + 70, 0, 255)
    return np.where(mask[..., None], other, base).astype(np.uint8)


def _mark_origin(item: Item, body: tuple, side: int) -> Tuple[int, int]:
    x0, y0, x1, y1 = body
    u, v = {"top left": (0.2, 0.16), "bottom right": (0.8, 0.84), "centre front": (0.5, 0.5)}[item.place]
    return round(x0 + u * (x1 - x0) - side / 2), round(y0 + v * (y1 - y0) - side / 2)


def draw(item: Item, view: int = 0) -> Image.Image:
    """One photo of the item: backdrop, shadow, garment in its weave, bar-code mark, season label."""
    rng = random.Random(f"other-view:{item.number}:{view}")
    jitter = (rng.uniform(-6, 6), rng.uniform(-4, 4), rng.uniform(0.95, 1.05))
    top, bottom = rng.randint(170, 215), rng.randint(120, 160)
    ramp = np.linspace(top, bottom, SIZE[1])[:, None, None] * np.array([1.0, 0.97, 1.04])
    canvas = Image.fromarray(np.clip(np.broadcast_to(ramp, (SIZE[1], SIZE[0], 3)), 0, 255).astype(np.uint8))
    pen = ImageDraw.Draw(canvas)
    pen.ellipse((40 + jitter[0], 188, 136 + jitter[0], 204), fill=(bottom - 40,) * 3)  # the floor shadow
    shapes, body = _body(item, jitter)
    mask = Image.new("L", SIZE, 0)
    cut = ImageDraw.Draw(mask)
    for kind, where in shapes:
        {"ellipse": cut.ellipse, "rectangle": cut.rectangle, "polygon": cut.polygon,
         "rounded": lambda b, fill: cut.rounded_rectangle(b, radius=10, fill=fill)}[kind](where, fill=255)
    canvas.paste(Image.fromarray(_weave(FABRICS[item.fabric], COLOURS[item.colour], rng)), (0, 0), mask)
    # the brand: three vertical bars (widths from the brand) in one colour on a plate of another
    side = 18
    x, y = _mark_origin(item, body, side)
    pairs = [(a, b) for a in MARK_COLOURS for b in MARK_COLOURS if a != b]
    ink, plate = pairs[item.brand % len(pairs)]
    widths = [2 + (item.brand >> k) % 2 * 2 for k in range(3)]  # 2 or 4 px each
    pen.rectangle((x, y, x + side - 1, y + side - 1), fill=plate)
    left = x + 2
    for w in widths:
        pen.rectangle((left, y + 3, left + w - 1, y + side - 4), fill=ink)
        left += w + 2
    # the season: a two-stripe label at the body's right edge, half-way down
    a, b = SEASONS[item.season]
    lx, ly = round(body[2]) - 7, round((body[1] + body[3]) / 2) - 7
    pen.rectangle((lx, ly, lx + 13, ly + 6), fill=a)
    pen.rectangle((lx, ly + 7, lx + 13, ly + 13), fill=b)
    return canvas


# --- writing --------------------------------------------------------------------------------------

def write(root: Path, splits: Dict[str, int], offset: int = 0) -> Path:
    """A catalog folder of disjoint splits (``{split: items}``, one photo each), taken from the fixed order
    after its first ``offset`` items; written once."""
    root = Path(root)
    if all((root / f"{split}.jsonl").is_file() for split in splits):
        return root
    (root / "images").mkdir(parents=True, exist_ok=True)
    names, everything = brands(), items()
    start = offset
    for split, count in splits.items():
        rows = []
        for item in everything[start:start + count]:
            name = f"images/{item.number:05d}.png"
            draw(item).save(root / name)
            rows.append(json.dumps({"id": str(item.number), "image": name, **texts(item, names)}, ensure_ascii=False))
        start += count
        tmp = root / f"{split}.jsonl.tmp"
        tmp.write_text("\n".join(rows) + "\n", encoding="utf-8")
        tmp.replace(root / f"{split}.jsonl")
    return root


# FashionIQ's three categories, each one of this generator's garments
FASHIONIQ_GARMENTS = {"dress": "jumpsuit", "shirt": "hoodie", "toptee": "puffer vest"}
_CHANGES = {  # attribute -> two ways to say the target's value, as FashionIQ's two annotators might
    "colour": ("make it {}", "is {} instead"),
    "fabric": ("woven in {}", "same cut but {}"),
    "brand": ("by {}", "carries the {} mark"),
    "place": ("with the mark at the {}", "mark moved to the {}"),
}


def write_fashioniq(root: Path, triplets: int = 100, seed: int = 0, distractors: int = 2,
                    splits=("train", "val")) -> Dict[str, int]:
    """A FashionIQ folder (``captions/cap.{cat}.{split}.json``, ``image_splits/split.{cat}.{split}.json``,
    ``images/<name>.png``) of this generator's items: ``triplets`` per category and split. A target differs from
    its reference in one or two of colour, fabric, brand and mark place, each change said in one relative
    caption (one change: said twice, worded two ways); the gallery adds ``distractors`` per triplet equal to the
    target but for its season or mark place, which only the reference photo tells apart. Every image is of an item
    past the first third of the fixed order (the benchmark's training and pre-training items are in it);
    references are from the last third, disjoint between splits. ``seed`` draws other triplets. Returns the
    number of triplets per ``split/category``."""
    if not 0 <= distractors <= len(SEASONS) - 1 + len(PLACES) - 1:
        raise ValueError(f"distractors: at most {len(SEASONS) + len(PLACES) - 2} per triplet (a target has that many "
                         f"season and mark-place twins), got {distractors}")
    root = Path(root)
    for folder in ("captions", "image_splits", "images"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    names, everything = brands(), items()
    by_key = {astuple(i)[1:]: i for i in everything}  # attributes -> the item (and its number)
    values = {"colour": tuple(COLOURS), "fabric": tuple(FABRICS), "brand": range(NUM_BRANDS), "place": PLACES}
    rng = random.Random(f"other-fashioniq:{seed}")
    held_out = len(everything) // 3  # the benchmark's training and pre-training items come before
    counts = {}
    for category, garment in FASHIONIQ_GARMENTS.items():
        pool = rng.sample([i for i in everything[2 * held_out:] if i.garment == garment], triplets * len(splits))
        for s, split in enumerate(splits):
            gallery, rows = {}, []
            for reference in pool[s * triplets:(s + 1) * triplets]:
                while True:  # until the target and distractors are all held out too
                    target, changes = reference, []
                    for attribute in rng.sample(list(_CHANGES), rng.choice([1, 2])):
                        value = rng.choice([v for v in values[attribute] if v != getattr(target, attribute)])
                        target = replace(target, **{attribute: value})
                        changes.append((attribute, names[value] if attribute == "brand" else value))
                    target = by_key[astuple(target)[1:]]
                    options = [replace(target, season=v) for v in SEASONS if v != target.season]
                    options += [replace(target, place=v) for v in PLACES if v != target.place]
                    options = [by_key[astuple(o)[1:]] for o in options]
                    options = [o for o in options if o.number >= held_out]
                    if target.number >= held_out and len(options) >= distractors:
                        break
                others = rng.sample(options, distractors)
                way = rng.randrange(2)
                captions = [_CHANGES[attribute][way].format(value) for attribute, value in changes]
                if len(changes) == 1:
                    captions.append(_CHANGES[changes[0][0]][1 - way].format(changes[0][1]))
                for item in (reference, target, *others):
                    gallery[f"op{item.number:05d}"] = item
                rows.append({"candidate": f"op{reference.number:05d}", "target": f"op{target.number:05d}",
                             "captions": captions})
            for name, item in gallery.items():
                if not (root / "images" / f"{name}.png").is_file():
                    draw(item).save(root / "images" / f"{name}.png")
            (root / "captions" / f"cap.{category}.{split}.json").write_text(
                json.dumps(rows, indent=1, ensure_ascii=False), encoding="utf-8")
            (root / "image_splits" / f"split.{category}.{split}.json").write_text(json.dumps(sorted(gallery)))
            counts[f"{split}/{category}"] = len(rows)
    return counts


def default_out() -> Path:
    return cache_root() / "other-products"


def catalog_root(out: Path = None, train: int = 4000, validation: int = 1000) -> Path:
    """Where ``main`` writes the catalog of ``train`` + ``validation`` items the encoders are fine-tuned on."""
    return Path(out or default_out()) / f"data-{train}-{validation}"


def runs_folder(out: Path, data_name: str, steps: int) -> Path:
    """Where ``main`` keeps the fine-tuning runs (``KIND/seedN``) on the data folder ``data_name``."""
    return Path(out) / f"{data_name}-{steps}steps"


def best_checkpoint(kind: str, seed, steps: int = DEMO.finetune_steps, out: Path = None) -> Path:
    """Where ``main`` (its default sizes) leaves the best checkpoint of ``kind`` fine-tuned with ``seed``."""
    run = runs_folder(out or default_out(), catalog_root().name, steps) / kind / f"seed{seed}"
    return run / ("stage2" if kind == "e2" else "finetune") / "best"


def trained_encoder(kind: str, seed: int, given: str = None) -> str:
    """``given`` with ``{seed}`` replaced, or else this benchmark's ``kind`` of ``seed`` at the recipe's steps,
    for the downstream benchmarks; exits saying what to run when that run is missing."""
    if given:
        return given.format(seed=seed)
    path = best_checkpoint(kind, seed)
    if not (path / "config.json").is_file():
        raise SystemExit(f"{path}: no such checkpoint: run `python benchmarks/other_products.py --seeds {seed}` "
                         "first, or name the encoders (their '{seed}' replaced by each seed)")
    return str(path)


# --- the benchmark --------------------------------------------------------------------------------

PROBED = {"brand": None, "season": tuple(SEASONS), "composition": tuple(FABRICS), "place": PLACES,
          "colour": tuple(COLOURS)}
_FIELD = {"composition": "fabric"}


def probe(encoder, data, device, count: int = 200) -> dict:
    """Per attribute, the share of items whose text ranks their photo above the same item's photo with only
    that attribute changed (chance 50%)."""
    rng, names, by_number = random.Random("other-probe"), brands(), {i.number: i for i in items()}

    def cases():
        for index in range(min(count, len(data))):
            item = by_number[int(data.product_ids[index])]
            changed = {}
            for attribute, values in PROBED.items():
                field = _FIELD.get(attribute, attribute)
                options = [v for v in (range(NUM_BRANDS) if values is None else values) if v != getattr(item, field)]
                changed[attribute] = draw(replace(item, **{field: rng.choice(options)}))
            yield texts(item, names)["text"], draw(item), changed

    return probe_wins(encoder, device, cases())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="default: E2_PLUGINS_CACHE's other-products")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--finetune-steps", type=int, default=DEMO.finetune_steps)
    parser.add_argument("--train-items", type=int, default=4000)
    parser.add_argument("--validation-items", type=int, default=1000)
    parser.add_argument("--probe-products", type=int, default=200)
    parser.add_argument("--no-control", dest="control", action="store_false", help="skip clip-ft-entities")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    out = Path(args.out) if args.out else default_out()
    device = str(e2_core.runtime.resolve_device(args.device))
    common = dict(device=args.device, workers=args.workers, progress=False)
    sizes = {"train": args.train_items, "validation": args.validation_items}
    data_root = write(catalog_root(out, args.train_items, args.validation_items), sizes)
    # the start: a CLIP pre-trained from scratch, with the demo recipe, on items the fine-tuning data does not hold
    # (as the synthetic benchmark's start is, on its own generator's)
    later = write(out / "pretrain-data", {"train": DEMO.pretrain_products, "validation": 256},
                  offset=sum(sizes.values()))
    start = pretrain_clip(DEMO, out / "pretrain", later, dataset="catalog", **common)
    recipe = replace(DEMO, finetune_steps=args.finetune_steps)
    kinds = ("clip-ft", CONTROL, "e2") if args.control else ("clip-ft", "e2")
    runs: Dict[str, dict] = {}
    for kind in kinds:
        torch.manual_seed(0)  # the step-0 E2's new parts, drawn as the trainer draws them
        initial = e2_core.load_encoder(start) if kind != "e2" else e2_core.Encoder(
            e2_core.create_e2(pretrained=str(start)), arch=DEMO.model)
        val = open_dataset("catalog", str(data_root), "validation", transform=initial.preprocess)
        if kind == "e2" or kind == kinds[0]:  # CLIP-FT and the control start from the same CLIP
            step0 = retrieval_r1(initial, val, device, errors=False)
            probe0 = probe(initial, val, device, args.probe_products)
        for seed in args.seeds:
            folder = runs_folder(out, data_root.name, args.finetune_steps) / kind
            result_file = folder / f"seed{seed}-results.json"
            if result_file.is_file():
                runs[f"{kind}/seed{seed}"] = json.loads(result_file.read_text())
                continue
            best = finetune(kind, replace(recipe, seed=seed), start, folder / f"seed{seed}", data_root,
                            dataset="catalog", **common)
            model = e2_core.load_encoder(best)
            record = {"step0": step0, "final": retrieval_r1(model, val, device, errors=False), "probe_step0": probe0,
                      "probe": probe(model, val, device, args.probe_products),
                      "step_seconds": step_seconds(folder / f"seed{seed}")}
            result_file.write_text(json.dumps(record, indent=2))
            runs[f"{kind}/seed{seed}"] = record
            print(f"{kind} seed {seed}: T2I R@1 {record['final']['t2i_r1']:.1f}, I2T R@1 "
                  f"{record['final']['i2t_r1']:.1f}", flush=True)
    report(runs, kinds, args.seeds, len(val), args.finetune_steps)


def report(runs: dict, kinds, seeds, n_val: int, steps: int) -> None:
    print(f"\nSecond generator: {n_val} validation items, seeds {seeds}, {steps} fine-tuning steps (E2's stage 1 "
          "on top); mean ± standard error")
    retrieval_table(runs, kinds, seeds)
    leads(runs, seeds, "e2", kinds, t2i_target=3)
    print("\nDetail probe: % of items whose text ranks their photo above the same item with one attribute changed "
          "(chance 50%)")
    probe_table(runs, kinds, seeds, PROBED)


if __name__ == "__main__":
    main()
