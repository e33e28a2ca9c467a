"""The built-in dataset readers, registered in the ``e2_plugins.datasets`` entry-point group as a
third party's would be, and :func:`open_dataset`, the one door tasks and the trainer use.

Opening a reader only reads: data is generated or built by an explicit step (``prepare``, which
the command line runs and reports, or ``e2-plugins data ...``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

from ..registry import DATASET_GROUP, DatasetReader, discover, get_dataset
from .base import DataError, ProductDataset


def open_dataset(name: str, root: Optional[str], split: str, **options) -> ProductDataset:
    """The installed reader ``name`` on ``root`` (a folder or file), ``split`` ``train`` or ``validation``.

    ``options`` go to the reader (``train``, ``transform``, ``seed``, ``strict``, ...). An unknown
    name lists the installed readers.

    Example:
        >>> data = open_dataset("fashiongen", "data/fashiongen", "validation", transform=preprocess)  # doctest: +SKIP
    """
    return get_dataset(name).open(root, split, **options)


def list_datasets() -> List[str]:
    return [plugin.name for plugin in discover(DATASET_GROUP)]


def default_synthetic_root(size: str = "small", seed: int = 0) -> Path:
    cache = Path(os.environ.get("E2_PLUGINS_CACHE", Path.home() / ".cache" / "e2-plugins"))
    return cache / f"synthetic-{size}-seed{seed}"


def _open_fashiongen(root: Optional[str], split: str, **options) -> ProductDataset:
    from .fashiongen import FashionGen

    if root is None:
        raise DataError("dataset 'fashiongen' needs --data-root: the folder holding fashiongen_256_256_<split>.h5")
    return FashionGen(root, split=split, **options)


def _open_synthetic(root: Optional[str], split: str, **options) -> ProductDataset:
    from .fashiongen import FashionGen, fashiongen_file

    folder = Path(root) if root else default_synthetic_root()
    if not fashiongen_file(folder, split).is_file():
        raise DataError(f"{folder}: no synthetic data; generate it with `e2-plugins data synthetic --out {folder}`")
    return FashionGen(folder, split=split, **options)


def _prepare_synthetic(root: Optional[str] = None) -> Optional[str]:
    """Generate the synthetic products (``small``) where they are missing; say what was done."""
    from .builders.synthetic import write_fashiongen
    from .fashiongen import fashiongen_file

    folder = Path(root) if root else default_synthetic_root()
    if all(fashiongen_file(folder, split).is_file() for split in ("train", "validation")):
        return None
    print(f"generating the synthetic products (4,000 training, 1,000 validation) in {folder}, once: about "
          "a minute or two ...", flush=True)
    write_fashiongen(folder, "small", progress=True)
    return f"synthetic products written to {folder}"


def _open_amazon_fashion(root: Optional[str], split: str, **options) -> ProductDataset:
    from .amazon import AmazonFashion

    if root is None:
        raise DataError("dataset 'amazon-fashion' needs --data-root: the folder holding meta-fashion.json and "
                        "split.json (build it with `e2-plugins data amazon-fashion`)")
    return AmazonFashion(root, split={"validation": "test"}.get(split, split), **options)


def _open_catalog(root: Optional[str], split: str, **options) -> ProductDataset:
    """A catalog file (used for every split), or a folder with ``train.*`` and ``validation.*`` files."""
    from .catalog import Catalog

    if root is None:
        raise DataError("dataset 'catalog' needs --data-root: a JSONL/CSV product file, or a folder with "
                        "train.jsonl / validation.jsonl (or .csv)")
    path = Path(root)
    if path.is_dir():
        matches = sorted(path.glob(f"{split}.*"))
        if not matches:
            raise DataError(f"{path}: no {split}.jsonl / {split}.csv catalog file")
        path = matches[0]
    return Catalog(path, **options)


SYNTHETIC = DatasetReader("synthetic", _open_synthetic, "synthetic products whose identity hinges on small details "
                          "(FashionGen layout; generated on first use)", prepare=_prepare_synthetic)
FASHIONGEN = DatasetReader("fashiongen", _open_fashiongen, "FashionGen: fashiongen_256_256_{train,validation}.h5")
AMAZON_FASHION = DatasetReader("amazon-fashion", _open_amazon_fashion,
                               "AmazonFashion: meta-fashion.json + split.json + images")
CATALOG = DatasetReader("catalog", _open_catalog, "your products: a JSONL or CSV file with image, text and entity "
                        "columns")
