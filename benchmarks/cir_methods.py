"""Every composed-retrieval method x {CLIP-FT, E2} on synthetic FashionIQ-layout data, over seeds.

The demo encoders (``demo:clip-ft``, ``demo:e2``: the same pre-trained CLIP fine-tuned for the same steps)
are compared under each method's own prompt convention, with each method's default settings; each
method's network is trained on the synthetic training split, once per encoder and seed. A seed draws
other triplets (``write_fashioniq(seed=...)``) and seeds the methods' training. Prints FashionIQ's mean
R@10 / R@50 over dress, shirt and toptee (mean ± standard error over seeds) as a markdown table, and
E2 - CLIP-FT per method with its value on each seed (target: E2 >= CLIP-FT on mean R@10 for every method).

    python benchmarks/cir_methods.py --triplets 100 --seeds 0 1 2 --out runs/bench-cir
    python benchmarks/cir_methods.py --option searle.oti_steps=30    # a method setting, as ``run cir --option``
    python benchmarks/cir_methods.py --data other    # benchmarks/other_products.py's items, its runs' encoders

``--train-captions descriptions`` trains the caption-trained methods (LinCIR; SEARLE's regulariser) on the product
descriptions of the encoders' own training items, which describe images as LinCIR's CC3M captions do, instead of the
FashionIQ training split's relative captions (the default, which describe changes); a caption file is taken too.

``--data other`` writes the triplets with ``other_products.write_fashioniq`` (another generator and vocabulary; every
image of an item none of its encoders trained on) and reads them as real FashionIQ (``--dataset fashioniq``); its
encoders default to that benchmark's CLIP-FT and E2 of each seed (``--encoder``/``--baseline`` take ``{seed}``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
from pathlib import Path

import other_products
from e2_data.synthetic import write_fashioniq
from e2_cir import cir
from e2_cir.methods import METHODS
from e2_core.registry import get_dataset
from e2_data import default_synthetic_root


def mean_se(values):
    return statistics.mean(values), (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def write_descriptions(path: Path, dataset: str, root) -> Path:
    """The training split's product descriptions (the text where a product has none), one per line, written once."""
    if not path.is_file():
        reader = get_dataset(dataset)
        if reader.prepare is not None:  # the package's products, generated on first use
            reader.prepare(str(root))
        products = reader.open(str(root), "train")
        tags = [products.product(i).tags for i in range(len(products))]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(" ".join((t.get("description") or t["text"]).split()) + "\n" for t in tags),
                        encoding="utf-8")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--triplets", type=int, default=100, help="triplets per category and split")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data", default="synthetic", choices=["synthetic", "other"],
                        help="whose products: the package's generator, or benchmarks/other_products.py's (read as "
                             "FashionIQ: --dataset fashioniq)")
    parser.add_argument("--encoder", default=None, help="'{seed}' in it is replaced by each seed (default: demo:e2; "
                        "--data other: other_products.py's E2 of that seed)")
    parser.add_argument("--baseline", default=None, help="'{seed}' in it is replaced by each seed (default: "
                        "demo:clip-ft; --data other: other_products.py's CLIP-FT of that seed)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--option", nargs="*", default=[], help="METHOD.NAME=VALUE settings (as run cir --option)")
    parser.add_argument("--train-captions", default=None,
                        help="the caption-trained methods' captions: 'descriptions' (the encoders' training products' "
                             "descriptions) or a caption file; default: the training split's relative captions")
    parser.add_argument("--products-root", default=None,
                        help="--data other: the catalog folder its encoders trained on, for --train-captions "
                             "descriptions (default: other_products.py's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="runs/bench-cir")
    args = parser.parse_args()

    out = Path(args.out)
    runs, synthetic = [], args.data == "synthetic"
    tag = "" if synthetic else "other-"
    captions = args.train_captions
    if captions == "descriptions":  # one file per products folder, so that another folder is never read stale
        dataset, root = (("synthetic", default_synthetic_root()) if synthetic
                         else ("catalog", Path(args.products_root or other_products.catalog_root())))
        key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]
        captions = write_descriptions(out / f"{tag}descriptions-{key}.txt", dataset, root)
    for seed in args.seeds:
        if synthetic:
            encoders = dict(encoder=(args.encoder or "demo:e2").format(seed=seed),
                            baseline=(args.baseline or "demo:clip-ft").format(seed=seed))
        else:  # the second generator's benchmark's own runs, which read its vocabulary
            encoders = dict(encoder=other_products.trained_encoder("e2", seed, args.encoder),
                            baseline=other_products.trained_encoder("clip-ft", seed, args.baseline))
        data = out / f"{tag}fashioniq-{args.triplets}-seed{seed}"
        if not (data / "captions" / "cap.toptee.val.json").is_file():
            print(f"writing {args.triplets} {args.data} triplets per category and split to {data} ...", flush=True)
            (write_fashioniq if synthetic else other_products.write_fashioniq)(data, args.triplets, seed=seed)
        trained = [m for m in args.methods if METHODS[m].trains]
        given = {o.split("=")[0] for o in args.option}
        seeds = [f"{m}.seed={seed}" for m in trained if f"{m}.seed" not in given]
        run = out / f"{tag}run-seed{seed}{'-captions' if captions else ''}"
        cir(dataset="synthetic-fashioniq" if synthetic else "fashioniq", data_root=str(data), method=args.methods,
            option=args.option + seeds, train_captions=captions, out=run, networks=out / "networks",
            device=args.device, figure_queries=0, **encoders)
        runs.append(json.loads((run / "results.json").read_text()))
    # an encoder by its role and its kind's name ("CLIP-FT", "E2"): its label also names its checkpoint, per seed
    labels = {role: next(label.split(" (")[0] for label, e in runs[0]["encoders"].items() if e["role"] == role)
              for role in ("baseline", "encoder")}
    base, e2 = labels["baseline"], labels["encoder"]

    def score(name, role, key):
        return [next(e for e in r["encoders"].values() if e["role"] == role)["methods"][name][key] for r in runs]

    print(f"\n{args.triplets} triplets per category, seeds {args.seeds}; mean over dress, shirt, toptee "
          f"(mean ± standard error over seeds){'; settings ' + ' '.join(args.option) if args.option else ''}"
          f"{f'; caption-trained methods on {captions}' if captions else ''}")
    print(f"| method | convention | {base} R@10 | {e2} R@10 | {base} R@50 | {e2} R@50 | E2 - {base}, R@10 | per seed |")
    print("|---|---|---|---|---|---|---|---|")
    met = []
    for name in args.methods:
        cells = [mean_se(score(name, role, key)) for key in ("mean R@10", "mean R@50")
                 for role in ("baseline", "encoder")]
        gaps = [e - b for e, b in zip(score(name, "encoder", "mean R@10"), score(name, "baseline", "mean R@10"))]
        gap = mean_se(gaps)
        met.append(gap[0] >= 0)
        print(f"| {name} | {runs[0]['conventions'][name]} | "
              + " | ".join(f"{m:.1f} ± {s:.1f}" for m, s in cells)
              + f" | {gap[0]:+.1f} ± {gap[1]:.1f} | {', '.join(f'{g:+.1f}' for g in gaps)} |")
    print(f"\ntarget E2 >= {base} on mean R@10 for every method: {'met' if all(met) else 'NOT met'} "
          f"({sum(met)} of {len(met)} methods)")


if __name__ == "__main__":
    main()
