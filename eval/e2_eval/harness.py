"""The cross-modal retrieval harness: embed a dataset once per checkpoint (cached), then score it
with the full and sample-100 protocols. It knows encoders only through ``encode_image`` /
``encode_text``, so CLIP and E2 are scored the same way."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from e2_core.data import E2Collate, ProductDataset
from e2_core.model import encode_text_any_length
from e2_core.runtime import autocast

from .retrieval import cross_modal_retrieval, sampled_retrieval


@torch.no_grad()
def embed_dataset(model, dataset: ProductDataset, tokenizer, batch_size: int = 128, device: str = "cpu",
                  precision: str = "amp", workers: int = 0) -> Tuple[torch.Tensor, torch.Tensor, List[int], List[str]]:
    """L2-normalised image and global-text embeddings of every readable product (first view).

    Returns ``(image_features, text_features, product indices, skipped "where: why")``.
    """
    device = torch.device(device)
    model.eval().to(device)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=E2Collate(tokenizer, dataset.spec),
                        num_workers=workers)
    images, texts, indices, skipped = [], [], [], []
    for batch in loader:
        skipped += batch.skipped
        if not batch.indices:
            continue
        with autocast(device, precision):
            images.append(model.encode_image(batch.images.to(device), normalize=True).float().cpu())
            texts.append(encode_text_any_length(model, batch.text.to(device), normalize=True).float().cpu())
        indices += batch.indices
    if not indices:
        raise ValueError(f"no readable products to embed; first problems: {skipped[:3]}")
    return torch.cat(images), torch.cat(texts), indices, skipped


def cached_embeddings(model, dataset: ProductDataset, tokenizer, checkpoint: Optional[str], cache_dir: Path,
                      **kwargs) -> Tuple[torch.Tensor, torch.Tensor, List[int], List[str]]:
    """:func:`embed_dataset`, read from ``cache_dir`` when this checkpoint already embedded this dataset."""
    key = _cache_key(checkpoint, dataset)
    path = Path(cache_dir) / f"{key}.safetensors" if key else None
    if path is not None and path.is_file():
        tensors = load_file(path)
        meta = json.loads((path.with_suffix(".json")).read_text())
        return tensors["image_features"], tensors["text_features"], meta["indices"], meta["skipped"]
    images, texts, indices, skipped = embed_dataset(model, dataset, tokenizer, **kwargs)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".json").write_text(json.dumps({"checkpoint": checkpoint, "indices": indices,
                                                         "skipped": skipped}))
        save_file({"image_features": images, "text_features": texts}, str(path))
    return images, texts, indices, skipped


def _cache_key(checkpoint: Optional[str], dataset: ProductDataset) -> Optional[str]:
    """A checkpoint directory's weights (size + mtime) and the dataset file identify an embedding."""
    weights = Path(checkpoint) / "model.safetensors" if checkpoint else None
    source = getattr(dataset, "path", None)
    if weights is None or not weights.is_file() or source is None:
        return None
    parts = [str(weights.resolve()), str(os.stat(weights).st_mtime_ns), str(os.stat(weights).st_size),
             str(Path(source).resolve()), str(os.stat(source).st_mtime_ns), str(len(dataset))]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def evaluate_retrieval(image_features: torch.Tensor, text_features: torch.Tensor, groups: Optional[List[str]] = None,
                       protocols=("full", "sample-100"), num_negatives: int = 100, seed: int = 0) -> Dict[str, Dict]:
    """Scores per protocol: ``{"full": {"i2t": {1: ..}, "t2i": {..}, "sumr": ..}, "sample-100": {...}}``.

    Sample-100 needs ``groups`` (the sub-category of each item); groups too small to give
    ``num_negatives`` negatives are reported instead of scored.
    """
    results: Dict[str, Dict] = {}
    if "full" in protocols:
        results["full"] = cross_modal_retrieval(image_features, text_features)
    if "sample-100" in protocols:
        if groups is None:
            results["sample-100"] = {"error": "needs each item's sub-category"}
        else:
            try:
                results["sample-100"] = sampled_retrieval(image_features, text_features, groups,
                                                          num_negatives=num_negatives, seed=seed)
            except ValueError as err:
                results["sample-100"] = {"error": str(err)}
    return results


def validation_sumr(tokenizer_of, batch_size: int = 128, precision: str = "amp"):
    """An evaluator for the trainer: full-protocol SumR of a model on a validation dataset."""
    def evaluate(model, dataset: ProductDataset) -> Dict[str, float]:
        device = next(model.parameters()).device
        images, texts, _, _ = embed_dataset(model, dataset, tokenizer_of(model), batch_size, str(device), precision)
        scores = cross_modal_retrieval(images, texts)
        return {"sumr": scores["sumr"], "i2t_r1": scores["i2t"][1], "t2i_r1": scores["t2i"][1]}
    return evaluate
