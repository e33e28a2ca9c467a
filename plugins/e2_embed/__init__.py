"""The ``embed`` task: encode images and texts with an E2 model into a safetensors file."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import save_file

from e2_core import create_e2_and_transforms, get_tokenizer
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


def embed(images: Optional[Path] = None, texts: Optional[Path] = None, model: Optional[str] = None,
          pretrained: Optional[str] = None, out: Path = Path("embeddings.safetensors"), batch_size: int = 64,
          device: str = "auto", regions: bool = False, strict: bool = False) -> dict:
    """Encode images and/or texts into L2-normalised embeddings saved as safetensors.

    With neither --images nor --texts, the synthetic validation products (first view, global text)
    are encoded; with neither --model nor --pretrained, the demo E2 encodes them.

    Args:
        images: folder of images, or a text file listing image paths
        texts: text file, one text per line
        model: open_clip architecture (default: the E2 checkpoint's, else ViT-B-32)
        pretrained: open_clip tag, CLIP checkpoint file, or E2 checkpoint directory (default: the demo E2)
        out: output .safetensors file (paths and texts are kept in its metadata)
        batch_size: items per forward pass
        device: auto, cpu, cuda, cuda:1, mps
        regions: also save the per-entity regional image embeddings and selected patches
        strict: fail on the first unreadable image instead of skipping and reporting it
    """
    if model is None and pretrained is None:
        from e2_core.training.demo import demo_encoders
        pretrained = str(demo_encoders()["e2"])
    if images is None and texts is None:
        images, texts = _synthetic_inputs(out.parent / "synthetic-validation")
    dev = resolve_device(device)
    net, _, preprocess = create_e2_and_transforms(model, pretrained, device=dev)
    net.eval()
    tensors, metadata, report = {}, {}, {}
    with torch.no_grad(), autocast(dev):
        if images is not None:
            pixels, kept, failed = load_images(list_images(images), preprocess, strict)
            outputs = [net.encode_image_regions(torch.stack(pixels[i:i + batch_size]).to(dev), normalize=True)
                       for i in range(0, len(pixels), batch_size)]
            if outputs:
                tensors["image_features"] = torch.cat([o.image_features for o in outputs]).float()
                if regions:
                    tensors["image_regional_features"] = torch.cat([o.regional_features for o in outputs]).float()
                    tensors["selected_patches"] = torch.cat([o.selected_patches for o in outputs])
            metadata["images"] = json.dumps([str(p) for p in kept])
            report.update(images=len(kept), unreadable_images=failed)
        if texts is not None:
            lines = [line.strip() for line in Path(texts).read_text().splitlines() if line.strip()]
            tokenizer = get_tokenizer(net)
            feats = [net.encode_text(tokenizer(lines[i:i + batch_size]).to(dev), normalize=True)
                     for i in range(0, len(lines), batch_size)]
            if feats:
                tensors["text_features"] = torch.cat(feats).float()
            metadata["texts"] = json.dumps(lines)
            report["texts"] = len(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(out),
              metadata={**metadata, "entities": json.dumps(list(net.entities))})
    return {"out": str(out), **report}


def _synthetic_inputs(folder: Path) -> Tuple[Path, Path]:
    """The synthetic validation products as an image folder and a text file (written once)."""
    from e2_core.data.open import open_dataset
    from e2_core.texts import build_texts

    images, texts = folder / "images", folder / "texts.txt"
    if not texts.is_file():
        data = open_dataset("synthetic", None, "validation")
        images.mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(len(data)):
            data.load_image(i, 0).save(images / f"{i:05d}.png")
            lines.append(build_texts(data.product(i).tags, data.spec)[0])
        texts.write_text("\n".join(lines) + "\n")
    return images, texts


task = Task("embed", embed)
