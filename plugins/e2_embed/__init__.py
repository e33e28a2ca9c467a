"""The ``embed`` task: encode images and texts with any encoder (E2 or CLIP) into a safetensors file."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from PIL import Image, UnidentifiedImageError

from e2_core import load_encoder
from e2_core.checkpoint import save_tensors
from e2_core.registry import Task
from e2_core.runtime import autocast, resolve_device

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def list_images(images: Path) -> List[Path]:
    """A folder (searched recursively) or a text file with one image path per line."""
    if images.is_dir():
        return sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if images.is_file():
        lines = [line.strip() for line in images.read_text().splitlines() if line.strip()]
        return [Path(line) if Path(line).is_absolute() else images.parent / line for line in lines]
    raise FileNotFoundError(f"--images {images}: no such folder or list file")


def load_images(paths: List[Path], preprocess, strict: bool) -> Tuple[List[torch.Tensor], List[Path], List[str]]:
    """Preprocessed images, the paths that loaded, and ``path: reason`` for those that did not."""
    tensors, kept, failed = [], [], []
    for path in paths:
        try:
            with Image.open(path) as image:
                tensors.append(preprocess(image.convert("RGB")))
            kept.append(path)
        except (OSError, UnidentifiedImageError) as err:
            if strict:
                raise ValueError(f"cannot read image {path}: {err} (run without --strict to skip and report it)")
            failed.append(f"{path}: {err}")
    return tensors, kept, failed


def embed(images: Optional[Path] = None, texts: Optional[Path] = None, encoder: str = "demo:e2",
          out: Path = Path("embeddings.safetensors"), batch_size: int = 64, device: str = "auto", regions: bool = False,
          strict: bool = False) -> dict:
    """Encode images and/or texts into L2-normalised embeddings saved as safetensors.

    With neither --images nor --texts, the synthetic validation products (first view, global text)
    are encoded.

    Args:
        images: folder of images, or a text file listing image paths
        texts: text file, one text per line
        encoder: a checkpoint directory (E2 or CLIP), MODEL:TAG, MODEL:FILE, a reference best.pth, or demo:e2 / demo:clip-ft
        out: output .safetensors file (paths and texts are kept in its metadata)
        batch_size: items per forward pass
        device: auto, cpu, cuda, cuda:1, mps
        regions: also save E2's per-entity regional image embeddings and selected patches (E2 encoders only)
        strict: fail on the first unreadable image instead of skipping and reporting it
    """
    dev = resolve_device(device)
    net = load_encoder(encoder, device=dev)
    if regions and not net.has_regions:
        raise ValueError(f"--regions needs an E2 encoder; {encoder} is a CLIP")
    if images is None and texts is None:
        images, texts = _synthetic_inputs(out.parent / "synthetic-validation")
    net.eval()
    tensors, metadata, report = {}, {}, {}
    with torch.no_grad(), autocast(dev):
        if images is not None:
            pixels, kept, failed = load_images(list_images(images), net.preprocess, strict)
            batches = [torch.stack(pixels[i:i + batch_size]).to(dev) for i in range(0, len(pixels), batch_size)]
            if batches:
                if regions:
                    outputs = [net.encode_image_regions(b, normalize=True) for b in batches]
                    tensors["image_features"] = torch.cat([o.image_features for o in outputs]).float()
                    tensors["image_regional_features"] = torch.cat([o.regional_features for o in outputs]).float()
                    tensors["selected_patches"] = torch.cat([o.selected_patches for o in outputs])
                else:
                    tensors["image_features"] = torch.cat([net.encode_image(b, normalize=True) for b in batches]).float()
            metadata["images"] = json.dumps([str(p) for p in kept])
            report.update(images=len(kept), unreadable_images=failed)
        if texts is not None:
            lines = [line.strip() for line in Path(texts).read_text().splitlines() if line.strip()]
            feats = [net.encode_text(net.tokenizer(lines[i:i + batch_size]).to(dev), normalize=True)
                     for i in range(0, len(lines), batch_size)]
            if feats:
                tensors["text_features"] = torch.cat(feats).float()
            metadata["texts"] = json.dumps(lines)
            report["texts"] = len(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(tensors, out,
              metadata={**metadata, "encoder": net.name, "entities": json.dumps(list(net.entities))})
    return {"out": str(out), "encoder": net.name, **report}


def _synthetic_inputs(folder: Path) -> Tuple[Path, Path]:
    """The synthetic validation products as an image folder and a text file (written once)."""
    from e2_core.data import open_dataset
    from e2_core.data.datasets import SYNTHETIC
    from e2_core.texts import build_texts

    images, texts = folder / "images", folder / "texts.txt"
    if not texts.is_file():
        SYNTHETIC.prepare(None)
        data = open_dataset("synthetic", None, "validation")
        images.mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(len(data)):
            data.load_image(i, 0).save(images / f"{i:05d}.png")
            lines.append(build_texts(data.product(i).tags, data.spec)[0])
        texts.write_text("\n".join(lines) + "\n")
    return images, texts


task = Task("embed", embed)
