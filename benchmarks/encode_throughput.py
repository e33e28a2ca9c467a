"""Image and text encoding throughput of open_clip's CLIP vs E2 on the same backbone.

Both models share one set of CLIP weights; each repeat times CLIP then E2 back to back, so the
ratio is measured side by side in one run. GPU: AMP (bf16 where supported) by default.

    python benchmarks/encode_throughput.py --model ViT-B-32 --batch-size 32
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import open_clip
import torch

import e2_core
from e2_core.runtime import autocast, compiled, resolve_device


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def quartiles(values):
    """(first quartile, median, third quartile): the spread of the side-by-side ratios, which shows how
    much a shared machine moved them."""
    return tuple(statistics.quantiles(values, n=4)) if len(values) > 1 else (values[0],) * 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="amp", choices=["amp", "amp_fp16", "fp32"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="torch.compile every encoder (both models)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    device = resolve_device(args.device)
    torch.manual_seed(0)
    clip = open_clip.create_model(args.model).to(device).eval()
    e2 = e2_core.E2Model(copy.deepcopy(clip), e2_core.E2Config(), args.model).to(device).eval()
    size = clip.visual.image_size
    images = torch.randn(args.batch_size, 3, *size, device=device)
    tokenizer = e2_core.get_tokenizer(args.model)
    texts = tokenizer([f"100% cotton. SHIRTS. Brand {i}. FW2016. Long sleeve shirt with a small logo."
                       for i in range(args.batch_size)]).to(device)  # full context: E2 runs CLIP's text tower

    encoders = {("image", "CLIP"): clip.encode_image, ("image", "E2"): e2.encode_image,
                ("text", "CLIP"): clip.encode_text, ("text", "E2"): e2.encode_text}
    encoders = {key: compiled(fn, device, enabled=args.compile) for key, fn in encoders.items()}
    inputs = {"image": images, "text": texts}
    jobs = {key: (lambda fn=fn, x=inputs[key[0]]: fn(x)) for key, fn in encoders.items()}
    seconds = {key: [] for key in jobs}
    with torch.inference_mode(), autocast(device, args.precision):
        for repeat in range(args.warmup + args.repeats):
            for key, job in jobs.items():
                elapsed = timed(job, device)
                if repeat >= args.warmup:
                    seconds[key].append(elapsed)

    rate = {key: args.batch_size / statistics.median(values) for key, values in seconds.items()}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    precision = args.precision if device.type == "cuda" else "fp32"
    mode = "torch.compile" if args.compile else "eager"
    print(f"{args.model}, batch {args.batch_size}, {size[0]} px, {where}, {precision}, {mode}, "
          f"median of {args.repeats} repeats after {args.warmup} warm-up")
    print("| tower | CLIP items/s | E2 items/s | E2 / CLIP | per-repeat ratios, quartiles |")
    print("|---|---|---|---|---|")
    result = {"model": args.model, "batch_size": args.batch_size, "device": where, "precision": precision,
              "mode": mode}
    for tower in ("image", "text"):
        ratio = rate[(tower, "E2")] / rate[(tower, "CLIP")]
        low, _, high = quartiles([c / e for c, e in zip(seconds[(tower, "CLIP")], seconds[(tower, "E2")])])
        print(f"| {tower} | {rate[(tower, 'CLIP')]:.1f} | {rate[(tower, 'E2')]:.1f} | {ratio:.3f} | "
              f"{low:.3f}-{high:.3f} |")
        result[tower] = {"clip": rate[(tower, "CLIP")], "e2": rate[(tower, "E2")], "ratio": ratio,
                         "repeat_ratio_quartiles": [low, high]}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
