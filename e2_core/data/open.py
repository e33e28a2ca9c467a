"""``open_dataset``: a reader by name, the one door tasks and the trainer use."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .base import DataError, ProductDataset

DATASETS = ("synthetic", "fashiongen", "amazon-fashion", "catalog")


def default_synthetic_root(size: str, seed: int = 0) -> Path:
    cache = Path(os.environ.get("E2_PLUGINS_CACHE", Path.home() / ".cache" / "e2-plugins"))
    return cache / f"synthetic-{size}-seed{seed}"


def open_dataset(name: str, root: Optional[str], split: str, size: str = "small", **kwargs) -> ProductDataset:
    """``name`` in :data:`DATASETS`; ``split`` is ``train`` or ``validation`` (AmazonFashion's ``test``).

    ``synthetic`` data is generated into ``root`` (default: the user cache) on first use.
    """
    if name == "synthetic":
        from .fashiongen import FashionGen, fashiongen_file
        from .synthetic import SIZES, write_fashiongen

        if size not in SIZES:
            raise ValueError(f"synthetic size must be one of {sorted(SIZES)}, got {size!r}")
        folder = Path(root) if root else default_synthetic_root(size)
        if not fashiongen_file(folder, split).is_file():
            print(f"generating synthetic fashion data ({size}) in {folder} ...")
            write_fashiongen(folder, size)
        return FashionGen(folder, split=split, **kwargs)
    if root is None:
        raise ValueError(f"dataset {name!r} needs --data-root (the folder or file holding it)")
    if name == "fashiongen":
        from .fashiongen import FashionGen
        return FashionGen(root, split=split, **kwargs)
    if name == "amazon-fashion":
        from .amazon import AmazonFashion
        return AmazonFashion(root, split={"validation": "test"}.get(split, split), **kwargs)
    if name == "catalog":
        from .catalog import Catalog
        if split != "train" and Path(root).is_file():
            raise DataError(f"a catalog is one file ({root}); give a folder with train.* and validation.* "
                            "files to train on it, or evaluate on the file itself")
        path = Path(root)
        if path.is_dir():
            matches = sorted(path.glob(f"{split}.*"))
            if not matches:
                raise DataError(f"{path}: no {split}.jsonl / {split}.csv catalog file")
            path = matches[0]
        return Catalog(path, **kwargs)
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
