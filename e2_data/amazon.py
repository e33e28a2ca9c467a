"""Build AmazonFashion (the reader's layout, ``e2_core.data.amazon``) from the public Amazon Reviews
product-metadata dumps (2018 and 2023 releases): filter fashion products, split, place or
download their images (resumable, retried), and write a report."""
from __future__ import annotations

import gzip
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from e2_core.data.amazon import IMAGE_DIR, META_FILE, REPORT_FILE, SPLIT_FILE, UNKNOWN_BRAND, _clean
from e2_core.data.base import IMAGE_SUFFIXES, DataError, json_error, open_image

log = logging.getLogger(__name__)

#: Main categories / category roots kept by :func:`build_amazon_fashion` by default.
FASHION_CATEGORIES = ("Clothing, Shoes & Jewelry", "Amazon Fashion", "AMAZON FASHION")

PathLike = Union[str, os.PathLike]


Fetch = Callable[[str, float], bytes]


def urllib_fetch(url: str, timeout: float) -> bytes:
    """The body of ``url`` (``urllib``), raising on HTTP errors and timeouts."""
    request = urllib.request.Request(url, headers={"User-Agent": "e2-plugins (dataset builder)"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


@dataclass
class _Product:
    asin: str
    title: str
    brand: str
    urls: List[str]


_ASIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # used as a folder name: no separators, no "..", no leading dot
_ALT = re.compile(r'alt="([^"]*)"')


def _main_category(value) -> str:
    text = _clean(value)
    if text.startswith("<"):  # 2018 dumps: '<img src="..." alt="AMAZON FASHION"/>' for some products
        match = _ALT.search(text)
        text = match.group(1).strip() if match else ""
    return text


def _first(values) -> str:
    return _clean(values[0]) if isinstance(values, list) and values else ""


def _parse_record(record: dict, categories: frozenset) -> Tuple[Optional[str], str, Optional[_Product]]:
    """``(layout, skip reason, product)`` of one metadata record; ``product`` is None when skipped."""
    if "parent_asin" in record or "main_category" in record:  # 2023
        layout, asin = "2023", record.get("parent_asin") or record.get("asin")
        main, root = _main_category(record.get("main_category")), _first(record.get("categories"))
        details = record.get("details") if isinstance(record.get("details"), dict) else {}
        brand = _clean(details.get("Brand")) or _clean(record.get("store"))
        urls = []
        for image in record.get("images") or []:
            if isinstance(image, dict):
                url = image.get("hi_res") or image.get("large")
            else:
                url = image if isinstance(image, str) else None
            if url:
                urls.append(str(url))
    elif "asin" in record:  # 2018
        layout, asin = "2018", record.get("asin")
        main, root = _main_category(record.get("main_cat")), _first(record.get("category"))
        brand = _clean(record.get("brand"))
        urls = [str(u) for u in (record.get("imageURLHighRes") or record.get("imageURL") or []) if u]
    else:
        return None, "malformed", None
    if not isinstance(asin, str) or not _ASIN.match(asin):
        return None, "malformed", None
    if main not in categories and root not in categories:
        return layout, "wrong_category", None
    title = _clean(record.get("title"))
    if not title:
        return layout, "no_title", None
    return layout, "", _Product(asin, title, brand or UNKNOWN_BRAND, list(dict.fromkeys(urls)))


def _read_records(path: Path) -> Iterator[Tuple[int, Optional[dict]]]:
    """``(line, record)`` of a JSON-lines file, gzipped or not (by magic bytes); ``record`` is None
    for a malformed line. A file holding one JSON array is read too (``line`` is then the item number)."""
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
    except FileNotFoundError:
        raise DataError(f"{path}: no such metadata file") from None
    opener = gzip.open if gzipped else open
    line_no = 0
    try:
        with opener(path, "rb") as f:
            for line_no, line in enumerate(f, start=1):
                if line_no == 1:
                    line = line.removeprefix(b"\xef\xbb\xbf")
                    if line.lstrip().startswith(b"["):
                        yield from _read_array(path, line + f.read())
                        return
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
                    record = None
                yield line_no, record if isinstance(record, dict) else None
    except (EOFError, gzip.BadGzipFile, OSError) as err:
        raise DataError(f"{path}: unreadable after line {line_no} ({err}); is the download complete?") from err


def _read_array(path: Path, data: bytes) -> Iterator[Tuple[int, Optional[dict]]]:
    try:
        items = json.loads(data)
    except json.JSONDecodeError as err:
        raise json_error(path, err) from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected JSON lines or one JSON array of products")
    for number, item in enumerate(items, start=1):
        yield number, item if isinstance(item, dict) else None


def _write_json(path: Path, obj, indent: Optional[int] = None) -> None:
    """Write atomically: a temporary file in the same folder, then ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=indent)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _local_images(folder: Path) -> List[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _place(src: Path, dst: Path) -> str:
    """Hard-link (else copy) ``src`` to ``dst``: ``"linked"``, ``"copied"`` or ``"reused"`` (already there)."""
    if dst.exists():
        if os.path.samefile(src, dst) or dst.stat().st_size == src.stat().st_size:
            return "reused"
        dst.unlink()
    try:
        os.link(src, dst)
        return "linked"
    except OSError:  # another file system, or links not supported
        part = dst.with_name(dst.name + ".part")
        try:
            shutil.copyfile(src, part)
            os.replace(part, dst)
        finally:
            part.unlink(missing_ok=True)
        return "copied"


def _permanent(err: Exception) -> bool:
    """Errors a retry cannot fix: HTTP 4xx other than timeout / rate limit, malformed URLs."""
    if isinstance(err, urllib.error.HTTPError):
        return 400 <= err.code < 500 and err.code not in (408, 425, 429)
    return isinstance(err, ValueError)


def _complete(path: Path) -> bool:
    """Whether an existing file is a usable image (only complete files ever get their final name;
    this also catches a foreign, broken file)."""
    try:
        with Image.open(path):
            return True
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def _download(url: str, dest: Path, fetch: Fetch, retries: int, timeout: float, backoff: float) -> Tuple[str, str]:
    """Fetch one image to ``dest``: ``("downloaded" | "reused" | "failed", reason)``."""
    if dest.exists():
        if _complete(dest):
            return "reused", ""
        dest.unlink()
    part = dest.with_name(dest.name + ".part")
    reason = "no attempt"
    try:
        for attempt in range(retries):
            if attempt:
                time.sleep(backoff * 2 ** (attempt - 1))
            try:
                data = fetch(url, timeout)
            except Exception as err:  # noqa: BLE001 - urllib raises many types (URLError, timeouts, resets, ...)
                reason = f"{type(err).__name__}: {err}"
                if _permanent(err):
                    break
                continue
            try:
                with Image.open(io.BytesIO(data)) as image:
                    image.load()  # a complete decode: truncated transfers fail here
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                reason = f"not a readable image ({err})"
                continue
            with open(part, "wb") as f:
                f.write(data)
            os.replace(part, dest)  # atomic: an interrupted run never leaves a truncated final file
            return "downloaded", ""
    except OSError as err:  # writing failed (disk full, permissions)
        reason = f"{type(err).__name__}: {err}"
    finally:
        part.unlink(missing_ok=True)
    return "failed", reason


def _suffix(url: str) -> str:
    suffix = Path(urllib.parse.urlparse(url).path).suffix.lower()
    return suffix if suffix in IMAGE_SUFFIXES else ".jpg"


def build_amazon_fashion(metadata: Union[PathLike, Sequence[PathLike]], out_dir: PathLike,
                         images_dir: Optional[PathLike] = None, download: bool = False, test_fraction: float = 0.1,
                         seed: int = 0, min_images: int = 1, workers: int = 8, retries: int = 3,
                         timeout: float = 20.0, categories: Iterable[str] = FASHION_CATEGORIES,
                         fetch: Optional[Fetch] = None, backoff: float = 1.0) -> dict:
    """Build the AmazonFashion layout in ``out_dir`` from Amazon Reviews product-metadata dumps.

    Args:
        metadata: one or more dumps: JSON lines, gzipped or not (detected by magic bytes), in the
            2018 layout (``asin``, ``title``, ``brand``, ``category``, ``main_cat``,
            ``imageURLHighRes``, ``imageURL``) or the 2023 layout (``parent_asin``, ``title``,
            ``main_category``, ``categories``, ``store``, ``details``, ``images``); the layout is
            detected per record. Malformed lines (e.g. the Python-dict lines of some old dumps) are
            skipped and reported.
        out_dir: the dataset folder to write (``meta-fashion.json``, ``split.json``, ``Fashion/``,
            ``build-report.json``).
        images_dir: take images from ``images_dir/<asin>/*`` (jpg, jpeg, png, webp; sorted),
            hard-linked (else copied) to ``out_dir/Fashion/<asin>/``.
        download: download the products' image URLs (high resolution preferred) to
            ``out_dir/Fashion/<asin>/<asin>_<k><ext>``. Resumable: files already there are kept,
            downloads go to ``.part`` files renamed when complete and verified with PIL. With
            ``images_dir`` too, only products without local images are downloaded.
        test_fraction, seed: the split: sorted ASINs shuffled by ``numpy.random.default_rng(seed)``,
            the first ``round(n * test_fraction)`` are the test split.
        min_images: products with fewer images are dropped.
        workers, retries, timeout, backoff: download threads; attempts per image; seconds per
            request; the wait before retry ``r`` is ``backoff * 2**(r - 1)`` seconds.
        categories: products are kept when their main category or the root of their category path
            is one of these.
        fetch: ``fetch(url, timeout) -> bytes``; default :func:`urllib_fetch`.

    Returns:
        The report, also written to ``out_dir/build-report.json``: ``records`` (lines read),
        ``kept``, ``skipped`` by reason (``malformed``, ``wrong_category``, ``no_title``,
        ``duplicate``, ``no_images``, ``download_failed``; they add up to ``records - kept``),
        ``malformed_examples`` (``"file:line"``, at most 10), ``layouts`` (well-formed records per
        dump layout), ``images``
        (``downloaded``, ``reused``, ``failed``, ``linked``, ``copied``), ``failed_examples``,
        ``splits`` (sizes) and ``paths``.
    """
    if images_dir is None and not download:
        raise ValueError("no image source: pass images_dir=<folder with one sub-folder of images per ASIN> to use "
                         "images you have, or download=True to download the image URLs of the metadata")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if min_images < 1 or workers < 1 or retries < 1:
        raise ValueError(f"min_images, workers and retries must be >= 1, got {min_images}, {workers}, {retries}")
    paths = [Path(metadata)] if isinstance(metadata, (str, os.PathLike)) else [Path(p) for p in metadata]
    if not paths:
        raise ValueError("no metadata files given")
    categories = frozenset(c.strip() for c in categories)
    fetch = fetch or urllib_fetch
    out = Path(out_dir)
    image_root = out / IMAGE_DIR
    image_root.mkdir(parents=True, exist_ok=True)

    skipped = Counter({k: 0 for k in ("malformed", "wrong_category", "no_title", "duplicate", "no_images",
                                      "download_failed")})
    layouts, images = Counter({"2018": 0, "2023": 0}), Counter({k: 0 for k in ("downloaded", "reused", "failed",
                                                                                "linked", "copied", "unreadable")})
    malformed_examples: List[str] = []
    failed_examples: List[str] = []
    records = 0
    products: Dict[str, _Product] = {}
    for path in paths:
        for line, record in _read_records(path):
            records += 1
            layout, reason, product = (_parse_record(record, categories) if record is not None
                                       else (None, "malformed", None))
            if layout is not None:
                layouts[layout] += 1
            if product is None:
                skipped[reason] += 1
                if reason == "malformed" and len(malformed_examples) < 10:
                    malformed_examples.append(f"{path}:{line}")
            elif product.asin in products:
                skipped["duplicate"] += 1
            else:
                products[product.asin] = product
    log.info("%d records read, %d fashion products with a title", records, len(products))

    files: Dict[str, List[str]] = {}
    pending: List[_Product] = []
    unreadable_examples: List[str] = []
    for asin, product in _progress(products.items(), len(products) if images_dir is not None else 0, "products"):
        local = _local_images(Path(images_dir) / asin) if images_dir is not None else []
        readable = [src for src in local if _decodes(src, unreadable_examples)]
        images["unreadable"] += len(local) - len(readable)
        local = readable
        if local and len(local) >= min_images:
            (image_root / asin).mkdir(exist_ok=True)
            for src in local:
                images[_place(src, image_root / asin / src.name)] += 1
            files[asin] = [src.name for src in local]
        elif download and not local and len(product.urls) >= min_images:
            pending.append(product)
        else:
            skipped["no_images"] += 1

    if pending:
        done: Dict[str, Dict[int, str]] = {p.asin: {} for p in pending}
        pool = ThreadPoolExecutor(max_workers=workers)
        try:
            futures = {}
            for product in pending:
                (image_root / product.asin).mkdir(exist_ok=True)
                for k, url in enumerate(product.urls):
                    name = f"{product.asin}_{k}{_suffix(url)}"
                    future = pool.submit(_download, url, image_root / product.asin / name, fetch, retries, timeout,
                                         backoff)
                    futures[future] = (product.asin, k, name, url)
            for future in _progress(as_completed(futures), len(futures)):
                asin, k, name, url = futures[future]
                outcome, reason = future.result()
                images[outcome] += 1
                if outcome == "failed":
                    if len(failed_examples) < 10:
                        failed_examples.append(f"{url}: {reason}")
                else:
                    done[asin][k] = name
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # Ctrl-C: stop now, the next run resumes
            raise
        pool.shutdown()
        for product in pending:
            got = [done[product.asin][k] for k in sorted(done[product.asin])]
            if len(got) >= min_images:
                files[product.asin] = got
            else:
                skipped["download_failed"] += 1
                folder = image_root / product.asin
                if not any(folder.iterdir()):
                    folder.rmdir()

    asins = sorted(files)
    order = np.random.default_rng(seed).permutation(len(asins))
    n_test = int(round(len(asins) * test_fraction))
    split = {"train": sorted(asins[i] for i in order[n_test:]), "test": sorted(asins[i] for i in order[:n_test])}
    meta = {a: {"images": files[a], "title": products[a].title, "brand": products[a].brand} for a in asins}

    report = {
        "records": records,
        "kept": len(asins),
        "skipped": dict(skipped),
        "malformed_examples": malformed_examples,
        "layouts": dict(layouts),
        "images": dict(images),
        "failed_examples": failed_examples,
        "unreadable_examples": unreadable_examples,
        "splits": {name: len(v) for name, v in split.items()},
        "seed": seed,
        "test_fraction": test_fraction,
        "paths": {"root": str(out), "meta": str(out / META_FILE), "split": str(out / SPLIT_FILE),
                  "images": str(image_root), "report": str(out / REPORT_FILE)},
    }
    _write_json(out / REPORT_FILE, report, indent=2)
    if not asins:
        raise DataError(f"no products kept from {[str(p) for p in paths]}: skipped {dict(skipped)}; "
                        f"see {out / REPORT_FILE}")
    _write_json(out / META_FILE, meta)
    _write_json(out / SPLIT_FILE, split)
    return report


def _progress(iterable, total: int, unit: str = "images"):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return iterable
    return tqdm(iterable, total=total, desc=unit, disable=None if total else True)  # silent when not a terminal


def _decodes(path: Path, problems: List[str], keep: int = 10) -> bool:
    """Whether a local image decodes completely; the first ``keep`` problems are listed."""
    try:
        open_image(path)
        return True
    except DataError as err:
        if len(problems) < keep:
            problems.append(str(err))
        return False
