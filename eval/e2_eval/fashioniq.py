"""The FashionIQ validation protocol (composed image retrieval) and how each method's paper writes the
query; the data is read by ``e2_core.data.fashioniq``. It knows nothing about the methods it scores.

Per category (dress, shirt, toptee): the gallery is the category's image split, the target occurs in it
exactly once; Recall@K is the share of queries whose target is among the K most similar gallery images;
the summary is the plain mean of R@10 and of R@50 over the categories. Ties in similarity rank the
lower gallery index first.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Union

import torch

from e2_core.data.base import DataError
from e2_core.data.fashioniq import FashionIQ
from e2_core.embedding import embed_images

KS = (1, 5, 10, 50)

PathLike = Union[str, os.PathLike]


def composed_recall(query_features: torch.Tensor, gallery_features: torch.Tensor, gallery_names: Sequence[str],
                    target_names: Sequence[str], ks: Sequence[int] = KS) -> Dict:
    """Recall@K (percent) of queries against a gallery, each query's target by name.

    A target that is not in the gallery, or is there more than once, is reported under
    ``"not_scored"`` and left out, never counted as a miss. Ties rank the lower gallery index first.
    ``"trivial"`` lists the R@K that the gallery's size makes 100 by construction (K >= its images).
    """
    index = {}
    for i, name in enumerate(gallery_names):
        index.setdefault(name, []).append(i)
    rows, positions, not_scored = [], [], []
    for q, name in enumerate(target_names):
        found = index.get(name, [])
        if len(found) != 1:
            not_scored.append(f"{name}: {'not in the gallery' if not found else f'{len(found)} times in the gallery'}")
            continue
        rows.append(q)
        positions.append(found[0])
    result: Dict = {"queries": len(rows), "not_scored": not_scored, "gallery": len(gallery_names),
                    "trivial": [f"R@{k}" for k in ks if k >= len(gallery_names)]}
    if not rows:
        result.update({f"R@{k}": None for k in ks})
        return result
    scores = query_features[rows].float() @ gallery_features.float().t()
    positions_t = torch.tensor(positions)
    target_scores = scores[torch.arange(len(rows)), positions_t]
    ahead = (scores > target_scores[:, None]).sum(dim=1)
    ties_before = ((scores == target_scores[:, None]) &
                   (torch.arange(scores.shape[1])[None, :] < positions_t[:, None])).sum(dim=1)
    rank = ahead + ties_before  # 0 = first
    for k in ks:
        result[f"R@{k}"] = round(100.0 * (rank < k).float().mean().item(), 4)
    result["ranks"] = rank.tolist()
    return result


def summarize(per_category: Dict[str, Dict]) -> Dict[str, Optional[float]]:
    """The plain means of R@10 and of R@50 over the scored categories."""
    out = {}
    for k in ("R@10", "R@50"):
        values = [r[k] for r in per_category.values() if r.get(k) is not None]
        out[f"mean {k}"] = round(sum(values) / len(values), 4) if values else None
    return out


def embed_names(encoder, names: Sequence[str], data: FashionIQ, cache_dir: Optional[PathLike] = None,
                batch_size: int = 64, device=None, normalize: bool = True) -> torch.Tensor:
    """L2-normalised (or, ``normalize=False``, raw) embeddings of the images ``names`` (in order), through the
    embedding door (cached per encoder weights and image files); a missing or unreadable image is a ``DataError``
    naming it."""
    paths = [data.image_path(name) for name in names]
    missing = [name for name, path in zip(names, paths) if path is None]
    if missing:
        raise DataError(f"{data.root / 'images'}: no image for {missing[:3]} ({len(missing)} missing)")
    out = embed_images(encoder, paths, batch_size=batch_size, device=device, cache_dir=cache_dir, normalize=normalize)
    if out.skipped:
        raise DataError(f"{out.skipped[0]} ({len(out.skipped)} unreadable in {data.split}/{data.category}); "
                        "replace the image, or remove its name from image_splits/ and its triplets")
    return out.features


def _strip(caption: str) -> str:
    return caption.strip(".?, ")


#: How the two relative captions become the query texts, as each method's paper does it; ``$`` marks
#: where the reference image goes (a method puts its pseudo word there; text-only methods drop it).
CONVENTIONS = {
    # SEARLE / LinCIR: captions stripped of ".?, ", both orders, their embeddings averaged
    "searle": lambda c1, c2: [f"a photo of $ that {_strip(c1)} and {_strip(c2)}",
                              f"a photo of $ that {_strip(c2)} and {_strip(c1)}"],
    # Pic2Word: the second caption first, unstripped
    "pic2word": lambda c1, c2: [f"a photo of $ , {c2} and {c1}"],
    # CIReVL: the instruction to its rewriter
    "cirevl": lambda c1, c2: [f"{_strip(c1)} and {_strip(c2)}"],
}


def compose(convention: str, captions: Sequence[str]) -> List[str]:
    """The query texts of one triplet under ``convention``."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown prompt convention {convention!r}; the conventions are {', '.join(CONVENTIONS)}")
    return CONVENTIONS[convention](*captions)
