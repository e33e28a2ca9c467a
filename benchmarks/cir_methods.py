"""Every composed-retrieval method x {CLIP-FT, E2} on synthetic FashionIQ-layout data, over seeds.

The demo encoders (``demo:clip-ft``, ``demo:e2``: the same pre-trained CLIP fine-tuned for the same steps)
are compared under each method's own prompt convention, with each method's default settings; each
method's network is trained on the synthetic training split, once per encoder and seed. A seed draws
other triplets (``write_fashioniq(seed=...)``) and seeds the methods' training. Prints FashionIQ's mean
R@10 / R@50 over dress, shirt and toptee (mean ± standard error over seeds) as a markdown table, and
E2 - CLIP-FT per method with its value on each seed (target: E2 >= CLIP-FT on mean R@10 for every method).

    python benchmarks/cir_methods.py --triplets 100 --seeds 0 1 2 --out runs/bench-cir
    python benchmarks/cir_methods.py --option searle.oti_steps=30    # a method setting, as ``run cir --option``
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from e2_data.synthetic import write_fashioniq
from e2_cir import cir
from e2_cir.methods import METHODS


def mean_se(values):
    return statistics.mean(values), (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--triplets", type=int, default=100, help="triplets per category and split")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--encoder", default="demo:e2")
    parser.add_argument("--baseline", default="demo:clip-ft")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--option", nargs="*", default=[], help="METHOD.NAME=VALUE settings (as run cir --option)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="runs/bench-cir")
    args = parser.parse_args()

    out = Path(args.out)
    runs = []
    for seed in args.seeds:
        data = out / f"fashioniq-{args.triplets}-seed{seed}"
        if not (data / "captions" / "cap.toptee.val.json").is_file():
            print(f"writing {args.triplets} synthetic triplets per category and split to {data} ...", flush=True)
            write_fashioniq(data, args.triplets, seed=seed)
        trained = [m for m in args.methods if METHODS[m].trains]
        given = {o.split("=")[0] for o in args.option}
        seeds = [f"{m}.seed={seed}" for m in trained if f"{m}.seed" not in given]
        run = out / f"run-seed{seed}"
        cir(dataset="synthetic-fashioniq", data_root=str(data), method=args.methods, encoder=args.encoder,
            baseline=args.baseline, option=args.option + seeds, out=run, networks=out / "networks",
            device=args.device, figure_queries=0)
        runs.append(json.loads((run / "results.json").read_text()))
    labels = list(runs[0]["encoders"])
    base, e2 = labels[0], labels[1]

    def score(name, label, key):
        return [r["encoders"][label]["methods"][name][key] for r in runs]

    print(f"\n{args.triplets} triplets per category, seeds {args.seeds}; mean over dress, shirt, toptee "
          f"(mean ± standard error over seeds){'; settings ' + ' '.join(args.option) if args.option else ''}")
    print(f"| method | convention | {base} R@10 | {e2} R@10 | {base} R@50 | {e2} R@50 | E2 - {base}, R@10 | per seed |")
    print("|---|---|---|---|---|---|---|---|")
    met = []
    for name in args.methods:
        cells = [mean_se(score(name, label, key)) for key in ("mean R@10", "mean R@50") for label in (base, e2)]
        gaps = [e - b for e, b in zip(score(name, e2, "mean R@10"), score(name, base, "mean R@10"))]
        gap = mean_se(gaps)
        met.append(gap[0] >= 0)
        print(f"| {name} | {runs[0]['conventions'][name]} | "
              + " | ".join(f"{m:.1f} ± {s:.1f}" for m, s in cells)
              + f" | {gap[0]:+.1f} ± {gap[1]:.1f} | {', '.join(f'{g:+.1f}' for g in gaps)} |")
    print(f"\ntarget E2 >= {base} on mean R@10 for every method: {'met' if all(met) else 'NOT met'} "
          f"({sum(met)} of {len(met)} methods)")


if __name__ == "__main__":
    main()
