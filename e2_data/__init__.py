"""The built-in datasets: their registry entries (``e2_plugins.datasets``, read through
``e2_core.data.open_dataset``) and the builders that make or download data in the layouts the readers
read (:mod:`e2_data.synthetic`, :mod:`e2_data.amazon`). Opening a reader never builds anything; a
``prepare`` step does, where the data can be made offline."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from e2_core.data.base import DataError, ProductDataset
from e2_core.data.datasets import default_synthetic_root
from e2_core.registry import DatasetReader

log = logging.getLogger(__name__)

#: triplets per category and split of the synthetic FashionIQ-layout data
SYNTHETIC_TRIPLETS = 100


def _open_fashiongen(root: Optional[str], split: str, **options) -> ProductDataset:
    from e2_core.data.fashiongen import FashionGen

    if root is None:
        raise DataError("dataset 'fashiongen' needs data_root: the folder holding fashiongen_256_256_<split>.h5")
    return FashionGen(root, split=split, **options)


def _open_synthetic(root: Optional[str], split: str, **options) -> ProductDataset:
    from e2_core.data.fashiongen import FashionGen, fashiongen_file

    folder = Path(root) if root else default_synthetic_root()
    if not fashiongen_file(folder, split).is_file():
        raise DataError(f"{folder}: no synthetic data; generate it with `e2-plugins data synthetic --out {folder}` "
                        "(or open it with prepare=True)")
    return FashionGen(folder, split=split, **options)


def _prepare_synthetic(root: Optional[str] = None) -> Optional[str]:
    """Generate the synthetic products (``small``) where they are missing; say what was done."""
    from e2_core.data.fashiongen import fashiongen_file

    from .synthetic import write_fashiongen

    folder = Path(root) if root else default_synthetic_root()
    if all(fashiongen_file(folder, split).is_file() for split in ("train", "validation")):
        return None
    log.warning("generating the synthetic products (4,000 training, 1,000 validation) in %s, once: about a "
                "minute or two ...", folder)
    write_fashiongen(folder, "small", progress=True)
    return f"synthetic products written to {folder}"


def _open_amazon_fashion(root: Optional[str], split: str, **options) -> ProductDataset:
    from e2_core.data.amazon import AmazonFashion

    if root is None:
        raise DataError("dataset 'amazon-fashion' needs data_root: the folder holding meta-fashion.json and "
                        "split.json (build it with `e2-plugins data amazon-fashion`)")
    return AmazonFashion(root, split={"validation": "test"}.get(split, split), **options)


def _open_catalog(root: Optional[str], split: str, **options) -> ProductDataset:
    """A catalog file (used for every split), or a folder with ``train.*`` and ``validation.*`` files."""
    from e2_core.data.catalog import Catalog

    if root is None:
        raise DataError("dataset 'catalog' needs data_root: a JSONL/CSV product file, or a folder with "
                        "train.jsonl / validation.jsonl (or .csv)")
    path = Path(root)
    if path.is_dir():
        matches = sorted(path.glob(f"{split}.*"))
        if not matches:
            raise DataError(f"{path}: no {split}.jsonl / {split}.csv catalog file")
        path = matches[0]
    return Catalog(path, **options)


def _open_fashioniq(root: Optional[str], split: str, category: str = "dress", **options):
    from e2_core.data.fashioniq import load_fashioniq

    if root is None:
        raise DataError("dataset 'fashioniq' needs data_root: the FashionIQ folder with captions/ (or json/), "
                        "image_splits/ and images/ (from github.com/XiaoxiaoGuo/fashion-iq)")
    return load_fashioniq(root, category, split, **options)


def _open_synthetic_fashioniq(root: Optional[str], split: str, category: str = "dress", **options):
    from e2_core.data.fashioniq import load_fashioniq

    return load_fashioniq(Path(root) if root else default_synthetic_root("fashioniq"), category, split, **options)


def _prepare_synthetic_fashioniq(root: Optional[str] = None) -> Optional[str]:
    """Write the synthetic FashionIQ-layout data where it is missing; say what was done."""
    from .synthetic import write_fashioniq

    folder = Path(root) if root else default_synthetic_root("fashioniq")
    if (folder / "captions" / "cap.toptee.val.json").is_file():
        return None
    if folder.is_dir() and any(folder.iterdir()):
        raise DataError(f"{folder} holds files but no synthetic FashionIQ-layout data (captions/cap.toptee.val.json); "
                        "remove it, or choose another data_root")
    log.warning("generating synthetic FashionIQ-layout data (%d triplets per category and split) in %s ...",
                SYNTHETIC_TRIPLETS, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:  # written aside and renamed into place whole: a second first use at once finds all of it or none
        write_fashioniq(building, SYNTHETIC_TRIPLETS)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        try:
            os.rename(building, folder)
        except OSError:  # another process put it there first: the same data
            if not (folder / "captions" / "cap.toptee.val.json").is_file():
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return f"synthetic FashionIQ-layout data written to {folder}"


SYNTHETIC = DatasetReader("synthetic", _open_synthetic, "synthetic products whose identity hinges on small details "
                          "(FashionGen layout; generated on first use)", prepare=_prepare_synthetic)
FASHIONGEN = DatasetReader("fashiongen", _open_fashiongen, "FashionGen: fashiongen_256_256_{train,validation}.h5")
AMAZON_FASHION = DatasetReader("amazon-fashion", _open_amazon_fashion,
                               "AmazonFashion: meta-fashion.json + split.json + images")
CATALOG = DatasetReader("catalog", _open_catalog, "your products: a JSONL or CSV file with image, text and entity "
                        "columns")
FASHIONIQ = DatasetReader("fashioniq", _open_fashioniq, "FashionIQ (composed retrieval): captions/ or json/, "
                          "image_splits/, images/", kind="triplets")
SYNTHETIC_FASHIONIQ = DatasetReader("synthetic-fashioniq", _open_synthetic_fashioniq,
                                    "synthetic triplets in FashionIQ's layout (generated on first use)",
                                    kind="triplets", prepare=_prepare_synthetic_fashioniq)
