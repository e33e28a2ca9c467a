"""E2 vs CLIP-FT on synthetic products whose identity hinges on small details.

Shared starting point: a small CLIP pre-trained from scratch on synthetic products disjoint from
the fine-tuning data (the demo recipe, ``e2_train.demo``). From it, per seed, CLIP-FT and
E2 (stage 1 then stage 2) are fine-tuned on the same data for the same number of steps. Reported:
full-protocol T2I / I2T R@1 (mean ± standard error over seeds) on >= 1,000 validation products,
the step-0 score and the gain since, the training-step time ratio, and E2's mechanism — each
entity's regional loss against chance, and how often each entity's selection tokens pick a patch
holding its detail against chance.

    python benchmarks/e2_vs_clipft.py --seeds 0 1 2 --out runs/bench      # ~1 h on 2 CPU cores
    python benchmarks/e2_vs_clipft.py --finetune-steps 2000 --device cuda  # a GPU, more steps
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import replace
from pathlib import Path

import torch

import e2_core
from e2_core.data import default_synthetic_root, open_dataset
from e2_core.data.builders.synthetic import catalog, layout
from e2_core.loss import contrastive_loss
from e2_train.demo import DEMO, demo_root, pretrain_clip, recipe_run
from e2_eval.harness import embed_dataset
from e2_eval.retrieval import cross_modal_retrieval


def retrieval_r1(encoder, data, device) -> dict:
    images, texts, _, _ = embed_dataset(encoder, data, 256, device)
    scores = cross_modal_retrieval(images, texts)
    return {"t2i_r1": scores["t2i"][1], "i2t_r1": scores["i2t"][1], "sumr": scores["sumr"]}


@torch.no_grad()
def mechanism(encoder, data, device, batch: int = 64) -> dict:
    """Per entity: regional InfoNCE on validation batches (chance: ln(batch)), and the share of the
    entity's selection tokens (fusion block 2) whose patch overlaps the entity's detail (brand: the
    mark; season: the hang-tag), against the share of patches that overlap it."""
    from e2_core.data import E2Collate

    encoder.eval().to(device)
    model = encoder.model
    collate = E2Collate(encoder.tokenizer, data.spec)
    products = catalog(0)
    per_entity = model.config.tokens_per_entity
    losses = {e: [] for e in model.entities}
    hits = {e: [0, 0] for e in ("brand", "season")}
    chance = {e: [0, 0] for e in hits}
    grid = model.visual.grid_size
    boxes = model.visual.patch_boxes(torch.arange(grid[0] * grid[1])).float()
    scale = 256 / model.visual.image_size[0]
    for start in range(0, len(data) - batch + 1, batch):
        b = collate([data[i] for i in range(start, start + batch)]).to(device)
        vision = model.encode_image_regions(b.images, normalize=True)  # one pass: features and selections
        entity_text = model.encode_entity_text(b.entity_text, normalize=True)
        for k, entity in enumerate(model.entities):
            losses[entity].append(contrastive_loss(vision.regional_features[:, k], entity_text[:, k],
                                                   model.logit_scale.exp()).item())
        picked = vision.selected_patches[:, 1].cpu()
        for row, index in enumerate(b.indices):
            geometry = layout(products[int(data.product_ids[index])], 0)
            targets = {"brand": geometry.mark_box, "season": geometry.tag_box}
            for entity, target in targets.items():
                overlap = _overlaps(boxes * scale, target)
                k = model.entities.index(entity)
                tokens = picked[row, k * per_entity:(k + 1) * per_entity]
                hits[entity][0] += int(overlap[tokens].sum())
                hits[entity][1] += len(tokens)
                chance[entity][0] += int(overlap.sum())
                chance[entity][1] += len(overlap)
    return {"regional_loss": {e: statistics.mean(v) for e, v in losses.items()}, "loss_chance": math.log(batch),
            "selection_hit_rate": {e: h[0] / max(h[1], 1) for e, h in hits.items()},
            "selection_chance": {e: c[0] / max(c[1], 1) for e, c in chance.items()}}


def _overlaps(boxes: torch.Tensor, target) -> torch.Tensor:
    x0, y0, x1, y1 = target
    return (boxes[:, 0] < x1) & (boxes[:, 2] > x0) & (boxes[:, 1] < y1) & (boxes[:, 3] > y0)


def step_seconds(run: Path) -> float:
    times = []
    for path in sorted(run.glob("*/metrics.jsonl")):
        records = [json.loads(line) for line in open(path)]
        steps = [r for r in records if "loss" in r]
        times += [b["time"] - a["time"] for a, b in zip(steps, steps[1:]) if b["step"] == a["step"] + 1]
    return statistics.median(times)


def mean_se(values):
    return statistics.mean(values), (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="default: the demo encoders' folder, whose seed-0 runs it shares")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model", default=DEMO.model)
    parser.add_argument("--pretrain-steps", type=int, default=DEMO.pretrain_steps)
    parser.add_argument("--finetune-steps", type=int, default=DEMO.finetune_steps)
    parser.add_argument("--batch-size", type=int, default=DEMO.batch_size)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    device = str(e2_core.runtime.resolve_device(args.device))
    recipe = replace(DEMO, model=args.model, pretrain_steps=args.pretrain_steps, finetune_steps=args.finetune_steps,
                     batch_size=args.batch_size)
    out = Path(args.out) if args.out else demo_root(recipe)
    common = dict(device=args.device, workers=args.workers)
    start = pretrain_clip(recipe, out / "pretrain", out / "synthetic-pretrain", **common)
    data_root = default_synthetic_root("small", 0)
    results = {"recipe": recipe.__dict__, "runs": {}}
    for kind in ("clip-ft", "e2"):
        torch.manual_seed(0)  # the step-0 E2's new parts
        # the step-0 model; for E2 drawn as the trainer draws it (seed 0: the CLIP, then E2's new parts)
        initial = e2_core.load_encoder(start) if kind == "clip-ft" else \
            e2_core.Encoder(e2_core.create_e2(pretrained=str(start)), arch=args.model)
        val = open_dataset("synthetic", str(data_root), "validation", transform=initial.preprocess)
        step0 = retrieval_r1(initial, val, device)
        for seed in args.seeds:
            key = f"{kind}/seed{seed}"
            result_file = out / kind / f"seed{seed}-results.json"
            if result_file.is_file():
                results["runs"][key] = json.loads(result_file.read_text())
                continue
            run = out / kind / f"seed{seed}"
            best = recipe_run(kind, recipe, out, seed, **common)
            model = e2_core.load_encoder(best)
            record = {"step0": step0, "final": retrieval_r1(model, val, device), "step_seconds": step_seconds(run)}
            if kind == "e2":
                record["mechanism"] = mechanism(model, val, device)
                record["mechanism_step0"] = mechanism(initial, val, device)
            result_file.parent.mkdir(parents=True, exist_ok=True)
            result_file.write_text(json.dumps(record, indent=2))
            results["runs"][key] = record
    report(results, args.seeds, len(val))
    (out / "summary.json").write_text(json.dumps(results, indent=2))


def report(results: dict, seeds, n_val: int) -> None:
    runs = results["runs"]
    print(f"\n{n_val} validation products, seeds {seeds}, {results['recipe']['finetune_steps']} fine-tuning steps; "
          "mean ± standard error")
    print("| model | T2I R@1 | I2T R@1 | T2I R@1 at step 0 | T2I gain since step 0 | step time (s) |")
    print("|---|---|---|---|---|---|")
    for kind in ("clip-ft", "e2"):
        rows = [runs[f"{kind}/seed{s}"] for s in seeds]
        t2i, i2t = mean_se([r["final"]["t2i_r1"] for r in rows]), mean_se([r["final"]["i2t_r1"] for r in rows])
        step0 = rows[0]["step0"]["t2i_r1"]
        gain = mean_se([r["final"]["t2i_r1"] - step0 for r in rows])
        seconds = statistics.mean(r["step_seconds"] for r in rows)
        print(f"| {kind} | {t2i[0]:.1f} ± {t2i[1]:.1f} | {i2t[0]:.1f} ± {i2t[1]:.1f} | {step0:.1f} | "
              f"{gain[0]:+.1f} ± {gain[1]:.1f} | {seconds:.2f} |")
    e2_rows = [runs[f"e2/seed{s}"] for s in seeds]
    clip_rows = [runs[f"clip-ft/seed{s}"] for s in seeds]
    gap = mean_se([e["final"]["t2i_r1"] - c["final"]["t2i_r1"] for e, c in zip(e2_rows, clip_rows)])
    ratio = statistics.mean(e["step_seconds"] for e in e2_rows) / statistics.mean(c["step_seconds"] for c in clip_rows)
    print(f"\nE2 - CLIP-FT, T2I R@1: {gap[0]:+.1f} ± {gap[1]:.1f} (target >= +5); step time E2 / CLIP-FT: "
          f"{ratio:.2f} (target <= 1.25)")
    mech = e2_rows[0]["mechanism"]
    print(f"\nE2 mechanism (seed {seeds[0]}); regional loss chance = ln(batch) = {mech['loss_chance']:.2f}")
    print("| entity | regional loss, step 0 | regional loss, final | selection on its detail, final | chance |")
    print("|---|---|---|---|---|")
    for entity, loss in mech["regional_loss"].items():
        before = e2_rows[0]["mechanism_step0"]["regional_loss"][entity]
        hit = mech["selection_hit_rate"].get(entity)
        hit_text = f"{100 * hit:.1f}%" if hit is not None else "-"
        chance = mech["selection_chance"].get(entity)
        chance_text = f"{100 * chance:.1f}%" if chance is not None else "-"
        print(f"| {entity} | {before:.2f} | {loss:.2f} | {hit_text} | {chance_text} |")


if __name__ == "__main__":
    main()
