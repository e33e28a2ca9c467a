"""The AmazonFashion reader, for the layout of the paper's authors (``e2_data.amazon``
builds that layout from the public Amazon Reviews product-metadata dumps).

Layout::

    <root>/meta-fashion.json      {"<asin>": {"images": ["<asin>_0.jpg", ...], "title": "...", "brand": "..."}, ...}
    <root>/split.json             {"train": ["<asin>", ...], "test": ["<asin>", ...]}
    <root>/Fashion/<asin>/<image> the images (or <root>/<asin>/<image> when there is no Fashion folder)

Tags are ``brand`` (the only entity) and ``title``. A product without a brand gets the brand
``"Unknown"``: all unknown brands form one class of their own, as in the paper ("unknown brand ->
its own id"), so in the regional loss they are positives of each other.
"""
from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Union

from PIL import Image

from ..texts import AMAZON_FASHION
from .base import DataError, ProductDataset, Sample
from .base import json_error, open_image, open_text

META_FILE = "meta-fashion.json"
SPLIT_FILE = "split.json"
IMAGE_DIR = "Fashion"
REPORT_FILE = "build-report.json"
#: The brand of every product whose brand is missing or empty; one class of its own.
UNKNOWN_BRAND = "Unknown"

PathLike = Union[str, os.PathLike]


class AmazonFashion(ProductDataset):
    """AmazonFashion products of one split (``"train"`` or ``"test"``).

    Args:
        root: the folder holding ``meta-fashion.json`` and ``split.json``.
        split: a key of ``split.json``.
        image_dir: the image folder under ``root``; default ``"Fashion"``, or ``root`` itself
            (images at ``<root>/<asin>/``) when ``<root>/Fashion`` does not exist.
        **kwargs: ``train``, ``transform``, ``seed``, ``strict``, ``encoding`` (see :class:`ProductDataset`).

    Example:
        >>> data = AmazonFashion("data/amazon", split="test", transform=preprocess)  # doctest: +SKIP
        >>> data[0].tags  # doctest: +SKIP
        {'brand': "Levi's", 'title': "Men's 501 Original Fit Jeans"}
    """

    spec = AMAZON_FASHION

    def __init__(self, root: PathLike, split: str = "train", image_dir: Optional[str] = None, **kwargs):
        super().__init__(**kwargs)
        self.root, self.split = Path(root), split
        if not self.root.is_dir():
            raise DataError(f"{self.root}: no such folder (an AmazonFashion folder holds {META_FILE}, "
                            f"{SPLIT_FILE} and {IMAGE_DIR}/; build one with `e2-plugins data amazon-fashion`)")
        if image_dir is None:
            self.image_root = self.root / IMAGE_DIR if (self.root / IMAGE_DIR).is_dir() else self.root
        else:
            self.image_root = self.root / image_dir
            if not self.image_root.is_dir():
                raise DataError(f"{self.image_root}: no such image folder")
        splits = _load_json(self.root / SPLIT_FILE, self.encoding)
        if not isinstance(splits, dict) or not all(isinstance(v, list) for v in splits.values()):
            raise DataError(f"{self.root / SPLIT_FILE}: expected {{\"train\": [asins], \"test\": [asins]}}")
        if split not in splits:
            raise ValueError(f"AmazonFashion split must be one of {sorted(splits)} (the splits in "
                             f"{self.root / SPLIT_FILE}), got {split!r}")
        meta = _load_json(self.root / META_FILE, self.encoding)
        if not isinstance(meta, dict):
            raise DataError(f"{self.root / META_FILE}: expected an object mapping ASIN -> product, "
                            f"got {type(meta).__name__}")
        self.product_ids: List[str] = []
        self.images: List[List[str]] = []
        self.tags: List[Dict[str, str]] = []
        for asin in dict.fromkeys(str(a) for a in splits[split]):  # an ASIN listed twice is one product
            entry = meta.get(asin)
            if entry is None:
                raise DataError(f"{self.root / SPLIT_FILE}: ASIN {asin!r} of split {split!r} is not in "
                                f"{self.root / META_FILE}")
            if not isinstance(entry, dict):
                raise DataError(f"{self.root / META_FILE}: ASIN {asin!r}: expected an object, "
                                f"got {type(entry).__name__}")
            images = entry.get("images")
            if not isinstance(images, list) or not images:
                raise DataError(f"{self.root / META_FILE}: ASIN {asin!r} has no images")
            self.product_ids.append(asin)
            self.images.append([str(name) for name in images])
            self.tags.append({"brand": _brand(entry.get("brand")), "title": _clean(entry.get("title"))})

    def __len__(self) -> int:
        return len(self.product_ids)

    def num_views(self, index: int) -> int:
        return len(self.images[index])

    def product(self, index: int) -> Sample:
        return Sample(index=index, product_id=self.product_ids[index], tags=dict(self.tags[index]))

    def image_path(self, index: int, view: int) -> Path:
        return self.image_root / self.product_ids[index] / self.images[index][view]

    def source_files(self) -> List[str]:
        return [str(self.root / META_FILE), str(self.root / SPLIT_FILE)] + [
            str(self.image_path(i, v)) for i in range(len(self)) for v in range(self.num_views(i))]

    def load_image(self, index: int, view: int) -> Image.Image:
        return open_image(self.image_path(index, view))


def _load_json(path: Path, encoding: str = "utf-8"):
    try:
        with open_text(path, encoding) as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (an AmazonFashion folder holds {META_FILE} and {SPLIT_FILE}; "
                        f"build one with `e2-plugins data amazon-fashion`)") from None
    except json.JSONDecodeError as err:
        raise json_error(path, err) from None


def _clean(value) -> str:
    """A tag string: HTML entities decoded (the 2018 dumps have ``&amp;``), whitespace collapsed."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        value = " ".join(str(v) for v in value)
    return " ".join(html.unescape(str(value)).split())


def _brand(value) -> str:
    return _clean(value) or UNKNOWN_BRAND
