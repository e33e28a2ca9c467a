"""A user's own products, read from one JSONL or CSV file.

Each row is one view: an image path, the product's text and its entity columns. Rows that share
an id are views of one product; the product's tags come from its first row, so later rows need
only the id and the image. The file's columns are the CSV header, or the keys of the first JSON
record.

Example (``products.csv``)::

    id,image,text,brand,category
    p1,img/p1_front.jpg,Black wool coat,Acne Studios,COATS
    p1,img/p1_back.jpg,,,
    p2,img/p2.jpg,Slim jeans,Levi's,JEANS

``Catalog("products.csv")`` gives two products, entities ``("brand", "category")``, global text
``text``; relative image paths resolve against the file's folder.
"""
from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from PIL import Image

from ..texts import TextSpec
from .base import DataError, ProductDataset, Sample, json_error, open_image, open_text

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
CSV_SUFFIXES = (".csv",)


class Catalog(ProductDataset):
    """Products from a JSONL (``.jsonl``, ``.json``, ``.ndjson``: one object per line) or CSV file.

    Args:
        path: the file.
        image_column, text_column: the columns holding a view's image path and the product's text
            (the global text, ``spec.global_fields``).
        id_column: the product id; rows with the same id are views of one product. ``None``:
            ``"id"`` when the file has that column, else each row is its own product, numbered
            from 1 in file order. A column named explicitly must be in every row.
        entities: the tag columns that are E2 entities, in order. ``None``: every column other
            than the image, text and id columns, in file order.
        image_root: the folder relative image paths resolve against; default the file's folder.
        **kwargs: ``train``, ``transform``, ``seed``, ``strict``, ``encoding`` (see :class:`ProductDataset`;
            ``encoding="latin-1"``, ``--encoding`` on the command line, reads a file that is not UTF-8).

    ``spec`` is ``TextSpec(entities=tuple(entities), global_fields=(text_column,))``.
    """

    def __init__(self, path: Union[str, os.PathLike], image_column: str = "image", text_column: str = "text",
                 id_column: Optional[str] = None, entities: Optional[Sequence[str]] = None,
                 image_root: Optional[Union[str, os.PathLike]] = None, **kwargs):
        super().__init__(**kwargs)
        self.path = Path(path)
        columns, rows = read_rows(self.path, self.encoding)
        if id_column is None:
            id_column = "id" if "id" in columns else None
        self.image_column, self.text_column, self.id_column = image_column, text_column, id_column
        if entities is None:
            entities = [c for c in columns if c not in (image_column, text_column, id_column)]
        self.entities = tuple(entities)
        self.spec = TextSpec(entities=self.entities, global_fields=(text_column,))
        self.image_root = Path(image_root) if image_root is not None else self.path.parent

        tag_columns = list(dict.fromkeys(self.spec.global_fields + self.entities))
        first_of: Dict[str, int] = {}
        self.product_ids: List[str] = []
        self.tags: List[Dict[str, str]] = []
        self.views: List[List[Path]] = []
        for number, (where, row) in enumerate(rows, start=1):
            image = _image(row, image_column, where, columns, self.image_root)
            if id_column is None:
                pid = str(number)
            else:
                pid = _required(row, id_column, where, columns)
                if not pid:
                    raise DataError(f"{where}: column {id_column!r} (the product id) is empty")
            if pid not in first_of:
                tags = {name: _required(row, name, where, columns) for name in tag_columns}
                first_of[pid] = len(self.product_ids)
                self.product_ids.append(pid)
                self.tags.append(tags)
                self.views.append([])
            self.views[first_of[pid]].append(image)

    def __len__(self) -> int:
        return len(self.product_ids)

    def num_views(self, index: int) -> int:
        return len(self.views[index])

    def product(self, index: int) -> Sample:
        return Sample(index=index, product_id=self.product_ids[index], tags=dict(self.tags[index]))

    def load_image(self, index: int, view: int) -> Image.Image:
        return open_image(self.views[index][view])

    def source_files(self) -> List[str]:
        return [str(self.path)] + [str(p) for views in self.views for p in views]


Row = Dict[str, object]


def catalog_images(path: Union[str, os.PathLike], image_column: str = "image", encoding: str = "utf-8",
                   image_root: Optional[Union[str, os.PathLike]] = None) -> List[Path]:
    """Every row's image path of a catalog file, in file order (no other column is needed); relative
    paths resolve against ``image_root``, by default the file's folder."""
    path = Path(path)
    columns, rows = read_rows(path, encoding)
    root = Path(image_root) if image_root is not None else path.parent
    return [_image(row, image_column, where, columns, root) for where, row in rows]


def read_rows(path: Path, encoding: str = "utf-8") -> Tuple[List[str], List[Tuple[str, Row]]]:
    """A catalog file's columns and its rows, each with where it is (``file:line``)."""
    if not path.is_file():
        raise DataError(f"{path}: no such catalog file")
    suffix = path.suffix.lower()
    if suffix not in JSON_SUFFIXES + CSV_SUFFIXES:
        raise DataError(f"{path}: unknown catalog format {suffix!r}; use one of "
                        f"{JSON_SUFFIXES + CSV_SUFFIXES} (JSON lines or CSV with a header)")
    read = _read_jsonl if suffix in JSON_SUFFIXES else _read_csv
    with open_text(path, encoding) as f:
        columns, rows = read(path, f)
    if not rows:
        raise DataError(f"{path}: empty file, no products")
    return columns, rows


def _image(row: Row, column: str, where: str, columns: Sequence[str], root: Path) -> Path:
    image = _required(row, column, where, columns)
    if not image:
        raise DataError(f"{where}: column {column!r} (the image path) is empty")
    return image_path(image, root, where)


def image_path(path: str, root: Path, where: str) -> Path:
    """A listed image's local path: relative ones resolve against ``root``; a URL is refused (images are
    read from local files)."""
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", path):
        raise DataError(f"{where}: {path} is a URL; images are read from local files: download them first (e.g. "
                        f"with img2dataset) and list their local paths")
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p


def _read_jsonl(path: Path, f) -> Tuple[List[str], List[Tuple[str, Row]]]:
    rows: List[Tuple[str, Row]] = []
    for line_no, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as err:
            raise json_error(path, err, line_no) from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{line_no}: expected one JSON object per line, got {type(record).__name__}")
        rows.append((f"{path}:{line_no}", record))
    return (list(rows[0][1]) if rows else []), rows


def _read_csv(path: Path, f) -> Tuple[List[str], List[Tuple[str, Row]]]:
    rows: List[Tuple[str, Row]] = []
    reader = csv.reader(f)
    try:
        header = next(reader, None)
        if header is None:
            return [], []
        header = [h.strip() for h in header]
        duplicated = sorted({h for h in header if header.count(h) > 1})
        if duplicated:
            raise DataError(f"{path}:1: column(s) {duplicated} appear more than once in the header")
        for values in _nonblank(reader):
            row = dict(zip(header, values))  # a short row lacks its last columns
            rows.append((f"{path}:{reader.line_num}", row))
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({err})") from err
    return header, rows


def _nonblank(reader) -> Iterator[List[str]]:
    for values in reader:
        if any(v.strip() for v in values):
            yield values


def _required(row: Row, column: str, where: str, columns: Sequence[str]) -> str:
    if column not in row:
        raise DataError(f"{where}: column {column!r} missing; this row has {sorted(row)} "
                        f"(the file's columns: {list(columns)})")
    value = row[column]
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value).strip()
