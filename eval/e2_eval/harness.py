"""The cross-modal retrieval harness: embed a dataset once per encoder (cached), then score it with
the full and sample-100 protocols. It knows encoders only through the encoder contract
(``e2_core.Encoder``), so CLIP and E2 are scored the same way."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from e2_core import as_encoder
from e2_core.data import ProductDataset
from e2_core.embedding import embed_images, embed_texts

from .retrieval import cross_modal_retrieval, sampled_retrieval


def embed_dataset(encoder, dataset: ProductDataset, batch_size: int = 128, device=None, precision: str = "amp",
                  workers: int = 0, cache_dir: Optional[Path] = None, progress: Optional[bool] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor, List[int], List[str]]:
    """L2-normalised image and global-text embeddings of every readable product (first readable view),
    through the embedding door (``e2_core.embedding``, cached in ``cache_dir`` per encoder weights and
    dataset files).

    Returns ``(image_features, text_features, product indices, skipped "where: why")``.
    """
    encoder = as_encoder(encoder)
    options = dict(batch_size=batch_size, device=device, precision=precision, cache_dir=cache_dir)
    images = embed_images(encoder, dataset, workers=workers, strict=dataset.strict, progress=progress,
                          desc=f"embedding {len(dataset)} products with {encoder.label}", **options)
    texts = [dataset.text(i) for i in images.indices]
    return images.features, embed_texts(encoder, texts, **options), images.indices, images.skipped


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
        images, texts, _, _ = embed_dataset(encoder, dataset, batch_size, precision=precision)
        scores = cross_modal_retrieval(images, texts)
        return {"sumr": scores["sumr"], "i2t_r1": scores["i2t"][1], "t2i_r1": scores["t2i"][1]}
    return evaluate
