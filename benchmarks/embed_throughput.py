"""Catalog embedding throughput (the embed task: JPEG files decoded by worker processes, encoded, written
as shards) against the encoder's forward pass alone on ready tensors, at the same batch size.

The catalog is ``--images`` JPEG files of ``--image-size`` pixels (smooth colour fields with noise, so
they compress like photos), written once into a temporary folder. The embed side runs the task's own
code path (``DataLoader`` workers, ``encode_image``, ``ShardedRun``) after the encoder is loaded; the
forward side calls ``encode_image`` on random tensors of the preprocessed size, the same number of
batches. Random weights; the two alternate ``--repeats`` times, best of each.

    python benchmarks/embed_throughput.py --model ViT-B-32 --batch-sizes 16 32 --images 256 --workers 1
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import e2_core
from e2_core.runtime import autocast, resolve_device
from e2_embed import _image_batches, list_images
from e2_embed.shards import ShardedRun


def write_catalog(folder: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        corners = rng.integers(0, 256, (2, 2, 3)).astype(np.float32)
        t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
        field = (1 - t) * ((1 - t.transpose(1, 0, 2)) * corners[0, 0] + t.transpose(1, 0, 2) * corners[0, 1]) + \
            t * ((1 - t.transpose(1, 0, 2)) * corners[1, 0] + t.transpose(1, 0, 2) * corners[1, 1])
        pixels = np.clip(field + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--kind", default="e2", choices=["e2", "clip"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=1, help="the task's default on a CPU")
    parser.add_argument("--shard-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--fast-decode", action="store_true", help="the task's --fast-decode (JPEGs at reduced scale)")
    args = parser.parse_args()

    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = e2_core.create_e2(args.model) if args.kind == "e2" else __import__("open_clip").create_model(args.model)
    net = e2_core.as_encoder(model.to(device).eval())
    print(f"{net.label} {args.model} (random weights) on {device}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores; {args.images} JPEG files of {args.image_size} px, {args.workers} workers, "
          f"{'fast decode, ' if args.fast_decode else ''}best of {args.repeats}")
    print(f"{'batch':>6} {'forward img/s':>14} {'embed img/s':>12} {'embed / forward':>16}")
    with tempfile.TemporaryDirectory() as tmp:
        catalog = Path(tmp) / "catalog"
        catalog.mkdir()
        write_catalog(catalog, args.images, args.image_size)
        paths = list_images(catalog)
        size = net.image_size
        for batch_size in args.batch_sizes:
            pixels = torch.randn(batch_size, 3, *size, device=device)
            batches = -(-args.images // batch_size)
            forward = embedded = 0.0
            with torch.no_grad(), autocast(device):
                net.encode_image(pixels, normalize=True)                       # warm-up
                for repeat in range(args.repeats):                             # alternating, best of each
                    start = time.perf_counter()
                    for _ in range(batches):
                        net.encode_image(pixels, normalize=True).float().cpu()
                    forward = max(forward, batches * batch_size / (time.perf_counter() - start))

                    run = ShardedRun(Path(tmp) / f"out-{batch_size}-{repeat}", net, args.shard_size, batch_size,
                                     False, False, args.fast_decode)
                    start = time.perf_counter()
                    report = run.write("img", [str(p) for p in paths], catalog,
                                       lambda b: _image_batches(net, paths, b, False, False, args.workers, device,
                                                                args.fast_decode))
                    embedded = max(embedded, report["images"] / (time.perf_counter() - start))
            print(f"{batch_size:>6} {forward:>14.1f} {embedded:>12.1f} {embedded / forward:>16.3f}", flush=True)


if __name__ == "__main__":
    main()
