"""Every composed-retrieval method x {CLIP-FT, E2} on synthetic FashionIQ-layout data.

The demo encoders (``demo:clip-ft``, ``demo:e2``: the same pre-trained CLIP fine-tuned for the same steps)
are compared under each method's own prompt convention; each method's network is trained on the
synthetic training split, once per encoder. Prints FashionIQ's mean R@10 / R@50 over dress, shirt and
toptee as a markdown table, and E2 - CLIP-FT per method (target: E2 >= CLIP-FT on mean R@10 for every
method).

    python benchmarks/cir_methods.py --triplets 200 --out runs/bench-cir
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from e2_data.synthetic import write_fashioniq
from e2_cir import cir
from e2_cir.methods import METHODS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--triplets", type=int, default=200, help="triplets per category and split")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic triplets")
    parser.add_argument("--encoder", default="demo:e2")
    parser.add_argument("--baseline", default="demo:clip-ft")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="runs/bench-cir")
    args = parser.parse_args()

    out = Path(args.out)
    data = out / f"fashioniq-{args.triplets}-seed{args.seed}"
    if not (data / "captions" / "cap.toptee.val.json").is_file():
        print(f"writing {args.triplets} synthetic triplets per category and split to {data} ...", flush=True)
        write_fashioniq(data, args.triplets, seed=args.seed)
    cir(dataset="synthetic-fashioniq", data_root=str(data), method=args.methods, encoder=args.encoder, baseline=args.baseline,
        out=out / "run", device=args.device, figure_queries=0)
    results = json.loads((out / "run" / "results.json").read_text())
    labels = list(results["encoders"])
    base, e2 = labels[0], labels[1]
    print(f"\n{args.triplets} triplets per category; mean over dress, shirt, toptee")
    print(f"| method | convention | {base} R@10 | {e2} R@10 | {base} R@50 | {e2} R@50 | E2 - {base}, R@10 |")
    print("|---|---|---|---|---|---|---|")
    met = []
    for name in args.methods:
        b, e = (results["encoders"][label]["methods"][name] for label in (base, e2))
        gap = e["mean R@10"] - b["mean R@10"]
        met.append(gap >= 0)
        print(f"| {name} | {results['conventions'][name]} | {b['mean R@10']:.1f} | {e['mean R@10']:.1f} | "
              f"{b['mean R@50']:.1f} | {e['mean R@50']:.1f} | {gap:+.1f} |")
    print(f"\ntarget E2 >= {base} on mean R@10 for every method: {'met' if all(met) else 'NOT met'} "
          f"({sum(met)} of {len(met)} methods)")


if __name__ == "__main__":
    main()
