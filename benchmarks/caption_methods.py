"""DeCap and CapDec x {CLIP-FT, E2}, zero-shot captioning, over seeds and on two datasets.

Each encoder gets its own decoders (the ``demo`` preset, or ``--decoder paper``), trained on the training products'
descriptions (text only) with the same recipe; the validation images are captioned and scored against their
descriptions with the COCO caption metrics (PTB tokenisation where Java runs). Two datasets: the project's synthetic
products, and a catalog written by the tests' second data writer (``tests/other_data.py``: other brands, colours and
garments, names with ``&``, ``/``, commas, digits, accents). A seed seeds the decoders' initialisation and training
order. Prints mean ± standard error over seeds per dataset, and E2 - CLIP-FT on BLEU-4 and CIDEr per method with its
value on each seed (target: E2 >= CLIP-FT on both, for both methods, on both datasets).

Encoders. On the synthetic products: ``--encoder`` and ``--baseline`` (the shipped demo encoders). The shipped demo
encoders have no embedding for the words the synthetic generator never writes (their compact copies keep only its
vocabulary's token rows; the caption task warns), i.e. for most of the second dataset's words, so on it
(``--other-encoders finetuned``, the default) CLIP-FT and E2 are trained for it with the demo recipe
(``e2_train.demo``): from the recipe's small CLIP pre-trained from scratch on synthetic products (400 steps, shared
with ``python -m e2_train.demo`` under its cache, ``E2_PLUGINS_CACHE``; its rows for unseen words are random, not
zero), each seed fine-tunes CLIP-FT and E2 on the second dataset's training split with that seed and the same
``--finetune-steps`` (E2's stage 1 on top, as in the recipe), cached in ``OUT/encoders-other-...`` (a rerun reuses
them). ``--other-encoders given`` uses ``--encoder`` / ``--baseline`` there too.

Cost on 2 CPU cores (measured on 1 core: 1.5 s per pre-training step, 1.7 s per fine-tuning step; the decoders
about 3.5 min per seed): the shared start once (~12 min, with its synthetic products), then per seed on the second
dataset about 20 min at 300 fine-tuning steps (CLIP-FT 300, E2 90 + 300), captioning included.

    python benchmarks/caption_methods.py --seeds 0 1 2 --out runs/bench-caption
    python benchmarks/caption_methods.py --datasets other --seeds 0 --workers 0   # one seed, one core
    python benchmarks/caption_methods.py --datasets products   # other_products.py's catalog and its runs' encoders

``products``: the catalog of ``benchmarks/other_products.py`` (its 4,000 training and 1,000 validation items) with that
benchmark's CLIP-FT and E2 of each seed (``--products-encoder`` / ``--products-baseline`` take ``{seed}``), so run
it first.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

from e2_caption import caption
from e2_train.demo import DEMO, demo_root, finetune, pretrain_clip

import other_products  # the second generator's benchmark, beside this script

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from other_data import write_catalog  # noqa: E402  (the tests' second data writer)


def other_encoders(data_root: Path, out: Path, seed: int, steps: int, device: str, workers: int) -> dict:
    """CLIP-FT and E2 of the demo recipe fine-tuned for ``steps`` on the catalog at ``data_root`` with ``seed``,
    from the recipe's pre-trained CLIP (trained once, cached); returns the role -> checkpoint directory."""
    options = dict(device=device, workers=workers, progress=False)
    shared = demo_root(DEMO)
    begun = time.time()
    start = pretrain_clip(DEMO, shared / "pretrain", shared / "synthetic-pretrain", **options)
    recipe = replace(DEMO, finetune_steps=steps, seed=seed)
    runs = {role: finetune(kind, recipe, start, out / kind / f"seed{seed}", data_root, dataset="catalog", **options)
            for role, kind in (("baseline", "clip-ft"), ("encoder", "e2"))}
    print(f"encoders for seed {seed} (from {start}, {steps} fine-tuning steps; {time.time() - begun:.0f} s): "
          f"CLIP-FT {runs['baseline']}, E2 {runs['encoder']}", flush=True)
    return {role: str(path) for role, path in runs.items()}


def mean_se(values):
    return statistics.mean(values), (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="+", default=["synthetic", "other"],
                        choices=["synthetic", "other", "products"],
                        help="products: benchmarks/other_products.py's catalog, with that benchmark's encoders")
    parser.add_argument("--products-encoder", default=None, help="E2 on 'products', '{seed}' replaced by each seed "
                        "(default: other_products.py's E2 of that seed at the recipe's steps)")
    parser.add_argument("--products-baseline", default=None, help="CLIP-FT on 'products', as --products-encoder")
    parser.add_argument("--products-root", default=None,
                        help="the catalog of 'products' (default: other_products.py's, written there if absent)")
    parser.add_argument("--epochs", type=int, default=8, help="decoder epochs (the task's min_steps floor applies)")
    parser.add_argument("--images", type=int, default=1000, help="validation images scored")
    parser.add_argument("--other-train", type=int, default=1200, help="training products of the second dataset")
    parser.add_argument("--other-validation", type=int, default=300)
    parser.add_argument("--decoder", default="demo", choices=["demo", "paper"])
    parser.add_argument("--beams", type=int, default=None)
    parser.add_argument("--encoder", default="demo:e2")
    parser.add_argument("--baseline", default="demo:clip-ft")
    parser.add_argument("--other-encoders", default="finetuned", choices=["finetuned", "given"],
                        help="second dataset: CLIP-FT and E2 fine-tuned on its training split per seed, or --encoder "
                             "and --baseline")
    parser.add_argument("--finetune-steps", type=int, default=300, help="fine-tuning steps of --other-encoders "
                        "finetuned (E2's stage 1 adds 30%% on top)")
    parser.add_argument("--methods", nargs="+", default=["decap", "capdec"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=2, help="data loader processes of the encoders' training")
    parser.add_argument("--out", default="runs/bench-caption")
    args = parser.parse_args()

    out = Path(args.out)
    met = []
    for dataset in args.datasets:
        data = dict(dataset="synthetic", data_root=None)
        trained = dataset == "other" and args.other_encoders == "finetuned"
        if dataset == "other":
            name = f"other-{args.other_train}-{args.other_validation}"
            root = out / name
            if not (root / "validation.jsonl").is_file():
                print(f"writing the second dataset to {root} ...", flush=True)
                write_catalog(root, train=args.other_train, validation=args.other_validation)
            data = dict(dataset="catalog", data_root=str(root))
        elif dataset == "products":  # the benchmark's catalog at its default sizes (no new images if present)
            root = Path(args.products_root) if args.products_root else other_products.catalog_root()
            other_products.write(root, {"train": 4000, "validation": 1000})
            data = dict(dataset="catalog", data_root=str(root))
        runs = []
        for seed in args.seeds:
            run = out / f"{dataset}-seed{seed}"
            encoders = dict(encoder=args.encoder, baseline=args.baseline)
            if dataset == "products":
                encoders = dict(encoder=other_products.trained_encoder("e2", seed, args.products_encoder),
                                baseline=other_products.trained_encoder("clip-ft", seed, args.products_baseline))
            elif trained:
                encoders = other_encoders(root, out / f"encoders-{name}-{args.finetune_steps}steps", seed,
                                          args.finetune_steps, args.device, args.workers)
            begun = time.time()
            caption(method=args.methods, decoder=args.decoder, beams=args.beams, epochs=args.epochs, seed=seed,
                    max_images=args.images, out=run, decoders=out / "decoders", device=args.device, page_images=0,
                    **encoders, **data)
            print(f"{dataset} seed {seed}: captioned in {time.time() - begun:.0f} s", flush=True)
            runs.append(json.loads((run / "results.json").read_text()))
        def side(result, role):  # an encoder's entry by its role (labels name checkpoints, which differ by seed)
            return next(r for r in result["encoders"].values() if r["role"] == role)

        def metric(name, role, key):
            return [side(r, role)["methods"][name]["metrics"].get(key, math.nan) for r in runs]

        labels = {role: ("CLIP-FT" if role == "baseline" else "E2") if trained or dataset == "products" else
                  next(label for label, r in runs[0]["encoders"].items() if r["role"] == role)
                  for role in ("baseline", "encoder")}
        entry = side(runs[0], "baseline")["methods"][args.methods[0]]
        used = (f"CLIP-FT and E2 fine-tuned on its training split ({args.finetune_steps} steps per seed)" if trained
                else " and ".join(side(runs[0], role)["source"] for role in ("baseline", "encoder")))  # seed 0's
        print(f"\n{dataset}: {entry['trained_on']['captions']} training captions, {entry['trained_on']['epochs']} "
              f"epochs, decoder {args.decoder}, seeds {args.seeds}, encoders: {used}; "
              f"{entry['notes'][0] if entry['notes'] else ''}")
        print("| method | encoder | BLEU-4 | METEOR | ROUGE-L | CIDEr |")
        print("|---|---|---|---|---|---|")
        for name in args.methods:
            for role in ("baseline", "encoder"):
                cells = [mean_se(metric(name, role, k)) for k in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")]
                print(f"| {name} | {labels[role]} | " + " | ".join(f"{m:.1f} ± {s:.1f}" for m, s in cells) + " |")
            gaps = {k: [e - b for e, b in zip(metric(name, "encoder", k), metric(name, "baseline", k))]
                    for k in ("BLEU-4", "CIDEr")}
            met += [mean_se(gaps["BLEU-4"])[0] >= 0, mean_se(gaps["CIDEr"])[0] >= 0]
            print(f"| {name} | {labels['encoder']} - {labels['baseline']} | "
                  f"{mean_se(gaps['BLEU-4'])[0]:+.1f} ± {mean_se(gaps['BLEU-4'])[1]:.1f} "
                  f"({', '.join(f'{g:+.1f}' for g in gaps['BLEU-4'])}) | | | "
                  f"{mean_se(gaps['CIDEr'])[0]:+.1f} ± {mean_se(gaps['CIDEr'])[1]:.1f} "
                  f"({', '.join(f'{g:+.1f}' for g in gaps['CIDEr'])}) |")
    print(f"\ntarget E2 >= CLIP-FT on BLEU-4 and CIDEr for both methods on every dataset: "
          f"{'met' if all(met) else 'NOT met'} ({sum(met)} of {len(met)})")


if __name__ == "__main__":
    main()
