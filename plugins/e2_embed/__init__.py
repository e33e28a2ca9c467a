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

    Args:
        images: folder of images, or a text file listing image paths
        texts: text file, one text per line
        model: open_clip architecture (default: the E2 checkpoint's, else ViT-B-32)
        pretrained: open_clip tag, CLIP checkpoint file, or E2 checkpoint directory
        out: output .safetensors file (paths and texts are kept in its metadata)
        batch_size: items per forward pass
        device: auto, cpu, cuda, cuda:1, mps
        regions: also save the per-entity regional image embeddings and selected patches
        strict: fail on the first unreadable image instead of skipping and reporting it
    """
    if images is None and texts is None:
        raise ValueError("give --images, --texts, or both")
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


task = Task("embed", embed)
