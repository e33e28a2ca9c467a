"""FashionGen, read natively from ``fashiongen_256_256_{train,validation}.h5``.

Rows are views; products are grouped by ``input_productID``. Pixels are streamed from the file
(the train file holds ~50 GB of them), strings are ``(N, 1)`` latin-1 bytes.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np
from PIL import Image

from ..texts import FASHIONGEN
from .base import DataError, ProductDataset, Sample

#: tag name -> h5 field
FIELDS = {
    "subcategory": "input_subcategory",
    "brand": "input_brand",
    "description": "input_description",
    "season": "input_season",
    "composition": "input_composition",
    "category": "input_category",
    "name": "input_name",
}
IMAGE_FIELD = "input_image"
PRODUCT_FIELD = "input_productID"
SPLITS = ("train", "validation")


def fashiongen_file(root: Union[str, os.PathLike], split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"FashionGen split must be one of {SPLITS}, got {split!r}")
    return Path(root) / f"fashiongen_256_256_{split}.h5"


class FashionGen(ProductDataset):
    """FashionGen products from one h5 file (or a folder + ``split``).

    Example:
        >>> data = FashionGen("data/fashiongen", split="validation", transform=preprocess)  # doctest: +SKIP
        >>> sample = data[0]  # image of the first view, tags of the product    # doctest: +SKIP
    """

    spec = FASHIONGEN

    def __init__(self, path: Union[str, os.PathLike], split: Optional[str] = None, **kwargs):
        super().__init__(**kwargs)
        path = Path(path)
        self.path = fashiongen_file(path, split or "train") if path.is_dir() or split else path
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such FashionGen file (expected fashiongen_256_256_<split>.h5)")
        self._file, self._pid = None, None
        f = self._h5()
        missing = [name for name in (IMAGE_FIELD, PRODUCT_FIELD, *FIELDS.values()) if name not in f]
        if missing:
            raise DataError(f"{self.path}: field(s) {missing} missing; a FashionGen file has {IMAGE_FIELD}, "
                            f"{PRODUCT_FIELD} and {', '.join(FIELDS.values())}")
        image_shape = f[IMAGE_FIELD].shape
        if len(image_shape) != 4 or image_shape[-1] != 3:
            raise DataError(f"{self.path}: {IMAGE_FIELD} has shape {image_shape}, expected (N, H, W, 3) uint8")
        ids = np.asarray(f[PRODUCT_FIELD][:]).reshape(len(f[PRODUCT_FIELD]), -1)[:, 0]
        if len(ids) != image_shape[0]:
            raise DataError(f"{self.path}: {PRODUCT_FIELD} has {len(ids)} rows but {IMAGE_FIELD} has {image_shape[0]}")
        self.views = _group_rows(ids)
        self.product_ids = [_as_str(ids[rows[0]]) for rows in self.views]
        self._columns: Dict[str, list] = {}

    def _h5(self):
        import h5py  # imported here: only FashionGen needs it

        if self._file is None or self._pid != os.getpid():  # h5py handles do not survive fork
            try:
                self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
            except OSError as err:
                raise DataError(_unreadable_h5(self.path, str(err))) from None
        return self._file

    def __len__(self) -> int:
        return len(self.views)

    def num_views(self, index: int) -> int:
        return len(self.views[index])

    def product(self, index: int) -> Sample:
        row = self.views[index][0]  # tags are the product's, read from its first view
        f = self._h5()
        tags = {tag: _as_str(f[field][row]) for tag, field in FIELDS.items()}
        return Sample(index=index, product_id=self.product_ids[index], tags=tags)

    def load_image(self, index: int, view: int) -> Image.Image:
        row = self.views[index][view]
        try:
            return Image.fromarray(np.asarray(self._h5()[IMAGE_FIELD][row], dtype=np.uint8))
        except (OSError, ValueError, TypeError) as err:
            raise DataError(f"{self.path}:{IMAGE_FIELD}[{row}]: {err}") from err

    def groups(self, field_name: str) -> List[str]:
        if field_name not in FIELDS:
            return super().groups(field_name)
        if field_name not in self._columns:  # one read of the column instead of one per product
            column = self._h5()[FIELDS[field_name]][:]
            self._columns[field_name] = [_as_str(column[rows[0]]) for rows in self.views]
        return list(self._columns[field_name])

    def __getstate__(self):  # DataLoader workers reopen the file
        state = dict(self.__dict__)
        state["_file"], state["_pid"] = None, None
        return state


def _unreadable_h5(path: Path, why: str) -> str:
    size = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", why)
    if size:
        return (f"{path}: truncated HDF5 file ({int(size[1]):,} of its {int(size[2]):,} bytes), as an interrupted "
                "download or copy leaves it; fetch the file again")
    if "signature not found" in why:
        return (f"{path}: not an HDF5 file (no HDF5 signature); FashionGen is read from the "
                "fashiongen_256_256_<split>.h5 files as distributed: fetch the file again")
    return f"{path}: unreadable HDF5 file ({why}); fetch the file again"


def _group_rows(ids: np.ndarray) -> List[np.ndarray]:
    """Row numbers of each product, products in order of first appearance."""
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rows_by_unique = np.split(np.argsort(inverse, kind="stable"), np.cumsum(np.bincount(inverse))[:-1])
    return [rows_by_unique[u] for u in order]


def _as_str(value) -> str:
    value = np.asarray(value).reshape(-1)[0] if np.ndim(value) else value
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("latin-1").strip()
    return str(value.item() if hasattr(value, "item") else value).strip()
