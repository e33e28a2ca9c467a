"""The cross-modal retrieval harness: embed a dataset once per encoder (cached), then score it with
the full and sample-100 protocols. It knows encoders only through the encoder contract
(``e2_core.Encoder``), so CLIP and E2 are scored the same way."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from e2_core import as_encoder
from e2_core.checkpoint import save_tensors
from e2_core.data import DataError, E2Collate, ProductDataset
from e2_core.runtime import autocast

from .retrieval import cross_modal_retrieval, sampled_retrieval


@torch.no_grad()
def embed_dataset(encoder, dataset: ProductDataset, batch_size: int = 128, device: str = "cpu",
                  precision: str = "amp", workers: int = 0) -> Tuple[torch.Tensor, torch.Tensor, List[int], List[str]]:
    """L2-normalised image and global-text embeddings of every readable product (first view).

    Returns ``(image_features, text_features, product indices, skipped "where: why")``.
    """
    encoder = as_encoder(encoder)
    device = torch.device(device)
    encoder.eval().to(device)
    if dataset.transform is None:
        dataset.transform = encoder.preprocess
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=E2Collate(encoder.tokenizer, dataset.spec),
                        num_workers=workers)
    images, texts, indices, skipped = [], [], [], []
    for batch in tqdm(loader, desc=f"embedding {len(dataset)} products with {encoder.label}", unit="batch",
                      disable=None, leave=False):  # shown on a terminal only
        skipped += batch.skipped
        if not batch.indices:
            continue
        with autocast(device, precision):
            images.append(encoder.encode_image(batch.images.to(device), normalize=True).float().cpu())
            texts.append(encoder.encode_text(batch.text.to(device), normalize=True).float().cpu())
        indices += batch.indices
    if not indices:
        raise ValueError(f"no readable products to embed; first problems: {skipped[:3]}")
    return torch.cat(images), torch.cat(texts), indices, skipped


def cached_embeddings(encoder, dataset: ProductDataset, cache_dir: Optional[Path],
                      **kwargs) -> Tuple[torch.Tensor, torch.Tensor, List[int], List[str]]:
    """:func:`embed_dataset`, read from ``cache_dir`` when this encoder (its weights) already
    embedded this dataset (its files: sizes and modification times)."""
    encoder = as_encoder(encoder)
    key = cache_key(encoder, dataset.source_files(), f"{type(dataset).__name__}|{len(dataset)}")
    path = Path(cache_dir) / f"{key}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        tensors = load_file(path)
        meta = json.loads((path.with_suffix(".json")).read_text())
        if dataset.strict and meta["skipped"]:  # the same files as when they were skipped: still unreadable
            raise DataError(f"{meta['skipped'][0]} (run without --strict to skip and report unreadable images)")
        return tensors["image_features"], tensors["text_features"], meta["indices"], meta["skipped"]
    images, texts, indices, skipped = embed_dataset(encoder, dataset, **kwargs)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".json").write_text(json.dumps({"encoder": encoder.name, "indices": indices,
                                                         "skipped": skipped}))
        save_tensors({"image_features": images, "text_features": texts}, path)
    return images, texts, indices, skipped


def cache_key(encoder, files: Sequence[str], label: str = "") -> str:
    """A digest of the encoder's weights and of the files read (path, size, modification time)."""
    digest = hashlib.sha256(encoder.fingerprint().encode() if hasattr(encoder, "fingerprint")
                            else repr(id(encoder)).encode())
    digest.update(label.encode())
    for file in files:
        try:
            stat = os.stat(file)
            digest.update(f"|{os.path.abspath(file)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        except OSError:
            digest.update(f"|{file}|missing".encode())
    return digest.hexdigest()[:24]


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


def validation_sumr(batch_size: int = 128, precision: str = "amp"):
    """An evaluator for the trainer: full-protocol SumR of an encoder on a validation dataset."""
    def evaluate(encoder, dataset: ProductDataset) -> Dict[str, float]:
        device = next(encoder.parameters()).device
        images, texts, _, _ = embed_dataset(encoder, dataset, batch_size, str(device), precision)
        scores = cross_modal_retrieval(images, texts)
        return {"sumr": scores["sumr"], "i2t_r1": scores["i2t"][1], "t2i_r1": scores["t2i"][1]}
    return evaluate
