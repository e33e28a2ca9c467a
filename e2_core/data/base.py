"""One reader interface for every fashion dataset, and the collate step that turns products into
E2's inputs (images, global texts, per-entity strings).

A reader is a :class:`ProductDataset`: products with tag fields and one or more views. Indexing
it gives a :class:`Sample`; an image that cannot be read gives a sample with ``error`` set
(path and reason) instead of crashing a worker, and :class:`E2Collate` counts and reports it.
"""
from __future__ import annotations

import codecs
import contextlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, TextIO, Tuple, Union

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..texts import TextSpec, build_texts, tokenize_entities, trim_padding


class DataError(ValueError):
    """Input data that cannot be used as it is; the message names the file, field or line.

    Raised in a DataLoader worker, it reaches the main process with its own message, not the
    worker's traceback that torch wraps around it.
    """

    def __init__(self, message: str = "", *args):
        marker = f"\n{type(self).__module__}.{type(self).__qualname__}: "
        if message.startswith("Caught ") and "Original Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message, *args)


def open_image(path: Union[str, os.PathLike], draft: Optional[Sequence[int]] = None) -> Image.Image:
    """Decode one image file completely; ``DataError("<path>: <why>")`` for a missing or unreadable one,
    or one beyond PIL's pixel limit (``Image.MAX_IMAGE_PIXELS``). ``draft`` (height, width): a JPEG is
    decoded at the smallest of libjpeg's scales (1/2, 1/4, 1/8) that keeps it at least that large."""
    try:
        with open(path, "rb") as f:  # our own handle: closed here, the decoded image stays usable
            image = Image.open(f)
            if draft is not None:
                image.draft("RGB", tuple(draft)[::-1])  # PIL sizes are (width, height)
            image.load()  # decode now, so a truncated file fails here and not in a transform
        return image
    except FileNotFoundError:
        raise DataError(f"{path}: no such image file") from None
    except UnidentifiedImageError as err:  # an OSError subclass: not an image format PIL knows
        raise DataError(f"{path}: not a readable image (unknown format or corrupt header)") from err
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: unreadable image ({err})") from err


def json_error(path: Union[str, os.PathLike], err: json.JSONDecodeError, line: Optional[int] = None) -> DataError:
    """``DataError("<file>:<line>:<column>: malformed JSON (<why>)")``; ``line`` for a JSON-lines record."""
    return DataError(f"{path}:{line if line is not None else err.lineno}:{err.colno}: malformed JSON ({err.msg})")


@contextlib.contextmanager
def open_text(path: Union[str, os.PathLike], encoding: str = "utf-8") -> Iterator[TextIO]:
    """A text file opened for reading (UTF-8 with or without a BOM by default), as a context manager;
    a byte the encoding cannot decode is a ``DataError`` that names the file and the encoding option."""
    try:
        encoding = "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding  # spreadsheets write a BOM
    except LookupError:
        raise DataError(f"unknown text encoding {encoding!r} for {path}; use a codec name such as utf-8, latin-1 "
                        "or cp1252") from None
    try:
        with open(path, "r", encoding=encoding, newline="") as f:
            yield f
    except UnicodeDecodeError:
        raw = Path(path).read_bytes()  # the error's position is within a chunk: find the byte in the file
        detected = _detect_encoding(raw)
        if detected:
            raise DataError(f"{path}: the file is {detected[1]}, not {encoding.removesuffix('-sig')} text; read it "
                            f"with encoding={detected[0]}, or save it as UTF-8") from None
        try:
            raw.decode(encoding)
        except UnicodeDecodeError as err:
            line = raw.count(b"\n", 0, err.start) + 1
            raise DataError(f"{path}:{line}: byte 0x{raw[err.start]:02x} is not "
                            f"{err.encoding.removesuffix('-sig')} text; give the file's encoding, e.g. "
                            "encoding=latin-1 or encoding=cp1252, or save the file as UTF-8") from None
        raise


def _detect_encoding(raw: bytes) -> Optional[Tuple[str, str]]:
    """``(codec, description)`` of a text file whose bytes say what it is: a UTF-16 or UTF-32 byte-order
    mark, or UTF-16 without one (every other byte zero, as spreadsheets export "Unicode text")."""
    for bom, codec, name in ((codecs.BOM_UTF32_LE, "utf-32", "UTF-32 (with a byte-order mark)"),
                             (codecs.BOM_UTF32_BE, "utf-32", "UTF-32 (with a byte-order mark)"),
                             (codecs.BOM_UTF16_LE, "utf-16", "UTF-16 (with a byte-order mark)"),
                             (codecs.BOM_UTF16_BE, "utf-16", "UTF-16 (with a byte-order mark)")):
        if raw.startswith(bom):
            return codec, name
    head = raw[:4096]
    if len(head) >= 4 and head[1::2].count(0) > 0.9 * len(head[1::2]):
        return "utf-16-le", "UTF-16 little-endian (no byte-order mark)"
    if len(head) >= 4 and head[0::2].count(0) > 0.9 * len(head[0::2]):
        return "utf-16-be", "UTF-16 big-endian (no byte-order mark)"
    return None


@dataclass
class Sample:
    index: int
    product_id: str
    tags: Dict[str, str]
    image: Optional[object] = None  # PIL image, or a tensor once transformed
    error: Optional[str] = None  # "where: why" when no view of the product could be read
    unread: List[str] = field(default_factory=list)  # "where: why" of each view that could not be read


#: the image files a folder of images is read for
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def image_files(folder: Union[str, os.PathLike]) -> List[Path]:
    """The image files under ``folder`` (searched recursively), sorted; a missing folder or one without
    images is a ``DataError`` naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder of images")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it or below it")
    return files


def read_captions(path: Union[str, os.PathLike], encoding: str = "utf-8") -> List[str]:
    """The captions of a caption file: ``.txt`` one per line; ``.json`` a list of strings, of objects with a
    ``caption``, or COCO's ``{"annotations": [{"caption": ...}]}``; ``.tsv`` / ``.csv`` the ``caption`` column
    if the header names one, else the first column (as CC3M's ``caption<TAB>url`` files). Empty ones are left
    out; a file with none, or in another format, is a ``DataError`` naming it."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such caption file")
    suffix = path.suffix.lower()
    with open_text(path, encoding) as f:
        if suffix == ".json":
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise json_error(path, err) from None
            items = data.get("annotations") if isinstance(data, dict) else data
            if not isinstance(items, list):
                raise DataError(f"{path}: expected a JSON list of captions or COCO's {{\"annotations\": [...]}}")
            try:
                captions = [item if isinstance(item, str) else item["caption"] for item in items]
            except (KeyError, TypeError):
                raise DataError(f"{path}: every item must be a string or an object with a \"caption\"") from None
        elif suffix in (".tsv", ".csv"):
            rows = [row for row in csv.reader(f, delimiter="\t" if suffix == ".tsv" else ",") if row]
            header = [cell.strip().lower() for cell in rows[0]] if rows else []
            column = header.index("caption") if "caption" in header else 0
            captions = [row[column] if column < len(row) else "" for row in rows[1 if "caption" in header else 0:]]
        elif suffix == ".txt":
            captions = f.read().splitlines()
        else:
            raise DataError(f"{path}: not a caption file (.txt, .json, .tsv or .csv)")
    captions = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
    if not captions:
        raise DataError(f"{path}: no captions in it")
    return captions


class ProductDataset(Dataset):
    """Products with tag fields and one or more views each.

    Subclasses implement ``__len__``, :meth:`product` (tags without touching pixels),
    :meth:`num_views` and :meth:`load_image`. In training a random view is drawn, in evaluation
    the first; the draw depends only on ``(seed, epoch, index)``, so a resumed run sees the
    same views.
    """

    spec: TextSpec

    def __init__(self, train: bool = False, transform: Optional[Callable] = None, seed: int = 0,
                 strict: bool = False, encoding: str = "utf-8"):
        self.train, self.transform, self.seed, self.strict = train, transform, seed, strict
        self.encoding = encoding  # of the reader's text files (CSV, JSON); binary formats ignore it
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def product(self, index: int) -> Sample:  # pragma: no cover - interface
        raise NotImplementedError

    def num_views(self, index: int) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def load_image(self, index: int, view: int) -> Image.Image:  # pragma: no cover - interface
        """The view's image; raise ``DataError("<where>: <why>")`` when it cannot be read."""
        raise NotImplementedError

    def source_files(self) -> List[str]:
        """The files this dataset reads (data files and images), for cache keys; override per reader."""
        path = getattr(self, "path", None)
        return [str(path)] if path is not None else []

    def view_for(self, index: int) -> int:
        if not self.train:
            return 0
        return random.Random(f"{self.seed}:{self.epoch}:{index}").randrange(self.num_views(index))

    def text(self, index: int) -> str:
        """The product's global text: what text-to-image retrieval ranks its images by."""
        return build_texts(self.product(index).tags, self.spec)[0]

    def groups(self, field_name: str) -> List[str]:
        """Every product's value of one tag field (e.g. sub-category, for sample-100 negatives)."""
        return [self.product(i).tags.get(field_name, "") for i in range(len(self))]

    def __getitem__(self, index: int) -> Sample:
        """The product with its view's image; an unreadable view falls back to the product's next
        readable one, and each view that could not be read is listed in ``unread``."""
        sample = self.product(index)
        first = self.view_for(index)
        for view in [first] + [v for v in range(self.num_views(index)) if v != first]:
            try:
                image = self.load_image(index, view).convert("RGB")
            except (DataError, OSError) as err:
                if self.strict:
                    raise DataError(f"{err} (strict=False skips and reports unreadable images)") from err
                sample.unread.append(str(err))
                continue
            sample.image = self.transform(image) if self.transform is not None else image
            sample.unread = [f"{message} (view {view + 1} used instead)" for message in sample.unread]
            return sample
        sample.error = sample.unread[0]
        return sample


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, H, W)
    text: torch.Tensor  # (B, L) global texts, padding trimmed
    entity_text: object  # EntityTokens
    indices: List[int]
    skipped: List[str] = field(default_factory=list)  # "where: why" of the images that could not be read

    def to(self, device) -> "Batch":
        return Batch(self.images.to(device, non_blocking=True), self.text.to(device, non_blocking=True),
                     self.entity_text.to(device), self.indices, self.skipped)


class E2Collate:
    """DataLoader ``collate_fn``: transformed samples -> :class:`Batch`, unreadable samples dropped and listed."""

    def __init__(self, tokenizer, spec: TextSpec):
        self.tokenizer, self.spec = tokenizer, spec

    def __call__(self, samples: Sequence[Sample]) -> Batch:
        good = [s for s in samples if s.error is None]
        skipped = [message for s in samples for message in s.unread]
        if not good:
            return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), None, [], skipped)
        texts = [build_texts(s.tags, self.spec) for s in good]
        return Batch(
            images=torch.stack([s.image for s in good]),
            text=trim_padding(self.tokenizer([t for t, _ in texts])),
            entity_text=tokenize_entities(self.tokenizer, [e for _, e in texts]),
            indices=[s.index for s in good],
            skipped=skipped,
        )
