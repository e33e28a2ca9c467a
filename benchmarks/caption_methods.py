"""DeCap and CapDec x {CLIP-FT, E2}, zero-shot captioning, over seeds and on two datasets.

The demo encoders (``demo:clip-ft``, ``demo:e2``) each get their own decoders (the ``demo`` preset, or
``--decoder paper``), trained on the training products' descriptions (text only) with the same recipe; the
validation images are captioned and scored against their descriptions with the COCO caption metrics (PTB
tokenisation where Java runs). Two datasets: the project's synthetic products, and a catalog written by the
tests' second data writer (``tests/other_data.py``: other brands, colours and garments, names with ``&``,
``/``, commas, digits, accents). A seed seeds the decoders' initialisation and training order. Prints
mean ± standard error over seeds per dataset, and E2 - CLIP-FT on BLEU-4 and CIDEr per method with its value
on each seed (target: E2 >= CLIP-FT on both, for both methods, on both datasets).

    python benchmarks/caption_methods.py --seeds 0 1 2 --out runs/bench-caption
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from e2_caption import caption

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from other_data import write_catalog  # noqa: E402  (the tests' second data writer)


def mean_se(values):
    return statistics.mean(values), (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="+", default=["synthetic", "other"], choices=["synthetic", "other"])
    parser.add_argument("--epochs", type=int, default=8, help="decoder epochs (the task's min_steps floor applies)")
    parser.add_argument("--images", type=int, default=1000, help="validation images scored")
    parser.add_argument("--other-train", type=int, default=1200, help="training products of the second dataset")
    parser.add_argument("--other-validation", type=int, default=300)
    parser.add_argument("--decoder", default="demo", choices=["demo", "paper"])
    parser.add_argument("--beams", type=int, default=None)
    parser.add_argument("--encoder", default="demo:e2")
    parser.add_argument("--baseline", default="demo:clip-ft")
    parser.add_argument("--methods", nargs="+", default=["decap", "capdec"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="runs/bench-caption")
    args = parser.parse_args()

    out = Path(args.out)
    met = []
    for dataset in args.datasets:
        data = dict(dataset="synthetic", data_root=None)
        if dataset == "other":
            root = out / f"other-{args.other_train}-{args.other_validation}"
            if not (root / "validation.jsonl").is_file():
                print(f"writing the second dataset to {root} ...", flush=True)
                write_catalog(root, train=args.other_train, validation=args.other_validation)
            data = dict(dataset="catalog", data_root=str(root))
        runs = []
        for seed in args.seeds:
            run = out / f"{dataset}-seed{seed}"
            caption(method=args.methods, encoder=args.encoder, baseline=args.baseline, decoder=args.decoder,
                    beams=args.beams, epochs=args.epochs, seed=seed, max_images=args.images, out=run,
                    decoders=out / "decoders", device=args.device, page_images=0, **data)
            runs.append(json.loads((run / "results.json").read_text()))
        base, e2 = list(runs[0]["encoders"])
        entry = runs[0]["encoders"][base]["methods"][args.methods[0]]
        print(f"\n{dataset}: {entry['trained_on']['captions']} training captions, {entry['trained_on']['epochs']} "
              f"epochs, decoder {args.decoder}, seeds {args.seeds}; {entry['notes'][0] if entry['notes'] else ''}")
        print("| method | encoder | BLEU-4 | METEOR | ROUGE-L | CIDEr |")
        print("|---|---|---|---|---|---|")

        def metric(name, label, key):
            return [r["encoders"][label]["methods"][name]["metrics"].get(key, math.nan) for r in runs]

        for name in args.methods:
            for label in (base, e2):
                cells = [mean_se(metric(name, label, k)) for k in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")]
                print(f"| {name} | {label} | " + " | ".join(f"{m:.1f} ± {s:.1f}" for m, s in cells) + " |")
            gaps = {k: [e - b for e, b in zip(metric(name, e2, k), metric(name, base, k))] for k in ("BLEU-4", "CIDEr")}
            met += [mean_se(gaps["BLEU-4"])[0] >= 0, mean_se(gaps["CIDEr"])[0] >= 0]
            print(f"| {name} | E2 - {base} | "
                  f"{mean_se(gaps['BLEU-4'])[0]:+.1f} ± {mean_se(gaps['BLEU-4'])[1]:.1f} "
                  f"({', '.join(f'{g:+.1f}' for g in gaps['BLEU-4'])}) | | | "
                  f"{mean_se(gaps['CIDEr'])[0]:+.1f} ± {mean_se(gaps['CIDEr'])[1]:.1f} "
                  f"({', '.join(f'{g:+.1f}' for g in gaps['CIDEr'])}) |")
    print(f"\ntarget E2 >= CLIP-FT on BLEU-4 and CIDEr for both methods on every dataset: "
          f"{'met' if all(met) else 'NOT met'} ({sum(met)} of {len(met)})")


if __name__ == "__main__":
    main()
