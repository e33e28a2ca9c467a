"""The FashionIQ reader (composed image retrieval): one category and split, in both public layouts.

Layouts (``root`` may also be the folder holding ``fashion-iq/``)::

    captions/cap.{category}.{split}.json       (SEARLE, LinCIR, CIReVL)   or   json/cap.{category}.{split}.json (Pic2Word)
    image_splits/split.{category}.{split}.json
    images/{name}.jpg | images/{name}.png

A caption file is a list of ``{"candidate": name, "target": name, "captions": [c1, c2]}`` (the test
split has no target). The gallery of a category and split is its image split; the protocol that
scores it is ``e2_eval.fashioniq``'s.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple, Union

from .base import DataError, json_error, open_image

CATEGORIES = ("dress", "shirt", "toptee")
SPLITS = ("train", "val", "test")
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


class MissingSplit(DataError):
    """The folder has no captions file for this category and split."""


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
        held = sorted({p.name.split(".")[1] for layout in ("captions", "json")
                       for p in (root / layout).glob(f"cap.*.{split}.json")})
        hint = (f"; it holds the categories {', '.join(held)}: choose among them with `category`" if held else
                "; a FashionIQ folder holds captions/ (or json/), image_splits/ and images/. Get the data from the "
                "FashionIQ authors (github.com/XiaoxiaoGuo/fashion-iq) and pass its folder as data_root")
        raise MissingSplit(f"{root}: no captions/cap.{category}.{split}.json or json/cap.{category}.{split}.json"
                           + hint)
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
