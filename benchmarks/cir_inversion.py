"""How much of the reference image a composed-retrieval method's pseudo word keeps, per encoder, from finished runs.

For each run folder of ``e2-plugins run cir`` (or ``benchmarks/cir_methods.py``) and each pseudo-word method in
it, the network that run used turns every validation reference image into its pseudo word; the prompt
``a photo of $`` with that word then ranks the category's gallery. Printed per method and encoder, mean over the
categories (mean ± standard error over the runs given): the share of references ranked in their own top 10
("reference kept", R@10 of the reference itself), the mean cosine between that prompt and the reference, and the
run's own composed R@10 beside them. A method whose pseudo words keep little of the reference retrieves mostly by
the relative captions.

    python benchmarks/cir_inversion.py runs/bench-cir/other-run-seed0 runs/bench-cir/other-run-seed1
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from e2_core import load_encoder
from e2_core.data.fashioniq import load_fashioniq
from e2_cir.methods import METHODS
from e2_cir.methods.base import load_network
from e2_eval.fashioniq import embed_names

from cir_methods import mean_se

PROMPT = "a photo of $"


@torch.no_grad()
def reference_kept(method, encoder, data, gallery: torch.Tensor) -> dict:
    """R@10 of each reference among ``gallery`` (raw embeddings, in ``data.gallery``'s order) for ``PROMPT`` with
    its pseudo word, and the mean cosine of that prompt with the reference."""
    index = {name: i for i, name in enumerate(data.gallery)}
    rows = torch.tensor([index[t.reference] for t in data.triplets])
    pseudo = method.network(gallery[rows].to(encoder.device))
    query = F.normalize(method.encode_texts(encoder, [PROMPT] * len(rows), pseudo), dim=-1).cpu()
    scores = query @ F.normalize(gallery, dim=-1).t()
    own = scores[torch.arange(len(rows)), rows]
    rank = (scores > own.unsqueeze(1)).sum(dim=1)
    return {"kept": 100.0 * (rank < 10).float().mean().item(), "cosine": own.mean().item()}


def inspect(run: Path, device: str) -> dict:
    """``{(method, role): {"kept", "cosine", "R@10"}}`` of one run folder, means over its categories."""
    if not (run / "results.json").is_file():
        raise SystemExit(f"{run / 'results.json'}: no such file: give the folders of finished composed-retrieval runs "
                         "(the --out of `e2-plugins run cir`, or cir_methods.py's RUNS/run-seedN)")
    results = json.loads((run / "results.json").read_text())
    rows = {}
    for label, entry in results["encoders"].items():
        methods = {name: r for name, r in entry["methods"].items()
                   if getattr(METHODS.get(name), "pseudo_word", False) and "network" in r.get("notes", {})}
        if not methods:
            continue
        encoder = load_encoder(entry["source"], device=device)
        categories = [c for c in ("dress", "shirt", "toptee") if c in next(iter(methods.values()))]
        data = {c: load_fashioniq(results["data_root"], c, "val") for c in categories}
        galleries = {c: embed_names(encoder, d.gallery, d, run / "embeddings", normalize=False)
                     for c, d in data.items()}
        for name, scored in methods.items():
            method = METHODS[name]()
            load_network(method, encoder, Path(scored["notes"]["network"]["file"]))
            per = [reference_kept(method, encoder, data[c], galleries[c]) for c in categories]
            rows[(name, entry["role"])] = {"kept": statistics.mean(p["kept"] for p in per),
                                           "cosine": statistics.mean(p["cosine"] for p in per),
                                           "R@10": scored["mean R@10"], "label": label.split(" (")[0]}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders holding results.json")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    per_run = [inspect(run, args.device) for run in args.runs]
    keys = sorted(set.intersection(*(set(r) for r in per_run)), key=lambda k: (k[0], k[1] != "baseline"))
    print(f"\nPseudo words of {len(per_run)} run(s): '{PROMPT}' with the reference's word ranks the category's "
          "gallery; mean over categories (mean ± standard error over runs)")
    print("| method | encoder | reference kept (its own R@10) | cosine(prompt, reference) | composed R@10 |")
    print("|---|---|---|---|---|")
    for key in keys:
        cells = [mean_se([r[key][field] for r in per_run]) for field in ("kept", "cosine", "R@10")]
        print(f"| {key[0]} | {per_run[0][key]['label']} | {cells[0][0]:.1f} ± {cells[0][1]:.1f} | "
              f"{cells[1][0]:.3f} ± {cells[1][1]:.3f} | {cells[2][0]:.1f} ± {cells[2][1]:.1f} |")


if __name__ == "__main__":
    main()
