"""DeCap and CapDec x {CLIP-FT, E2} on the synthetic products (zero-shot captioning).

The demo encoders (``demo:clip-ft``, ``demo:e2``) each get their own decoders, trained on the training
products' descriptions (text only) with the same recipe; the validation images are captioned and scored
against their descriptions with the COCO caption metrics. Prints a markdown table and E2 - CLIP-FT on
BLEU-4 and CIDEr per method (target: E2 >= CLIP-FT on both, for both methods).

    python benchmarks/caption_methods.py --epochs 8 --images 1000 --out runs/bench-caption
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from e2_caption import caption


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--images", type=int, default=1000, help="validation images scored")
    parser.add_argument("--beams", type=int, default=1)
    parser.add_argument("--encoder", default="demo:e2")
    parser.add_argument("--baseline", default="demo:clip-ft")
    parser.add_argument("--methods", nargs="+", default=["decap", "capdec"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="runs/bench-caption")
    args = parser.parse_args()

    caption(method=args.methods, encoder=args.encoder, baseline=args.baseline, beams=args.beams, epochs=args.epochs,
            max_images=args.images, out=Path(args.out), device=args.device, page_images=0)
    results = json.loads((Path(args.out) / "results.json").read_text())
    base, e2 = list(results["encoders"])
    print(f"\n{args.images} validation images, {args.epochs} decoder epochs, beams {args.beams}")
    print("| method | encoder | BLEU-4 | METEOR | ROUGE-L | CIDEr |")
    print("|---|---|---|---|---|---|")
    met = []
    for name in args.methods:
        for label in (base, e2):
            m = results["encoders"][label]["methods"][name]["metrics"]
            print(f"| {name} | {label} | {m['BLEU-4']:.1f} | {m.get('METEOR', float('nan')):.1f} | "
                  f"{m['ROUGE-L']:.1f} | {m['CIDEr']:.1f} |")
        b, e = (results["encoders"][label]["methods"][name]["metrics"] for label in (base, e2))
        met += [e["BLEU-4"] >= b["BLEU-4"], e["CIDEr"] >= b["CIDEr"]]
        print(f"| {name} | E2 - {base} | {e['BLEU-4'] - b['BLEU-4']:+.1f} | | | {e['CIDEr'] - b['CIDEr']:+.1f} |")
    print(f"\ntarget E2 >= {base} on BLEU-4 and CIDEr for both methods: {'met' if all(met) else 'NOT met'}")


if __name__ == "__main__":
    main()
