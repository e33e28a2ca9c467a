"""The ``index`` task: a faiss index over a shard folder of ``run embed``, built shard by shard, and its reader.

``e2-plugins run index --embeddings catalog-emb`` writes ``catalog-emb/index/img_emb.faiss`` and, beside it,
``img_emb.json``: the faiss description, the search settings, what it was built from (the folder's manifest
digest: a folder changed since is refused) and its recall@10 against exact search. :func:`open_index` reads it
back, bound to the memory-mapped shards for reranking and for the items' metadata.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

from e2_core.errors import check_at_least
from e2_core.registry import Task

from .shards import MANIFEST, EmbeddingShards, _write_json

log = logging.getLogger(__name__)

__all__ = ["build_index", "open_index"]

#: embedding kind -> the folder's embedding name
NAMES = {"img": "img_emb", "text": "text_emb"}


def build_index(embeddings: Path, kind: Literal["img", "text"] = "img", spec: str = "auto", nprobe: int = 32,
                rerank: Optional[int] = None, train_size: Optional[int] = None, check: int = 1000, out: Optional[Path] = None,
                progress: bool = True) -> dict:
    """Build a faiss index over a finished shard folder of `run embed`, adding it shard by shard.

    Memory beyond the index is one chunk of rows and the training sample: a catalog larger than memory is
    indexed from its memory-mapped shards. The default, auto, is IVF with about 4*sqrt(items) lists, storing
    the vectors whole up to 2 GiB of them (a million 512-d items), and beyond that in D/8 bytes per item
    (product quantisation) searched with reranking: the best k*rerank candidates rescored exactly from the
    shards. The index and a description (index/<name>.json: settings, build
    times, recall@10 against exact search on --check queries) are written at the end, atomically; a killed
    build is started again by the same command.

    Args:
        embeddings: the shard folder written by `e2-plugins run embed --shard-size N`
        kind: which embeddings to index: img (image rows) or text
        spec: faiss index_factory description (IVF4096,PQ64; IVF4096,Flat; HNSW32; Flat), or auto (IVF: whole vectors up to 2 GiB of them, D/8-byte codes beyond)
        nprobe: inverted lists searched per query (more: slower, more exact)
        rerank: rescore the best k*rerank candidates exactly from the shards (0: the index's own scores; unset: 10 for compressed storage such as PQ, else 0)
        train_size: rows that train the index (unset: 100,000, or 40 per inverted list where that is more)
        check: queries for the recall@10 check against exact search (the folder's other kind of embeddings where there are any, e.g. texts for images; else gallery rows); one exact pass over the gallery; 0 skips it
        out: the index file (default: EMBEDDINGS/index/<name>.faiss)
        progress: show progress
    """
    from e2_eval import FaissIndex, neighbour_recall, topk_indices

    check_at_least(0, rerank=rerank, check=check)
    check_at_least(1, nprobe=nprobe)
    embeddings, name = Path(embeddings), NAMES[kind]
    gallery = EmbeddingShards(embeddings, name)
    out = Path(out) if out is not None else embeddings / "index" / f"{name}.faiss"
    out.parent.mkdir(parents=True, exist_ok=True)
    index = FaissIndex(gallery, spec, nprobe=nprobe, rerank=rerank, train_size=train_size, progress=progress)
    report = {"index": str(out), "spec": index.spec, "items": len(gallery), "dim": gallery.shape[1],
              "train_rows": index.train_rows, "train_seconds": round(index.train_seconds, 1),
              "add_seconds": round(index.add_seconds, 1),
              "search": {"nprobe": nprobe, "rerank": index.rerank}, "embeddings": _source(embeddings, name)}
    if check:
        queries, source = _check_queries(embeddings, kind, gallery, check)
        if progress:
            log.info("recall check: exact top-10 of %d queries (%s) in one pass over the gallery", len(queries), source)
        exact = topk_indices(queries, gallery, 10)
        recall, rerank = {"queries": len(queries), "from": source}, index.rerank
        for label, depth in (("recall@10", rerank), ("recall@10 without rerank", 0))[:2 if rerank else 1]:
            index.rerank = depth
            started = time.perf_counter()
            recall[label] = round(neighbour_recall(index.search(queries, 10), exact), 4)
            recall[label.replace("recall@10", "ms per query")] = round(1e3 * (time.perf_counter() - started) / len(queries), 3)
        index.rerank = rerank
        report["check"] = recall
    index.save(out)
    report["bytes"] = out.stat().st_size     # about what the index holds in memory (never serialised twice)
    _write_json(out.with_suffix(".json"), report)
    return report


def open_index(embeddings: Path, kind: Literal["img", "text"] = "img", index: Optional[Path] = None,
               nprobe: Optional[int] = None, rerank: Optional[int] = None):
    """The index ``build_index`` wrote for a shard folder, as an ``e2_eval.FaissIndex`` searching those shards
    (``.gallery``: the :class:`EmbeddingShards`, whose ``metadata()`` names each row's image or text). Search
    settings default to those it was built with. A folder changed since the index was built is refused.

    Example:
        >>> index = open_index("catalog-emb")                                  # doctest: +SKIP
        >>> rows = index.search(text_features, k=10)                           # doctest: +SKIP
        >>> [index.gallery.metadata()[r]["image_path"] for r in rows[0]]       # doctest: +SKIP
    """
    from e2_eval import FaissIndex

    embeddings, name = Path(embeddings), NAMES[kind]
    path = Path(index) if index is not None else embeddings / "index" / f"{name}.faiss"
    build = f"build it with `e2-plugins run index --embeddings {embeddings} --kind {kind}`"
    try:
        info = json.loads(path.with_suffix(".json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path.with_suffix('.json')}: no index description; {build}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path.with_suffix('.json')}: not valid JSON ({err}); {build}") from None
    if info.get("embeddings") != _source(embeddings, name):
        raise ValueError(f"{path} was built from another state of {embeddings} (its {MANIFEST} changed since, "
                         f"or another folder); {build}")
    settings = info.get("search", {})
    loaded = FaissIndex.load(path, EmbeddingShards(embeddings, name),
                             nprobe=settings.get("nprobe", 32) if nprobe is None else nprobe,
                             rerank=settings.get("rerank", 0) if rerank is None else rerank)
    loaded.spec = info.get("spec")
    return loaded


def _source(embeddings: Path, name: str) -> dict:
    """What an index is built from: the embedding name and the folder manifest's digest."""
    return {"name": name, "manifest_sha256": hashlib.sha256((embeddings / MANIFEST).read_bytes()).hexdigest()}


def _check_queries(embeddings: Path, kind: str, gallery: EmbeddingShards, count: int):
    """``count`` evenly spaced queries: the folder's other kind of embeddings where it has any, else gallery rows."""
    other = NAMES["text" if kind == "img" else "img"]
    try:
        source, label = EmbeddingShards(embeddings, other), other
    except ValueError:
        source, label = gallery, f"{NAMES[kind]} (gallery rows: each finds itself)"
    rows = np.unique(np.linspace(0, len(source) - 1, min(count, len(source))).astype(np.int64))
    return torch.from_numpy(np.array(source[rows], dtype=np.float32)), label


task = Task("index", build_index)
