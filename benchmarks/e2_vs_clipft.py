"""E2 vs CLIP-FT on synthetic products whose identity hinges on small details.

Shared starting point: a small CLIP pre-trained from scratch on synthetic products disjoint from
the fine-tuning data (the demo recipe, ``e2_train.demo``). From it, per seed, CLIP-FT and
E2 (stage 1 then stage 2) are fine-tuned on the same data for the same number of steps. Reported:
full-protocol T2I / I2T R@1 (mean ± standard error over seeds) on >= 1,000 validation products,
the step-0 score and the gain since, the training-step time ratio, and E2's mechanism — each
entity's regional loss against chance, and how often each entity's selection tokens pick a patch
holding its detail against chance.

    python benchmarks/e2_vs_clipft.py --seeds 0 1 2 --out runs/bench      # ~4 h on 2 CPU cores (1,800 steps)
    python benchmarks/e2_vs_clipft.py --finetune-steps 2000 --device cuda  # a GPU, more steps
    python benchmarks/e2_vs_clipft.py --variant paper --token-attention full --global-weight 0.5 --seeds 0

A variant's E2 runs live in ``OUT/e2-VARIANT`` and share the start and the CLIP-FT runs with the others.
The detail probe asks both models the question E2 exists for: given a product's text, is its own image
ranked above the same product with exactly one attribute changed (brand, season, composition, mark place;
colour as the coarse control)? Counterfactual images are rendered by the generator; chance is 50%.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import statistics
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import e2_core
from e2_core import registry
from e2_core.config import TOKEN_ATTENTION
from e2_core.fusion import patches_at
from e2_core.data import default_synthetic_root, open_dataset
from e2_data.synthetic import COLOURS, COMPOSITIONS, MARK_CELL, MARK_PLACES, SEASONS, brand_names, catalog, \
    garment_mask, layout, render, write_fashiongen
from e2_core.loss import contrastive_loss
from e2_train.demo import DEMO, demo_root, finetune, pretrain_clip
from e2_eval.harness import embed_dataset, evaluate_retrieval
from e2_eval.topk import topk_indices


#: the control's training method: CLIP-FT given E2's entity texts and regional losses, without E2's parts
CONTROL = "clip-ft-entities"
ATTRIBUTES = ("subcategory", "colour", "brand", "composition", "season", "mark_place")


def retrieval_r1(encoder, data, device, errors: bool = True) -> dict:
    """Full-protocol R@1 both ways and SumR, sample-100 SumR, and (``errors``: products of this module's
    generator) what the wrong text-to-image answers get wrong."""
    images, texts, indices, _ = embed_dataset(encoder, data, 256, device)
    groups = data.groups("subcategory")
    scores = evaluate_retrieval(images, texts, [groups[i] for i in indices])
    full = scores["full"]
    record = {"t2i_r1": full["t2i"][1], "i2t_r1": full["i2t"][1], "sumr": full["sumr"],
              "sample100_sumr": scores["sample-100"].get("sumr")}  # None: groups too small
    if errors:
        record["t2i_errors"] = t2i_errors(texts, images, [int(data.product_ids[i]) for i in indices])
    return record


def t2i_errors(texts, images, product_ids) -> dict:
    """What the wrong text-to-image top-1 products get wrong: how many of the generator's attributes differ
    from the right product, and how often each one does (alone or with others)."""
    products = catalog(0)
    truth = [products[i] for i in product_ids]
    top = topk_indices(texts, images, 1)[:, 0].tolist()
    differing = [[a for a in ATTRIBUTES if getattr(truth[q], a) != getattr(truth[t], a)]
                 for q, t in enumerate(top) if t != q]
    visible = collections.Counter((p.subcategory, p.colour, p.brand, p.composition) for p in truth)
    return {"errors": len(differing), "queries": len(top),
            "by_count": dict(collections.Counter(len(d) for d in differing)),
            "differs": {a: sum(a in d for d in differing) for a in ATTRIBUTES},
            "only": {a: sum(d == [a] for d in differing) for a in ATTRIBUTES},
            # products whose gallery also holds one that differs only in the small details (season, mark place)
            "detail_twins": sum(visible[(p.subcategory, p.colour, p.brand, p.composition)] > 1 for p in truth)}


@torch.no_grad()
def mechanism(encoder, data, device, batch: int = 64, mark_cell: float = MARK_CELL) -> dict:
    """Per entity: regional InfoNCE on validation batches (chance: ln(batch)). Per fusion block, where the
    entity's selection tokens land: the share on a patch holding its detail (brand: the mark; season: the
    hang-tag) against the share of patches that hold it, the share on pure background (no garment pixel, no detail)
    against the background's share of patches, how many distinct patches an image's tokens pick, how often two
    tokens of different entities pick the same patch, the share of all picks on the one grid position picked
    most (high: tokens picking a place whatever the image shows), and what the model reads through the block's
    picks: T2I R@1 and the regional losses with them replaced by random patches (:func:`random_picks`)."""
    from e2_core.data import E2Collate

    encoder.eval().to(device)
    model = encoder.model
    collate = E2Collate(encoder.tokenizer, data.spec)
    products = catalog(0)
    per_entity, num_tokens = model.config.tokens_per_entity, model.config.num_tokens
    losses = {e: [] for e in model.entities}
    blocks = [{"detail": {e: [0, 0] for e in DETAILS}, "background": {e: [0, 0] for e in model.entities},
               "distinct": [], "shared": [0, 0], "positions": collections.Counter()} for _ in range(2)]
    entity = torch.arange(num_tokens) // per_entity
    other_entity = entity[:, None] != entity[None, :]  # token pairs of different entities
    chance = {e: [0, 0] for e in (*DETAILS, "background")}
    # how often a training pass (Gumbel noise 1) picks evaluation's patch: softmax(logits)'s largest probability
    agreement = [[] for _ in model.visual.fusion]
    hooks = [block.register_forward_hook(lambda block, args, out, seen=seen: seen.append(
        out[2].float().softmax(-1).amax(-1).mean().item())) for block, seen in zip(model.visual.fusion, agreement)]
    for start in range(0, len(data) - batch + 1, batch):
        b = collate([data[i] for i in range(start, start + batch)]).to(device)
        vision = model.encode_image_regions(b.images, normalize=True)  # one pass: features and selections
        for entity, loss in batch_regional_losses(model, b, vision.regional_features).items():
            losses[entity].append(loss)
        picked = vision.selected_patches.cpu()  # (batch, block, token)
        for row, index in enumerate(b.indices):
            where = patch_regions(model, products[int(data.product_ids[index])], mark_cell)
            for name, mask in where.items():
                _count(chance[name], mask)
            for block, tally in zip(picked[row], blocks):
                tally["distinct"].append(len(set(block.tolist())) / num_tokens)
                tally["positions"].update(block.tolist())
                _count(tally["shared"], (block[:, None] == block[None, :])[other_entity])
                for k, entity in enumerate(model.entities):
                    tokens = block[k * per_entity:(k + 1) * per_entity]
                    _count(tally["background"][entity], where["background"][tokens])
                    if entity in DETAILS:
                        _count(tally["detail"][entity], where[entity][tokens])
    for hook in hooks:
        hook.remove()
    with_random_picks = []
    for block in model.visual.fusion:
        with random_picks(block):
            with_random_picks.append({"t2i_r1": retrieval_r1(encoder, data, device, errors=False)["t2i_r1"],
                                      "regional_loss": regional_losses(model, data, collate, device, batch)})
    share = lambda counts: {e: h / max(n, 1) for e, (h, n) in counts.items()}  # noqa: E731
    per_block = [{"on_detail": share(t["detail"]), "on_background": share(t["background"]),
                  "distinct_share": statistics.mean(t["distinct"]), "training_pick_agrees": statistics.mean(seen),
                  "entity_pairs_sharing": t["shared"][0] / max(t["shared"][1], 1),
                  "top_position_share": max(t["positions"].values()) / sum(t["positions"].values()),
                  "random_picks": random_t}
                 for t, seen, random_t in zip(blocks, agreement, with_random_picks)]
    return {"regional_loss": {e: statistics.mean(v) for e, v in losses.items()}, "loss_chance": math.log(batch),
            "selection_hit_rate": per_block[1]["on_detail"], "selection_chance": share(chance),
            "blocks": per_block, "layers": patch_contents(encoder, data, device, mark_cell=mark_cell)}


@torch.no_grad()
def regional_losses(model, data, collate, device, batch: int = 64) -> dict:
    """Per entity: the regional InfoNCE loss, mean over the validation batches (chance: ln(batch))."""
    losses = {e: [] for e in model.entities}
    for start in range(0, len(data) - batch + 1, batch):
        b = collate([data[i] for i in range(start, start + batch)]).to(device)
        regional = model.encode_image_regions(b.images, normalize=True).regional_features
        for entity, loss in batch_regional_losses(model, b, regional).items():
            losses[entity].append(loss)
    return {e: statistics.mean(v) for e, v in losses.items()}


def batch_regional_losses(model, b, regional: torch.Tensor) -> dict:
    """Per entity: the regional InfoNCE loss of one collated batch ``b`` whose regional embeddings are ``regional``."""
    entity_text = model.encode_entity_text(b.entity_text, normalize=True)
    return {entity: contrastive_loss(regional[:, k], entity_text[:, k], model.logit_scale.exp()).item()
            for k, entity in enumerate(model.entities)}


@contextlib.contextmanager
def random_picks(block, seed: int = 0):
    """Within: fusion ``block`` joins each token with a uniformly random patch of its image instead of the one it
    picks (the logits it returns, which a later block may carry, stay its own). What a model loses then is what
    it reads through that block's picks."""
    generator, own = torch.Generator().manual_seed(seed), block.forward

    def forward(tokens, patches, prior=None):
        logits = own(tokens, patches, prior)[2]
        index = torch.randint(patches.shape[1], tokens.shape[:2], generator=generator).to(patches.device)
        return block.fuse(tokens, patches_at(patches, index)), index, logits

    block.forward = forward
    try:
        yield
    finally:
        del block.forward


@torch.no_grad()
def patch_contents(encoder, data, device, images: int = 512, batch: int = 64, mark_cell: float = MARK_CELL) -> list:
    """What a patch's state holds after each layer before fusion block 2: how often the brand of the nearest
    other image's state (cosine, mean-centred) is the image's own brand, for a patch on the mark and for a
    background patch (chance 1/32), and how alike an image's patches are (mean pairwise cosine)."""
    model = encoder.model
    products, num_tokens = catalog(0), model.config.num_tokens
    states, brands = collections.defaultdict(list), []
    for start in range(0, min(images, len(data)), batch):
        indices = range(start, min(images, len(data), start + batch))
        hidden = model.visual.forward_features(torch.stack([data[i].image for i in indices]).to(device),
                                               output_hidden_states=True).hidden_states
        for row, index in enumerate(indices):
            product = products[int(data.product_ids[index])]
            where = patch_regions(model, product, mark_cell)
            brands.append(product.brand)
            for layer in range(1, model.visual.fusion_layers[1] + 1):
                patches = F.normalize(hidden[layer][row, num_tokens + 1:].float().cpu(), dim=-1)
                states[layer, "mark"].append(patches[where["brand"].nonzero()[0, 0]])
                states[layer, "background"].append(patches[where["background"].nonzero()[0, 0]])
                n = len(patches)
                states[layer, "cosine"].append(((patches @ patches.T).sum() - n) / (n * (n - 1)))
    brands = torch.tensor(brands)

    def nearest_same_brand(rows):
        x = torch.stack(rows)
        x = F.normalize(x - x.mean(dim=0), dim=-1)
        similarity = (x @ x.T).fill_diagonal_(-2)
        return (brands[similarity.argmax(dim=1)] == brands).float().mean().item()

    return [{"layer": layer, "brand_from_mark_patch": nearest_same_brand(states[layer, "mark"]),
             "brand_from_background_patch": nearest_same_brand(states[layer, "background"]),
             "patch_cosine": torch.stack(states[layer, "cosine"]).mean().item()}
            for layer in range(1, model.visual.fusion_layers[1] + 1)]


def patch_regions(model, product, mark_cell: float = MARK_CELL) -> dict:
    """Boolean masks over the patch grid of a product's first view: patches on the brand mark, on the season's
    hang-tag, and on pure background (no garment pixel, no detail)."""
    grid, geometry = model.visual.grid_size, layout(product, 0, mark_cell=mark_cell)
    scale = geometry.size / model.visual.image_size[0]
    boxes = model.visual.patch_boxes(torch.arange(grid[0] * grid[1])).float() * scale
    regions = {"brand": _overlaps(boxes, geometry.mark_box), "season": _overlaps(boxes, geometry.tag_box)}
    garment = torch.from_numpy(np.array(garment_mask(product, geometry).resize((grid[1], grid[0]), Image.BOX)))
    regions["background"] = (garment.flatten() == 0) & ~regions["brand"] & ~regions["season"]
    return regions


def _count(counts: list, hits: torch.Tensor) -> None:
    counts[0] += int(hits.sum())
    counts[1] += len(hits)


#: the entities whose detail the generator draws in a known place: the brand mark and the season's hang-tag
DETAILS = ("brand", "season")


PROBED = {"brand": None, "season": tuple(SEASONS), "composition": tuple(COMPOSITIONS), "mark_place": MARK_PLACES,
          "colour": tuple(COLOURS)}


def detail_probe(encoder, data, device, products: int = 200, seed: int = 0, **look) -> dict:
    """Per attribute: the share of products whose text scores their own image above a rendering of the
    same product with only that attribute changed (first view; chance 50%). ``look``: the generator's
    mark settings the data was rendered with."""
    rng = random.Random(f"probe:{seed}")
    everything, num_brands = catalog(0), len(brand_names())

    def cases():
        for i in range(min(products, len(data))):
            product = everything[int(data.product_ids[i])]
            changed = {}
            for attribute, values in PROBED.items():
                choices = [b for b in range(num_brands) if b != product.brand] if values is None else \
                    [v for v in values if v != getattr(product, attribute)]
                changed[attribute] = render(replace(product, **{attribute: rng.choice(choices)}), 0, **look)
            # its own image rendered like the counterfactuals
            yield data.text(i), render(product, 0, **look), changed

    return probe_wins(encoder, device, cases())


@torch.no_grad()
def probe_wins(encoder, device, cases) -> dict:
    """``cases``: (text, its own image, {attribute: the same with only that attribute changed}). Per attribute,
    the % of cases whose text scores its own image higher (chance 50%)."""
    encoder.eval().to(device)
    wins, n = collections.Counter(), 0
    for text, own, changed in cases:
        query = encoder.encode_text(encoder.tokenizer([text]).to(device), normalize=True)
        images = torch.stack([encoder.preprocess(image) for image in (own, *changed.values())]).to(device)
        scores = (encoder.encode_image(images, normalize=True) @ query.T).flatten()
        wins.update(attribute for k, attribute in enumerate(changed, start=1) if scores[0] > scores[k])
        n += 1
        attributes = list(changed)
    return {attribute: 100.0 * wins[attribute] / n for attribute in attributes}


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


def _or_nan(value):
    return math.nan if value is None else value


def mean_se(values):
    if any(math.isnan(v) for v in values):  # a score the data could not give (sample-100 on small groups)
        return math.nan, math.nan
    return statistics.mean(values), (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


E2CONFIG_LEVERS = ("token_attention", "tokens_per_entity", "fusion_layers", "pick_carry", "centre_positions")  # the levers that shape the step-0 model too


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="default: the demo encoders' folder, whose seed-0 runs it shares")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model", default=DEMO.model)
    parser.add_argument("--pretrain-steps", type=int, default=DEMO.pretrain_steps)
    parser.add_argument("--finetune-steps", type=int, default=DEMO.finetune_steps)
    parser.add_argument("--batch-size", type=int, default=DEMO.batch_size)
    parser.add_argument("--variant", default="", help="name of an E2 variant (its runs go to OUT/e2-VARIANT)")
    parser.add_argument("--token-attention", choices=TOKEN_ATTENTION, default=None, help="E2 variant lever")
    parser.add_argument("--tokens-per-entity", type=int, default=None, help="E2 variant lever (default 2)")
    parser.add_argument("--global-weight", type=float, default=None, help="E2 variant lever (training default 0.8)")
    parser.add_argument("--entity-weights", default=None,
                        help="E2 variant lever: regional loss weights NAME=W,... (training default: all 1)")
    parser.add_argument("--fusion-layers", type=int, nargs=2, default=None,
                        help="E2 variant lever: ViT layers before fusion block 1 and block 2 (demo model: 4 5)")
    parser.add_argument("--gumbel-tau", type=float, nargs=2, default=None, metavar=("START", "END"),
                        help="E2 variant lever: the selection's Gumbel temperature schedule (default 2.0 0.5)")
    parser.add_argument("--pick-carry", type=float, default=None,
                        help="E2 variant lever: fusion block 2 picks from its logits plus this times block 1's "
                             "(default 0)")
    parser.add_argument("--centre-positions", action="store_const", const=True, default=None,
                        help="E2 variant lever: the selection logits read each patch less its position's mean over "
                             "the images")
    parser.add_argument("--patch-sharing-weight", type=float, default=None,
                        help="E2 variant lever: penalty on different entities' tokens picking one patch (default 0)")
    parser.add_argument("--fade-patches", action="store_const", const=True, default=None,
                        help="E2 variant lever: the last layers see the patches, faded out over stage 1")
    parser.add_argument("--stage2-new-lr", type=float, default=DEMO.stage2_new_lr,
                        help="E2 variant lever: learning rate of E2's added parts in stage 2 (default: the demo "
                             "recipe's; the rest's when it has none)")
    parser.add_argument("--gumbel-noise-end", type=float, default=DEMO.gumbel_noise_end,
                        help="E2 variant lever: Gumbel noise of the training's patch picks at the end of each stage "
                             "(default: the demo recipe's, 0: ends on the argmax pick evaluation makes; 1: sampling "
                             "throughout)")
    parser.add_argument("--equal-budget", action="store_true",
                        help="E2 variant lever: stage 1 within the fine-tuning steps instead of on top of them")
    parser.add_argument("--no-control", dest="control", action="store_false",
                        help="skip the control: CLIP-FT with E2's entity texts and regional losses on its image "
                             "embedding (method clip-ft-entities; the variant's global and entity weights)")
    parser.add_argument("--mark-cell", type=float, default=MARK_CELL,
                        help=f"the brand mark's cell side, a share of the image side (default {MARK_CELL}, the "
                             "generator's)")
    parser.add_argument("--mark-ink", choices=["brand", "one"], default="brand",
                        help="'one': every brand's mark in the same black on white, its pattern alone names the "
                             "brand. Either mark setting away from its default fine-tunes and scores every model on "
                             "products rendered so (the same products), in OUT/mark-CELL-INK, from the same start")
    parser.add_argument("--step0-only", action="store_true",
                        help="score the step-0 models (retrieval, detail probe) and train nothing")
    parser.add_argument("--probe-products", type=int, default=200)
    parser.add_argument("--compare", nargs="+", metavar="VARIANT", default=None,
                        help="print one row per E2 variant ('' or e2: the default) from the runs already in OUT "
                             "(retrieval, lead over CLIP-FT, where each block's tokens land) and train nothing")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    device = str(e2_core.runtime.resolve_device(args.device))
    recipe = replace(DEMO, model=args.model, pretrain_steps=args.pretrain_steps, finetune_steps=args.finetune_steps,
                     batch_size=args.batch_size)
    out = Path(args.out) if args.out else demo_root(recipe)
    common = dict(device=args.device, workers=args.workers)
    if args.compare:
        return compare_variants(out, [f"e2-{v}" if v not in ("", "e2") else "e2" for v in args.compare], args.seeds)
    tau = dict(zip(("gumbel_tau", "gumbel_tau_end"), args.gumbel_tau or (None, None)))
    levers = {k: v for k, v in (("token_attention", args.token_attention), ("global_weight", args.global_weight),
                                ("entity_weights", args.entity_weights), ("tokens_per_entity", args.tokens_per_entity),
                                ("fusion_layers", args.fusion_layers), ("pick_carry", args.pick_carry), *tau.items(),
                                ("centre_positions", args.centre_positions),
                                ("patch_sharing_weight", args.patch_sharing_weight),
                                ("fade_patches", args.fade_patches))
              if v is not None}
    e2_kind = f"e2-{args.variant}" if args.variant else "e2"
    start = pretrain_clip(recipe, out / "pretrain", out / "synthetic-pretrain", **common)
    data_root = default_synthetic_root("small", 0)
    look = dict(mark_cell=args.mark_cell, mark_ink=args.mark_ink)
    if look == dict(mark_cell=MARK_CELL, mark_ink="brand"):
        registry.get_dataset("synthetic").prepare(str(data_root))  # the products, generated once
    else:  # the same products with other marks, and runs of their own
        data_root = data_root.with_name(f"{data_root.name}-mark-{args.mark_cell}-{args.mark_ink}")
        out = out / f"mark-{args.mark_cell}-{args.mark_ink}"
        if not (data_root / "synthetic.json").is_file():
            write_fashiongen(data_root, "small", progress=True, **look)
    results = {"recipe": recipe.__dict__, "look": look,
               "variant": {"name": e2_kind, **levers, "equal_budget": args.equal_budget,
                           "stage2_new_lr": args.stage2_new_lr, "gumbel_noise_end": args.gumbel_noise_end},
               "runs": {}}
    weights = {k: v for k, v in levers.items() if k in ("global_weight", "entity_weights")}
    kinds = ("clip-ft", CONTROL + (f"-{args.variant}" if weights else ""), e2_kind) if args.control else \
        ("clip-ft", e2_kind)
    starts = {}  # kind -> its step-0 model, the validation data as it reads them, their step-0 scores and probe
    for kind in kinds:
        torch.manual_seed(0)  # the step-0 E2's new parts
        # the step-0 model; for E2 drawn as the trainer draws it (seed 0: the CLIP, then E2's new parts)
        initial = e2_core.load_encoder(start) if kind != e2_kind else e2_core.Encoder(
            e2_core.create_e2(pretrained=str(start), **{k: v for k, v in levers.items() if k in E2CONFIG_LEVERS}),
            arch=args.model)
        val = open_dataset("synthetic", str(data_root), "validation", transform=initial.preprocess)
        if kind == e2_kind or kind == kinds[0]:  # CLIP-FT and the control start from the same CLIP
            step0 = retrieval_r1(initial, val, device)
            probe0 = detail_probe(initial, val, device, args.probe_products, **look)  # the same for every seed
        starts[kind] = initial, val, step0, probe0
        if args.step0_only:
            print(f"{kind}, step 0: T2I R@1 {step0['t2i_r1']:.1f}, I2T R@1 {step0['i2t_r1']:.1f}; detail probe "
                  + ", ".join(f"{a} {v:.1f}%" for a, v in probe0.items()), flush=True)
    if args.step0_only:
        return
    for seed in args.seeds:  # seed by seed: an interrupted benchmark leaves whole seeds
        for kind in kinds:
            initial, val, step0, probe0 = starts[kind]
            key = f"{kind}/seed{seed}"
            result_file = out / kind / f"seed{seed}-results.json"
            run = out / kind / f"seed{seed}"
            if kind == "clip-ft":  # a finished run returns at once
                best = finetune(kind, replace(recipe, seed=seed), start, run, data_root, **common)
            elif kind != e2_kind:  # the control: CLIP-FT's recipe with E2's entity losses
                best = finetune(CONTROL, replace(recipe, seed=seed), start, run, data_root, **common, **weights)
            else:
                best = finetune("e2", replace(recipe, seed=seed, stage1_on_top=not args.equal_budget,
                                              stage2_new_lr=args.stage2_new_lr,
                                              gumbel_noise_end=args.gumbel_noise_end), start, run,
                                data_root, **common, **levers)
            model = e2_core.load_encoder(best)
            if result_file.is_file():
                record = json.loads(result_file.read_text())
                if "probe" not in record:  # measured before the probe existed
                    record["probe"] = detail_probe(model, val, device, args.probe_products, **look)
                    record["probe_step0"] = probe0
                if not {"t2i_errors", "sample100_sumr"} <= set(record["final"]):  # measured before these existed
                    record["final"] = retrieval_r1(model, val, device)
                if kind == e2_kind and "random_picks" not in record["mechanism"].get("blocks", [{}])[0]:
                    # measured before the picks' reliance (or the top position, the pairs sharing a patch...) existed
                    record["mechanism"] = mechanism(model, val, device, mark_cell=args.mark_cell)
                    record["mechanism_step0"] = mechanism(initial, val, device, mark_cell=args.mark_cell)
                result_file.write_text(json.dumps(record, indent=2))
                results["runs"][key] = record
                continue
            record = {"step0": step0, "final": retrieval_r1(model, val, device), "step_seconds": step_seconds(run),
                      "probe": detail_probe(model, val, device, args.probe_products, **look),
                      "probe_step0": probe0}
            if kind == e2_kind:
                record["mechanism"] = mechanism(model, val, device, mark_cell=args.mark_cell)
                record["mechanism_step0"] = mechanism(initial, val, device, mark_cell=args.mark_cell)
            result_file.parent.mkdir(parents=True, exist_ok=True)
            result_file.write_text(json.dumps(record, indent=2))
            results["runs"][key] = record
    report(results, args.seeds, len(val), e2_kind, kinds)
    (out / f"summary-{e2_kind}.json").write_text(json.dumps(results, indent=2))


def report(results: dict, seeds, n_val: int, e2_kind: str = "e2", kinds=("clip-ft", "e2")) -> None:
    runs = results["runs"]
    print(f"\n{n_val} validation products, seeds {seeds}, {results['recipe']['finetune_steps']} fine-tuning steps; "
          "mean ± standard error")
    retrieval_table(runs, kinds, seeds)
    leads(runs, seeds, e2_kind, kinds)
    e2_rows = [runs[f"{e2_kind}/seed{s}"] for s in seeds]
    mech = e2_rows[0]["mechanism"]
    print(f"\nE2 mechanism (seed {seeds[0]}); regional loss chance = ln(batch) = {mech['loss_chance']:.2f}")
    print("| entity | regional loss, step 0 | regional loss, final | selection on its detail (block 2), final "
          "| chance |")
    print("|---|---|---|---|---|")
    for entity, loss in mech["regional_loss"].items():
        before = e2_rows[0]["mechanism_step0"]["regional_loss"][entity]
        hit = mech["selection_hit_rate"].get(entity)
        hit_text = f"{100 * hit:.1f}%" if hit is not None else "-"
        chance = mech["selection_chance"].get(entity)
        chance_text = f"{100 * chance:.1f}%" if chance is not None else "-"
        print(f"| {entity} | {before:.2f} | {loss:.2f} | {hit_text} | {chance_text} |")
    chance = mech["selection_chance"]
    print(f"\nWhere the selection tokens land, per fusion block (seeds {seeds}, mean ± standard error): on the "
          f"entity's detail (chance: mark {100 * chance['brand']:.1f}%, tag {100 * chance['season']:.1f}%), on pure "
          f"background (chance {100 * chance['background']:.1f}%), distinct patches per image / tokens, token pairs of "
          "different entities on one patch, how often a training pass (Gumbel noise 1) picks evaluation's patch, "
          "the share of picks on the grid position picked most, and with the block's picks replaced by random "
          "patches: T2I R@1 and the brand's regional loss")
    print("| model | block | " + " | ".join(f"{e} on its detail" for e in DETAILS) + " | "
          + " | ".join(f"{e} on background" for e in mech["regional_loss"]) + " | distinct patches | entities "
          "sharing a patch | training pick = evaluation's | picks on the top position | T2I R@1, picks random | "
          "brand loss, picks random |")
    print("|---|---|" + "---|" * (len(DETAILS) + len(mech["regional_loss"]) + 6))
    for label, field in (("step 0", "mechanism_step0"), ("final", "mechanism")):
        blocks = [r[field]["blocks"] for r in e2_rows]
        for b in range(2):
            cells = [mean_se([100 * x[b]["on_detail"][e] for x in blocks]) for e in DETAILS]
            cells += [mean_se([100 * x[b]["on_background"][e] for x in blocks]) for e in mech["regional_loss"]]
            cells.append(mean_se([100 * x[b]["distinct_share"] for x in blocks]))
            cells.append(mean_se([100 * x[b]["entity_pairs_sharing"] for x in blocks]))
            cells.append(mean_se([100 * x[b]["training_pick_agrees"] for x in blocks]))
            cells.append(mean_se([100 * x[b]["top_position_share"] for x in blocks]))
            t2i = mean_se([x[b]["random_picks"]["t2i_r1"] for x in blocks])
            brand = mean_se([x[b]["random_picks"]["regional_loss"]["brand"] for x in blocks])
            print(f"| E2, {label} | {b + 1} | " + " | ".join(f"{m:.1f} ± {e:.1f}%" for m, e in cells)
                  + f" | {t2i[0]:.1f} ± {t2i[1]:.1f} | {brand[0]:.2f} ± {brand[1]:.2f} |")
    print(f"\nWhat a patch's state holds after each layer up to fusion block 2 (seeds {seeds}): how often the nearest "
          "other image's state has the same brand (chance 3.1%), for a patch on the mark and a background patch; "
          "how alike an image's patches are (mean cosine)")
    print("| model | layer | brand from a mark patch | brand from a background patch | patch cosine |")
    print("|---|---|---|---|---|")
    for label, field in (("step 0", "mechanism_step0"), ("final", "mechanism")):
        for layers in zip(*(r[field]["layers"] for r in e2_rows)):
            cells = [mean_se([100 * x[key] for x in layers]) for key in ("brand_from_mark_patch",
                                                                        "brand_from_background_patch")]
            cosine = mean_se([x["patch_cosine"] for x in layers])
            print(f"| E2, {label} | {layers[0]['layer']} | " + " | ".join(f"{m:.1f} ± {e:.1f}%" for m, e in cells)
                  + f" | {cosine[0]:.2f} ± {cosine[1]:.2f} |")
    print(f"\nDetail probe (seeds {seeds}): % of products whose text ranks their image above the same product "
          "with one attribute changed (chance 50%)")
    probe_table(runs, kinds, seeds, PROBED)
    first = runs[f"clip-ft/seed{seeds[0]}"]["final"]["t2i_errors"]
    print(f"\nWrong T2I top-1 (seeds {seeds}, summed): how many attributes the retrieved product gets wrong, and the "
          f"share of errors where each differs (alone); {first['detail_twins']} of {first['queries']} queries "
          "have a gallery twin that differs only in season and/or mark place")
    print("| model | errors | mean attributes wrong | " + " | ".join(ATTRIBUTES) + " |")
    print("|---|---|---|" + "---|" * len(ATTRIBUTES))
    for kind in kinds:
        errors = [runs[f"{kind}/seed{s}"]["final"]["t2i_errors"] for s in seeds]
        total = sum(e["errors"] for e in errors)
        wrong = sum(int(n) * c for e in errors for n, c in e["by_count"].items()) / max(total, 1)
        cells = [f"{100 * sum(e['differs'][a] for e in errors) / max(total, 1):.0f}% "
                 f"({100 * sum(e['only'][a] for e in errors) / max(total, 1):.0f}%)" for a in ATTRIBUTES]
        print(f"| {kind} | {total} | {wrong:.2f} | " + " | ".join(cells) + " |")



def compare_variants(out: Path, kinds, seeds) -> None:
    """One row per E2 variant from its saved results (``OUT/KIND/seedS-results.json``): T2I / I2T R@1, the lead over
    CLIP-FT, and per fusion block where its tokens land (mean ± standard error over ``seeds``)."""
    load = lambda kind, seed: json.loads((out / kind / f"seed{seed}-results.json").read_text())  # noqa: E731
    clip = [load("clip-ft", s)["final"]["t2i_r1"] for s in seeds]
    chance = load(kinds[0], seeds[0])["mechanism"]["selection_chance"]
    print(f"{seeds}: mean ± standard error; chance: brand on the mark {100 * chance['brand']:.1f}%, season on the "
          f"tag {100 * chance['season']:.1f}%")
    print("| E2 variant | T2I R@1 | I2T R@1 | E2 − CLIP-FT, T2I (per seed) | block | brand on the mark | season on the "
          "tag | distinct patches / tokens | token pairs of different entities on one patch | picks on the top "
          "position | T2I R@1, this block's picks random |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for kind in kinds:
        rows = [load(kind, s) for s in seeds]
        t2i, i2t = (mean_se([r["final"][k] for r in rows]) for k in ("t2i_r1", "i2t_r1"))
        gaps = [r["final"]["t2i_r1"] - c for r, c in zip(rows, clip)]
        lead = mean_se(gaps)
        for b in range(2):
            blocks = [r["mechanism"]["blocks"][b] for r in rows]
            cells = [mean_se([100 * x["on_detail"][e] for x in blocks]) for e in DETAILS]
            cells.append(mean_se([100 * x["distinct_share"] for x in blocks]))
            cells.append(mean_se([100 * x.get("entity_pairs_sharing", math.nan) for x in blocks]))
            cells.append(mean_se([100 * x.get("top_position_share", math.nan) for x in blocks]))
            shuffled = mean_se([x.get("random_picks", {}).get("t2i_r1", math.nan) for x in blocks])
            head = (f"| {kind} | {t2i[0]:.1f} ± {t2i[1]:.1f} | {i2t[0]:.1f} ± {i2t[1]:.1f} | {lead[0]:+.1f} ± "
                    f"{lead[1]:.1f} ({', '.join(f'{g:+.1f}' for g in gaps)}) |") if b == 0 else "| | | | |"
            print(head + f" {b + 1} | " + " | ".join(f"{m:.1f} ± {e:.1f}%" for m, e in cells)
                  + f" | {shuffled[0]:.1f} ± {shuffled[1]:.1f} |")


def retrieval_table(runs: dict, kinds, seeds) -> None:
    """Per model: T2I / I2T R@1 and sample-100 SumR (mean ± standard error over ``seeds``), T2I R@1 at step 0 and
    the gain since, and the training-step time."""
    print("| model | T2I R@1 | I2T R@1 | sample-100 SumR | T2I R@1 at step 0 | T2I gain since step 0 | step time (s) |")
    print("|---|---|---|---|---|---|---|")
    for kind in kinds:
        rows = [runs[f"{kind}/seed{s}"] for s in seeds]
        cells = [mean_se([_or_nan(r["final"][k]) for r in rows]) for k in ("t2i_r1", "i2t_r1", "sample100_sumr")]
        step0 = rows[0]["step0"]["t2i_r1"]
        gain = mean_se([r["final"]["t2i_r1"] - step0 for r in rows])
        seconds = statistics.mean(r["step_seconds"] for r in rows)
        print(f"| {kind} | " + " | ".join(f"{m:.1f} ± {e:.1f}" for m, e in cells) + f" | {step0:.1f} | "
              f"{gain[0]:+.1f} ± {gain[1]:.1f} | {seconds:.2f} |")


def leads(runs: dict, seeds, e2_kind: str, kinds, t2i_target: float = 5) -> None:
    """E2 − CLIP-FT (per seed, then mean ± standard error) against its targets, and E2 − each control."""
    e2_rows = [runs[f"{e2_kind}/seed{s}"] for s in seeds]
    clip_rows = [runs[f"clip-ft/seed{s}"] for s in seeds]
    gap = mean_se([e["final"]["t2i_r1"] - c["final"]["t2i_r1"] for e, c in zip(e2_rows, clip_rows)])
    ratio = statistics.mean(e["step_seconds"] for e in e2_rows) / statistics.mean(c["step_seconds"] for c in clip_rows)
    gap_i2t = mean_se([e["final"]["i2t_r1"] - c["final"]["i2t_r1"] for e, c in zip(e2_rows, clip_rows)])
    gap_s100 = mean_se([_or_nan(e["final"]["sample100_sumr"]) - _or_nan(c["final"]["sample100_sumr"])
                        for e, c in zip(e2_rows, clip_rows)])
    per_seed = ", ".join(f"{e['final']['t2i_r1'] - c['final']['t2i_r1']:+.1f}" for e, c in zip(e2_rows, clip_rows))
    print(f"\nE2 - CLIP-FT, T2I R@1: {gap[0]:+.1f} ± {gap[1]:.1f} (per seed {per_seed}; target >= +{t2i_target:g}); "
          f"I2T R@1: {gap_i2t[0]:+.1f} ± {gap_i2t[1]:.1f} (target >= 0); sample-100 SumR: {gap_s100[0]:+.1f} ± "
          f"{gap_s100[1]:.1f} (target >= 0); step time E2 / CLIP-FT: {ratio:.2f} (target <= 1.25)")
    for control in kinds[1:-1]:  # E2 against CLIP-FT given the same entity supervision
        control_rows = [runs[f"{control}/seed{s}"] for s in seeds]
        lead = mean_se([e["final"]["t2i_r1"] - c["final"]["t2i_r1"] for e, c in zip(e2_rows, control_rows)])
        lead_i2t = mean_se([e["final"]["i2t_r1"] - c["final"]["i2t_r1"] for e, c in zip(e2_rows, control_rows)])
        print(f"E2 - {control} (the control), T2I R@1: {lead[0]:+.1f} ± {lead[1]:.1f} (target >= +3); I2T R@1: "
              f"{lead_i2t[0]:+.1f} ± {lead_i2t[1]:.1f}")


def probe_table(runs: dict, kinds, seeds, attributes) -> None:
    """The detail probe's wins per attribute (mean ± standard error over ``seeds``), at step 0 and at the end."""
    print("| model | " + " | ".join(attributes) + " |")
    print("|---|" + "---|" * len(attributes))
    for kind in kinds:
        rows = [runs[f"{kind}/seed{s}"] for s in seeds]
        for label, field in (("step 0", "probe_step0"), ("final", "probe")):
            cells = [mean_se([r[field][a] for r in rows]) for a in attributes]
            print(f"| {kind}, {label} | " + " | ".join(f"{m:.1f} ± {e:.1f}" for m, e in cells) + " |")


if __name__ == "__main__":
    main()
