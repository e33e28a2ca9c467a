"""The one way images and texts become embeddings, for every task, harness and the trainer's validation.

:func:`embed_images` and :func:`embed_texts` batch, decode images in worker processes, run under the
chosen precision (and ``torch.compile`` when asked) and cache per encoder weights and input files; the
streams beneath them (:func:`image_batches`, :func:`text_batches`) serve writers that save batch by
batch. Images are a list of files (or of PIL images) or a :class:`~e2_core.data.ProductDataset` (each
product's first readable view); every file goes through :func:`~e2_core.data.base.open_image`, so an image
that cannot be decoded, or exceeds the pixel limit, is skipped and listed the same way everywhere (``strict``:
an error).

    >>> out = embed_images(encoder, ["a.jpg", "b.png"], batch_size=64)  # doctest: +SKIP
    >>> out.features.shape, out.indices, out.skipped                    # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .checkpoint import remove_stale_temporaries, save_tensors
from .data.base import DataError, ProductDataset, Sample, open_image
from .encoder import as_encoder
from .errors import check_at_least
from .runtime import autocast, compiled, compiles
from .texts import trim_padding

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
#: One batch of a stream: the input positions embedded, their tensors by name (float32 or int64, on the
#: CPU) and ``(position, "where: why")`` of every problem (an unreadable image; for a product, also a view
#: replaced by its next readable one, whose position is then among those embedded).
Batch = Tuple[List[int], Dict[str, torch.Tensor], List[Tuple[int, str]]]


@dataclass
class Embeddings:
    """Image embeddings (float32, CPU; L2-normalised unless asked raw) of the readable inputs, in input order."""

    features: torch.Tensor
    indices: List[int]  # the input position of each row
    skipped: List[str] = field(default_factory=list)  # "where: why" of each problem, as reported
    regions: Dict[str, torch.Tensor] = field(default_factory=dict)  # regional_features, selected_patches


class _Images(Dataset):
    """Item i: ``(i, pixels or None, ["where: why", ...])`` for a file or a product."""

    def __init__(self, images, preprocess, draft: Optional[Tuple[int, int]] = None):
        self.images, self.preprocess, self.draft = images, preprocess, draft

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        item = self.images[i]
        if isinstance(item, Image.Image):
            return i, self.preprocess(item.convert("RGB")), []
        if isinstance(item, Sample):  # a product: its dataset already fell back across views
            if item.error is not None:
                return i, None, list(item.unread)
            image = item.image
            return i, image if torch.is_tensor(image) else self.preprocess(image), list(item.unread)
        try:
            return i, self.preprocess(open_image(item, self.draft).convert("RGB")), []
        except DataError as err:
            return i, None, [str(err)]


def _collate(samples):
    kept = [(i, x) for i, x, _ in samples if x is not None]
    problems = [(i, message) for i, _, messages in samples for message in messages]
    return [i for i, _ in kept], (torch.stack([x for _, x in kept]) if kept else None), problems


def _device(encoder, device) -> torch.device:
    return torch.device(device) if device is not None else getattr(encoder, "device", torch.device("cpu"))


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.float() if tensor.is_floating_point() else tensor).cpu()


def image_batches(encoder, images: Sequence, batches: Optional[List[List[int]]] = None, *, batch_size: int = 64,
                  device=None, precision: str = "amp", workers: int = 0, regions: bool = False,
                  strict: bool = False, draft: Optional[Tuple[int, int]] = None,
                  compile: Optional[bool] = False, normalize: bool = True) -> Iterator[Batch]:
    """Embed ``images`` (files, or a ProductDataset's products) batch by batch: a stream of :data:`Batch`.

    ``batches`` lists the input positions of each batch (default: all, ``batch_size`` at a time).
    Tensors are ``image_features``, with ``regions`` (E2) also ``regional_features`` and
    ``selected_patches``. ``draft`` (height, width) decodes a JPEG at the smallest of libjpeg's scales
    that keeps it at least that large. ``compile``: see :func:`e2_core.runtime.compiled`. ``normalize=False``
    gives the encoder's raw embeddings (what composed-retrieval mapping networks take).
    """
    encoder = as_encoder(encoder)
    device = _device(encoder, device)
    check_at_least(1, batch_size=batch_size)
    check_at_least(0, workers=workers)
    if batches is None:
        batches = [list(range(i, min(i + batch_size, len(images)))) for i in range(0, len(images), batch_size)]
    if regions and not encoder.has_regions:
        raise ValueError(f"regions=True needs an E2 encoder; {encoder.name} is a CLIP")
    encode = compiled(encoder.encode_image_regions if regions else encoder.encode_image, device,
                      compiles(device, compile))
    loader = DataLoader(_Images(images, encoder.preprocess, draft), batch_sampler=batches, num_workers=workers,
                        collate_fn=_collate, pin_memory=device.type == "cuda")
    with _inference(encoder):
        for kept, pixels, problems in loader:
            failed = [message for i, message in problems if i not in kept]
            if failed and strict:
                raise DataError(f"{failed[0]} (strict=False skips and reports unreadable images)")
            tensors: Dict[str, torch.Tensor] = {}
            if pixels is not None:
                with autocast(device, precision):
                    out = encode(pixels.to(device, non_blocking=True), normalize=normalize)
                if regions:
                    tensors = {"image_features": _cpu(out.image_features),
                               "regional_features": _cpu(out.regional_features),
                               "selected_patches": _cpu(out.selected_patches)}
                else:
                    tensors = {"image_features": _cpu(out)}
            yield kept, tensors, problems


def text_batches(encoder, texts: Sequence[str], batches: Optional[List[List[int]]] = None, *,
                 batch_size: int = 64, device=None, precision: str = "amp",
                 compile: Optional[bool] = False, normalize: bool = True) -> Iterator[Batch]:
    """Embed ``texts`` batch by batch (tokenised, padding trimmed): a stream of :data:`Batch` with
    ``text_features`` (raw with ``normalize=False``)."""
    encoder = as_encoder(encoder)
    device = _device(encoder, device)
    check_at_least(1, batch_size=batch_size)
    if batches is None:
        batches = [list(range(i, min(i + batch_size, len(texts)))) for i in range(0, len(texts), batch_size)]
    encode = compiled(encoder.encode_text, device, compiles(device, compile))
    with _inference(encoder):
        for batch in batches:
            tokens = trim_padding(encoder.tokenizer([texts[i] for i in batch])).to(device)
            with autocast(device, precision):
                features = encode(tokens, normalize=normalize)
            yield batch, {"text_features": _cpu(features)}, []


def embed_images(encoder, images: Sequence, *, batch_size: int = 64, device=None, precision: str = "amp",
                 workers: int = 0, regions: bool = False, strict: bool = False,
                 draft: Optional[Tuple[int, int]] = None, compile: Optional[bool] = False,
                 cache_dir: Optional[PathLike] = None, progress: Optional[bool] = None,
                 desc: str = "", normalize: bool = True) -> Embeddings:
    """L2-normalised (or, ``normalize=False``, raw) embeddings of every readable image of ``images`` (files, or a ProductDataset's
    products, first readable view), read from ``cache_dir`` when this encoder's weights already
    embedded these inputs (files by path, size and modification time) with these settings (batch size,
    precision, regions, decoding).

    ``progress=None`` shows a bar on a terminal only. See :func:`image_batches` for the other options.
    """
    encoder = as_encoder(encoder)
    check_at_least(1, batch_size=batch_size)
    settings = {"precision": precision, "regions": regions, "draft": draft, "batch_size": batch_size,
                "normalize": normalize}
    path = _cache_path(cache_dir, encoder, _image_files(images), settings) if cache_dir is not None else None
    cached = _read_cache(path, strict)
    if cached is not None:
        return cached
    stream = image_batches(encoder, images, batch_size=batch_size, device=device, precision=precision,
                           workers=workers, regions=regions, strict=strict, draft=draft, compile=compile,
                           normalize=normalize)
    parts: Dict[str, List[torch.Tensor]] = {}
    indices, skipped = [], []
    label = desc or f"embedding {len(images)} images with {getattr(encoder, 'label', encoder.name)}"
    for kept, tensors, problems in tqdm(stream, desc=label, total=-(-len(images) // batch_size), unit="batch",
                                        disable=None if progress is None else not progress, leave=False):
        indices += kept
        skipped += [message for _, message in problems]
        for name, tensor in tensors.items():
            parts.setdefault(name, []).append(tensor)
    if not indices and len(images):
        raise DataError(f"no readable image to embed; first problems: {skipped[:3]}")
    empty = torch.empty(0, encoder.embed_dim)
    features = torch.cat(parts.pop("image_features")) if indices else empty
    result = Embeddings(features, indices, skipped, {name: torch.cat(p) for name, p in parts.items()})
    _write_cache(path, result)
    return result


def embed_texts(encoder, texts: Sequence[str], *, batch_size: int = 64, device=None, precision: str = "amp",
                compile: Optional[bool] = False, cache_dir: Optional[PathLike] = None,
                normalize: bool = True) -> torch.Tensor:
    """L2-normalised (or, ``normalize=False``, raw) text embeddings (float32, CPU), one row per text; read from
    ``cache_dir`` when this encoder's weights already embedded these texts with these settings."""
    encoder = as_encoder(encoder)
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    path = _cache_path(cache_dir, encoder, ([], f"texts|{len(texts)}|{digest}"),
                       {"precision": precision, "batch_size": batch_size, "normalize": normalize}, "texts")
    cached = _read_cache(path, strict=False)
    if cached is not None:
        return cached.features
    parts = [tensors["text_features"] for _, tensors, _ in
             text_batches(encoder, texts, batch_size=batch_size, device=device, precision=precision, compile=compile,
                          normalize=normalize)]
    features = torch.cat(parts) if parts else torch.empty(0, encoder.embed_dim)
    _write_cache(path, Embeddings(features, list(range(len(texts)))))
    return features


@contextlib.contextmanager
def _inference(encoder):
    """Eval mode and no gradients for the duration; the encoder's mode is restored after."""
    training = getattr(encoder, "training", False)
    encoder.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        encoder.train(training)


# --- the cache ---------------------------------------------------------------------------------------
def _image_files(images: Sequence) -> Tuple[List[str], str]:
    if isinstance(images, ProductDataset):
        return images.source_files(), f"{type(images).__name__}|{len(images)}"
    dataset = getattr(images, "dataset", None)  # a torch Subset of a ProductDataset
    if isinstance(dataset, ProductDataset):
        return dataset.source_files(), f"{type(dataset).__name__}|{list(images.indices)}"
    if any(isinstance(p, Image.Image) for p in images):
        raise ValueError("PIL images have no file to key a cache entry on; embed them with cache_dir=None")
    return [str(p) for p in images], f"files|{len(images)}"


def cache_key(encoder, files: Sequence[str], label: str = "") -> str:
    """A digest of the encoder's weights and of the files read (path, size, modification time)."""
    digest = hashlib.sha256(encoder.fingerprint().encode() if hasattr(encoder, "fingerprint")
                            else repr(id(encoder)).encode())
    digest.update(label.encode())
    for file in files:
        try:
            stat = os.stat(file)
            digest.update(f"|{os.path.abspath(file)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        except OSError:
            digest.update(f"|{file}|missing".encode())
    return digest.hexdigest()[:24]


def _cache_path(cache_dir, encoder, files: Tuple[List[str], str], settings: dict,
                kind: str = "images") -> Optional[Path]:
    if cache_dir is None:
        return None
    key = cache_key(encoder, files[0], f"{files[1]}|{json.dumps(settings, sort_keys=True)}")
    return Path(cache_dir) / f"{kind}-{key}.safetensors"


def _read_cache(path: Optional[Path], strict: bool) -> Optional[Embeddings]:
    if path is None or not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        result = Embeddings(tensors.pop("features"), json.loads(meta["indices"]), json.loads(meta["skipped"]),
                            tensors)
    except Exception as err:  # noqa: BLE001 - any damage (cut short, foreign, edited): computed again
        log.warning("%s: damaged embedding cache entry (%s: %s); computing it again", path, type(err).__name__,
                    str(err).splitlines()[0] if str(err) else "")
        return None
    if strict and result.skipped:  # the same files as when they were skipped: still unreadable
        raise DataError(f"{result.skipped[0]} (strict=False skips and reports unreadable images)")
    return result


def _write_cache(path: Optional[Path], result: Embeddings) -> None:
    if path is None:
        return
    if path.parent.is_dir():
        remove_stale_temporaries(path.parent)  # a killed run's half-written entries never fill the disk
    save_tensors({"features": result.features, **result.regions}, path,
                 metadata={"indices": json.dumps(result.indices), "skipped": json.dumps(result.skipped)})
