"""The ``embed`` task: encode images and texts with any encoder (E2 or CLIP), into one safetensors file or,
for a catalog, a folder of resumable ``.npy`` shards (:mod:`e2_embed.shards`)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import List, Optional, Tuple

from e2_core import load_encoder
from e2_core.embedding import image_batches, text_batches
from e2_core.errors import check_at_least
from e2_core.registry import Task
from e2_core.runtime import compiles, resolve_device

from .index import build_index, open_index
from .shards import EmbeddingShards, ShardedRun
from .single import SingleFile

log = logging.getLogger(__name__)

__all__ = ["EmbeddingShards", "build_index", "embed", "list_images", "open_index", "task"]

def list_images(images: Path, encoding: str = "utf-8", image_column: str = "image") -> List[Path]:
    """A folder (searched recursively), a catalog (CSV / JSONL: every row's ``image_column``) or a text
    file with one image path per line."""
    from e2_core.data.base import image_files
    from e2_core.data.catalog import CSV_SUFFIXES, JSON_SUFFIXES, catalog_images, image_path

    if images.is_dir():
        return image_files(images)
    if images.is_file() and images.suffix.lower() in CSV_SUFFIXES + JSON_SUFFIXES:
        return catalog_images(images, image_column, encoding)
    if images.is_file():
        return [image_path(line, images.parent, str(images)) for line in _read_lines(images, encoding)]
    raise FileNotFoundError(f"images={images}: no such folder or list file")


def embed(images: Optional[Path] = None, texts: Optional[Path] = None, encoder: str = "demo:e2",
          out: Path = Path("embeddings.safetensors"), batch_size: int = 64, device: str = "auto", regions: bool = False,
          strict: bool = False, shard_size: int = 0, workers: Optional[int] = None, progress: bool = True,
          encoding: str = "utf-8", compile: Optional[bool] = None, fast_decode: bool = False,
          image_column: str = "image") -> dict:
    """Encode images and/or texts into L2-normalised embeddings, one safetensors file or resumable shards.

    With neither --images nor --texts, the synthetic validation products (first view, global text)
    are encoded. With --shard-size N, --out is a folder: `img_emb/img_emb_{i}.npy` (float32, N items per
    shard less the unreadable ones), `metadata/metadata_{i}.jsonl` (one line per row: item number and
    image path), likewise `text_emb/` and `text_metadata/`, `region_emb/` and `selected_patches/` with
    --regions, `img_index.npy` (item -> shard, row; -1 for unreadable) and `manifest.json`. Running the
    same command again continues an interrupted run at its first unfinished shard.

    Args:
        images: folder of images, a catalog (CSV / JSONL: its --image-column), or a text file listing image paths
        texts: text file, one text per line
        encoder: a checkpoint directory (E2 or CLIP), MODEL:TAG, MODEL:FILE, a reference best.pth, or demo:e2 / demo:clip-ft
        out: output .safetensors file (paths and texts are kept in its metadata), or the shard folder with --shard-size
        batch_size: items per forward pass
        device: auto, cpu, cuda, cuda:1, mps
        regions: also save E2's per-entity regional image embeddings and selected patches (E2 encoders only)
        strict: fail on the first unreadable image instead of skipping and reporting it
        shard_size: items per shard: write a resumable shard folder at --out (0: one safetensors file)
        workers: processes decoding images while the encoder runs (0: in the main process; unset: 1 on a CPU, up to 8 with a GPU)
        progress: show a progress bar with the time left
        encoding: text encoding of the --images and --texts files (e.g. latin-1, cp1252)
        compile: encode with torch.compile (unset: on with a GPU, off on a CPU; without it where compiling fails)
        fast_decode: decode JPEGs at a reduced scale no smaller than the encoder's input (libjpeg's DCT scaling): several times faster on large photos; embeddings within cosine 0.999 of a full decode, E2's selections can differ
        image_column: the image path column of an --images catalog (no other column is needed)
    """
    check_at_least(0, shard_size=shard_size, workers=workers)
    check_at_least(1, batch_size=batch_size)
    out = Path(out)
    if shard_size and out.exists() and not out.is_dir():
        raise ValueError(f"out={out} is a file; with shard_size, out is the folder of shards (new, or an "
                         "earlier run's to continue)")
    if not shard_size and out.is_dir():
        raise ValueError(f"out={out} is a folder; give a .safetensors file, or shard_size=N to write shards there "
                         "(a folder of shards continues with the shard_size it was written with)")
    dev = resolve_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: the processes share the shards
        if not shard_size:
            raise ValueError("under torchrun embed writes a shard folder: give shard_size=N")
        dev = _join_processes(dev)
    if workers is None:
        workers = 1 if dev.type == "cpu" else min(8, os.cpu_count() or 1)
    net = load_encoder(encoder, device=dev)
    if regions and not net.has_regions:
        raise ValueError(f"regions=True needs an E2 encoder; {encoder} is a CLIP")
    if fast_decode and not hasattr(net, "image_size"):
        raise ValueError(f"fast_decode=True needs the encoder's input size (image_size), which {encoder} does not give")
    if images is None and texts is None:
        images, texts = _synthetic_inputs(out.parent / "synthetic-validation")
    paths = list_images(Path(images), encoding, image_column) if images is not None else None
    lines = _read_texts(Path(texts), encoding) if texts is not None else None
    active = compiles(dev, compile)
    if active and progress:
        log.warning("encoding under torch.compile: the first batches compile the encoder (about a minute; "
                    "compile=False, --no-compile, runs without it)")
    options = dict(device=dev, compile=active)
    draft = tuple(net.image_size) if fast_decode else None
    writer = (ShardedRun(out, net, shard_size, batch_size, regions, progress, fast_decode) if shard_size
              else SingleFile(out, net, batch_size))
    report = {}
    if paths is not None:
        report.update(writer.write("img", [str(p) for p in paths], images, lambda batches: image_batches(
            net, paths, batches, regions=regions, strict=strict, workers=workers, draft=draft, **options)))
    if lines is not None:
        report.update(writer.write("text", lines, texts, lambda batches: text_batches(net, lines, batches, **options)))
    writer.finish()
    return {"out": str(out), "encoder": net.name, **report}


def _join_processes(dev):
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs); each process takes its local GPU."""
    import torch
    import torch.distributed as dist

    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dev


def _read_texts(path: Path, encoding: str = "utf-8") -> List[str]:
    if not path.exists():
        raise FileNotFoundError(f"texts={path}: no such file (one text per line)")
    if path.is_dir():
        raise ValueError(f"texts={path} is a folder; give a text file, one text per line")
    return _read_lines(path, encoding)


def _read_lines(path: Path, encoding: str) -> List[str]:
    from e2_core.data.base import open_text

    with open_text(path, encoding) as f:
        return [line.strip() for line in f.read().splitlines() if line.strip()]


def _synthetic_inputs(folder: Path) -> Tuple[Path, Path]:
    """The synthetic validation products as an image folder and a text file (written once)."""
    from e2_core.data import open_dataset

    images, texts = folder / "images", folder / "texts.txt"
    if not texts.is_file():
        data = open_dataset("synthetic", None, "validation", prepare=True)
        images.mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(len(data)):
            data.load_image(i, 0).save(images / f"{i:05d}.png")
            lines.append(data.text(i))
        texts.write_text("\n".join(lines) + "\n")
    return images, texts


task = Task("embed", embed)
