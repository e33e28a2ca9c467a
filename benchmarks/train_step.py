"""Training-step time of E2 (global + 5 regional losses) vs CLIP fine-tuning, same backbone and batch.

Each repeat times one CLIP-FT step, one E2 step (forward, loss, backward, Adam) and one E2 step with its
entity strings encoded as one batch padded to the longest (instead of length buckets), side by side.

    python benchmarks/train_step.py --model ViT-B-32 --batch-size 64

``--pick-carry W`` adds an E2 whose fusion block 2 picks with block 1's logits carried (``E2Config.pick_carry``).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics

import open_clip
import torch

import e2_core
from e2_core.model import text_tower
from e2_core.runtime import autocast, resolve_device

from encode_throughput import quartiles, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="amp", choices=["amp", "amp_fp16", "fp32"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--pick-carry", type=float, default=None, help="also time an E2 with this pick carry")
    parser.add_argument("--json", default=None)
    parser.add_argument("--profile", default=None, help="write a torch.profiler table of one step per model here")
    args = parser.parse_args()

    device = resolve_device(args.device)
    torch.manual_seed(0)
    clip = open_clip.create_model(args.model, output_dict=True).to(device).train()
    e2 = e2_core.E2Model(copy.deepcopy(clip), e2_core.E2Config(), args.model).to(device).train()
    models = {"E2": e2, "E2, one entity batch": e2}
    carry = None if args.pick_carry is None else f"E2, pick carry {args.pick_carry:g}"
    if carry:
        models[carry] = e2_core.E2Model(copy.deepcopy(clip), e2_core.E2Config(pick_carry=args.pick_carry),
                                        args.model).to(device).train()
    b = args.batch_size
    images = torch.randn(b, 3, *clip.visual.image_size, device=device)
    tokenizer = e2_core.get_tokenizer(args.model)
    tags = [dict(subcategory=["SHIRTS", "JEANS", "DRESSES"][i % 3], brand=f"Brand {i % 17}",
                 description=f"Long sleeve shirt number {i} with a small embroidered logo at the chest.",
                 season=["FW2016", "SS2017"][i % 2], composition=["100% cotton", "wool blend"][i % 2])
            for i in range(b)]
    texts = [e2_core.build_texts(t) for t in tags]
    text = e2_core.trim_padding(tokenizer([g for g, _ in texts])).to(device)  # both models get trimmed tokens
    entity_text = e2_core.tokenize_entities(tokenizer, [e for _, e in texts]).to(device)
    # the same strings as one batch padded to the longest (before length buckets): the lever measured alongside
    one_batch = e2_core.EntityTokens(entity_text.tokens, entity_text.index)

    clip_loss = open_clip.ClipLoss()
    e2_loss = e2_core.RegionalContrastiveLoss(e2.entities)
    fused = device.type == "cuda"
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=1e-6, fused=fused)
                  for name, m in {"CLIP-FT": clip, **models}.items()}

    def step(name):
        with autocast(device, args.precision):
            if name == "CLIP-FT":
                loss = clip_loss(clip.encode_image(images, normalize=True),
                                 text_tower(clip, text, normalize=True), clip.logit_scale.exp())
            else:
                entities = one_batch if name == "E2, one entity batch" else entity_text
                loss = e2_loss(**models[name](images, text, entities))["loss"]
        optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[name].step()

    seconds = {name: [] for name in optimizers}
    for repeat in range(args.warmup + args.repeats):
        for name in seconds:
            elapsed = timed(lambda: step(name), device)
            if repeat >= args.warmup:
                seconds[name].append(elapsed)
    median = {name: statistics.median(v) for name, v in seconds.items()}
    unbucketed = median["E2, one entity batch"] / median["CLIP-FT"]
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        with open(args.profile, "w") as f:
            for name in seconds:
                with profile(activities=activities) as prof:
                    timed(lambda: step(name), device)
                f.write(f"== {name}\n{prof.key_averages().table(sort_by=sort, row_limit=25)}\n")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    precision = args.precision if device.type == "cuda" else "fp32"
    ratio = median["E2"] / median["CLIP-FT"]
    low, _, high = quartiles([e / c for c, e in zip(seconds["CLIP-FT"], seconds["E2"])])
    print(f"{args.model}, batch {b}, {where}, {precision}: step CLIP-FT {1000 * median['CLIP-FT']:.1f} ms, "
          f"E2 {1000 * median['E2']:.1f} ms, E2 / CLIP-FT = {ratio:.3f} (medians of {args.repeats}; "
          f"per-repeat ratios {low:.3f}-{high:.3f}, quartiles); with the entity strings as one padded batch "
          f"{1000 * median['E2, one entity batch']:.1f} ms, {unbucketed:.3f}")
    if carry:
        carry_low, _, carry_high = quartiles([c / e for e, c in zip(seconds["E2"], seconds[carry])])
        print(f"{carry}: {1000 * median[carry]:.1f} ms, / E2 = {median[carry] / median['E2']:.3f} "
              f"(per-repeat ratios {carry_low:.3f}-{carry_high:.3f}, quartiles)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "batch_size": b, "device": where, "precision": precision,
                       "clip_ft_s": median["CLIP-FT"], "e2_s": median["E2"], "ratio": ratio,
                       "repeat_ratio_quartiles": [low, high], "one_entity_batch_ratio": unbucketed,
                       **({"pick_carry": args.pick_carry, "pick_carry_s": median[carry]}
                          if carry else {})}, f, indent=2)


if __name__ == "__main__":
    main()
