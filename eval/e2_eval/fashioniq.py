"""The FashionIQ composed-image-retrieval harness: the dataset in both public layouts, the validation
protocol, and the gallery embedding cache. It knows nothing about the methods it scores.

Layouts (``root`` may also be the folder holding ``fashion-iq/``)::

    captions/cap.{category}.{split}.json       (SEARLE, LinCIR, CIReVL)   or   json/cap.{category}.{split}.json (Pic2Word)
    image_splits/split.{category}.{split}.json
    images/{name}.jpg | images/{name}.png

A caption file is a list of ``{"candidate": name, "target": name, "captions": [c1, c2]}`` (the test
split has no target). Validation protocol, per category (dress, shirt, toptee): the gallery is the
category's image split, the target occurs in it exactly once; Recall@K is the share of queries whose
target is among the K most similar gallery images; the summary is the plain mean of R@10 and of
R@50 over the categories. Ties in similarity rank the lower gallery index first.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from e2_core.checkpoint import save_tensors
from e2_core.data.base import DataError, json_error, open_image

CATEGORIES = ("dress", "shirt", "toptee")
SPLITS = ("train", "val", "test")
KS = (1, 5, 10, 50)
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class Triplet:
    reference: str
    captions: Tuple[str, str]
    target: Optional[str] = None


@dataclass
class FashionIQ:
    """One category and split of FashionIQ: its triplets and its image split (the gallery).

    Triplets whose reference or target image is missing or unreadable are left out of
    ``triplets`` and listed in ``dropped`` (``"name: why"``); gallery images likewise in
    ``missing_images``. Nothing is dropped silently: callers report both.
    """

    root: Path
    category: str
    split: str
    layout: str
    triplets: List[Triplet]
    gallery: List[str]
    dropped: List[str] = field(default_factory=list)
    missing_images: List[str] = field(default_factory=list)

    def image_path(self, name: str) -> Optional[Path]:
        for suffix in IMAGE_SUFFIXES:
            path = self.root / "images" / f"{name}{suffix}"
            if path.is_file():
                return path
        return None

    def load_image(self, name: str):
        path = self.image_path(name)
        if path is None:
            raise DataError(f"{self.root / 'images' / name}.jpg|.png: no such image file")
        return open_image(path).convert("RGB")


def fashioniq_root(root: PathLike) -> Path:
    root = Path(root)
    if not (root / "image_splits").is_dir() and (root / "fashion-iq" / "image_splits").is_dir():
        return root / "fashion-iq"
    return root


def load_fashioniq(root: PathLike, category: str, split: str = "val", check_images: bool = True) -> FashionIQ:
    """Read one category and split, from either layout."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown FashionIQ category {category!r}; the categories are {', '.join(CATEGORIES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown FashionIQ split {split!r}; the splits are {', '.join(SPLITS)}")
    root = fashioniq_root(root)
    layouts = [name for name in ("captions", "json") if (root / name / f"cap.{category}.{split}.json").is_file()]
    if not layouts:
        raise DataError(f"{root}: no captions/cap.{category}.{split}.json or json/cap.{category}.{split}.json; a "
                        "FashionIQ folder holds captions/ (or json/), image_splits/ and images/. Get the data from "
                        "the FashionIQ authors (github.com/XiaoxiaoGuo/fashion-iq) and pass its folder as --data-root")
    layout = layouts[0]
    triplets = _read_triplets(root / layout / f"cap.{category}.{split}.json", needs_target=split != "test")
    gallery = _read_names(root / "image_splits" / f"split.{category}.{split}.json")
    data = FashionIQ(root, category, split, layout, triplets, gallery)
    if check_images:
        _check_images(data)
    return data


def _read_json(path: Path):
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except json.JSONDecodeError as err:
        raise json_error(path, err) from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from None


def _read_triplets(path: Path, needs_target: bool) -> List[Triplet]:
    entries = _read_json(path)
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a list of triplets, got {type(entries).__name__}")
    triplets = []
    for i, entry in enumerate(entries):
        where = f"{path}: entry {i}"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
        captions = entry.get("captions")
        if not isinstance(entry.get("candidate"), str):
            raise DataError(f"{where}: no \"candidate\" image name")
        if needs_target and not isinstance(entry.get("target"), str):
            raise DataError(f"{where}: no \"target\" image name")
        if not (isinstance(captions, list) and len(captions) == 2 and all(isinstance(c, str) for c in captions)):
            raise DataError(f"{where}: \"captions\" must be a list of two strings, got {captions!r}")
        triplets.append(Triplet(entry["candidate"], (captions[0], captions[1]), entry.get("target")))
    return triplets


def _read_names(path: Path) -> List[str]:
    names = _read_json(path)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: expected a list of image names")
    return names


def _check_images(data: FashionIQ) -> None:
    missing = {name for name in set(data.gallery) | {t.reference for t in data.triplets} |
               {t.target for t in data.triplets if t.target} if data.image_path(name) is None}
    data.missing_images = sorted(name for name in data.gallery if name in missing)
    kept = []
    for t in data.triplets:
        gone = [n for n in (t.reference, t.target) if n in missing]
        if gone:
            data.dropped.append(f"{t.reference} -> {t.target}: image {gone[0]} missing")
        else:
            kept.append(t)
    data.triplets = kept
    if missing:
        data.gallery = [name for name in data.gallery if name not in missing]


def composed_recall(query_features: torch.Tensor, gallery_features: torch.Tensor, gallery_names: Sequence[str],
                    target_names: Sequence[str], ks: Sequence[int] = KS) -> Dict:
    """Recall@K (percent) of queries against a gallery, each query's target by name.

    A target that is not in the gallery, or is there more than once, is reported under
    ``"not_scored"`` and left out, never counted as a miss. Ties rank the lower gallery index first.
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
    result: Dict = {"queries": len(rows), "not_scored": not_scored}
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


@torch.no_grad()
def embed_images(encoder, names: Sequence[str], data: FashionIQ, cache_dir: Optional[PathLike] = None,
                 batch_size: int = 64, device: str = "cpu") -> torch.Tensor:
    """L2-normalised image embeddings of ``names`` (in order), cached per encoder weights and image files."""
    from .harness import cache_key

    paths = [data.image_path(name) for name in names]
    missing = [name for name, path in zip(names, paths) if path is None]
    if missing:
        raise DataError(f"{data.root / 'images'}: no image for {missing[:3]} ({len(missing)} missing)")
    cache = Path(cache_dir) / f"fiq-{cache_key(encoder, [str(p) for p in paths])}.safetensors" if cache_dir else None
    if cache is not None and cache.is_file():
        try:
            return load_file(cache)["image_features"]
        except (SafetensorError, OSError, KeyError):  # a cache cut short or foreign: computed again and replaced
            pass
    encoder.eval().to(device)
    features = []
    for start in range(0, len(names), batch_size):
        pixels = torch.stack([encoder.preprocess(data.load_image(n)) for n in names[start:start + batch_size]])
        features.append(encoder.encode_image(pixels.to(device), normalize=True).float().cpu())
    features = torch.cat(features) if features else torch.empty(0, encoder.embed_dim)
    if cache is not None:
        save_tensors({"image_features": features}, cache)
    return features


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
