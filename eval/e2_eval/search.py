"""Approximate nearest-neighbour search with faiss, for galleries too large for exact search.

Exact top-k is ``topk_indices``; this optional backend (``pip install 'e2-plugins[faiss]'``) builds a
faiss inner-product index instead: IVF (inverted lists, ``nprobe`` of them searched) or HNSW (a graph),
any faiss ``index_factory`` description. The gallery is read in chunks like ``topk_indices`` reads
it, so memory-mapped embedding shards work; the index itself holds what its description says (a full
copy of the vectors for ``Flat`` storage, far less with ``PQ``). A compressed index can rerank: its best
candidates are rescored exactly with their rows read from the gallery (e.g. the memory-mapped shards).
"""
from __future__ import annotations

import logging
import math
import os
import re
import time
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from .topk import _check_chunk_size, _check_features, _gallery_rows, _gallery_shape

log = logging.getLogger(__name__)

#: ``spec="auto"`` keeps the vectors whole up to this size, and product-quantises them beyond
AUTO_FLAT_BYTES = 2 << 30

__all__ = ["FaissIndex", "neighbour_recall"]


def _faiss():
    try:
        import faiss
    except ImportError as err:
        raise ImportError("the faiss backend needs faiss: pip install 'e2-plugins[faiss]' "
                          "(or use topk_indices for exact search)") from err
    return faiss


class FaissIndex:
    """A faiss inner-product index over a gallery, searched like ``topk_indices`` (approximately).

    Args:
        gallery: (G, D) float tensor or array-like with row slicing (e.g. memory-mapped shards).
        spec: a faiss ``index_factory`` description: ``"IVF4096,Flat"``, ``"HNSW32"``, ``"IVF65536,PQ64"``,
            ``"Flat"`` (exact). ``"auto"`` is IVF with about 4 * sqrt(G) lists, storing the vectors whole
            (``IVF{n},Flat``) up to 2 GiB of them (a million items at D = 512), and beyond that in D/8 bytes
            each (``IVF{n},PQ{D/8}``: product quantisation, 64 bytes at D = 512, against 4D), reranked.
        nprobe: inverted lists searched per query (IVF); more is slower and more exact.
        ef_search: candidate list size of an HNSW search; more is slower and more exact.
        rerank: rescore the index's best ``k * rerank`` candidates exactly, with their rows read from the
            gallery (0: the index's own scores). Compressed storage (PQ, SQ) loses the order among close
            items; reranking restores it for the price of reading those rows. Unset: 10 for compressed
            storage, 0 for whole vectors (whose scores are exact already).
        train_size: gallery rows (evenly spaced) that train the index (IVF centroids, PQ codebooks); unset:
            100,000, or 40 per inverted list where that is more (faiss's k-means wants 39).
        chunk_size: gallery rows read and added at a time: memory beyond the index is one chunk and the
            training rows.
        progress: show a progress bar while the gallery is added.

    Ties are whatever faiss does; use ``topk_indices`` where exact results and tie order matter.

    Example:
        >>> index = FaissIndex(gallery, "IVF1024,Flat", nprobe=16)   # doctest: +SKIP
        >>> index.search(queries, k=10)                               # doctest: +SKIP
        >>> index.save("catalog.faiss")                               # doctest: +SKIP
        >>> FaissIndex.load("catalog.faiss", gallery, rerank=10)      # doctest: +SKIP
    """

    def __init__(self, gallery, spec: str = "auto", nprobe: int = 32, ef_search: int = 128, rerank: Optional[int] = None,
                 train_size: Optional[int] = None, chunk_size: int = 65536, progress: bool = False):
        faiss = _faiss()
        _check_chunk_size(chunk_size)
        num_gallery, dim = _gallery_shape(gallery)
        if num_gallery == 0:
            raise ValueError("gallery is empty")
        spec = resolve_spec(spec, num_gallery, dim)
        try:
            index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as err:
            raise ValueError(f"faiss cannot build {spec!r} ({_faiss_reason(err)}); give an index_factory description "
                             f"such as 'IVF4096,Flat', 'HNSW32', 'IVF65536,PQ64' or 'Flat', or 'auto'") from None
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None and isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQ):
            # polysemous codes serve only a Hamming-threshold search, never enabled here, and take most of
            # the training time (12.7 s against 0.6 s for 20,000 rows, IVF566,PQ8)
            faiss.downcast_index(ivf).do_polysemous_training = False
        self.train_rows, self.train_seconds, started = 0, 0.0, time.perf_counter()
        if not index.is_trained:
            lists = faiss.extract_index_ivf(index).nlist if "IVF" in spec else 0
            sample = self._sample(gallery, num_gallery, train_size or max(100_000, 40 * lists), chunk_size)
            self.train_rows = len(sample)
            if progress:
                log.info("training %s on %d of the %d gallery rows", spec, len(sample), num_gallery)
            try:
                index.train(sample)
            except RuntimeError as err:
                raise ValueError(f"faiss cannot train {spec!r} on {len(sample)} rows of the {num_gallery}-item gallery "
                                 f"({_faiss_reason(err)}); use fewer lists or centroids for a gallery this size, "
                                 f"or spec='auto'") from None
            del sample
        self.train_seconds, started = time.perf_counter() - started, time.perf_counter()
        with tqdm(total=num_gallery, unit="item", desc=f"adding to {spec}", disable=not progress) as bar:
            for start in range(0, num_gallery, chunk_size):
                rows = self._rows(gallery, start, start + chunk_size)
                index.add(rows)
                bar.update(len(rows))
        self.add_seconds, self.spec = time.perf_counter() - started, spec
        self._use(index, gallery, nprobe, ef_search, rerank)

    @classmethod
    def load(cls, path, gallery=None, nprobe: int = 32, ef_search: int = 128,
             rerank: Optional[int] = None) -> "FaissIndex":
        """An index written by :meth:`save`; ``gallery`` (the one it was built from) is needed to rerank
        (``rerank`` unset: 10 for compressed storage given the gallery, else 0)."""
        faiss = _faiss()
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as err:
            raise ValueError(f"{path}: not a faiss index file ({_faiss_reason(err)}); build it again") from None
        if gallery is not None and _gallery_shape(gallery) != (index.ntotal, index.d):
            raise ValueError(f"{path} indexes {index.ntotal} items of dimension {index.d}, but the gallery is "
                             f"{tuple(_gallery_shape(gallery))}: not the gallery it was built from; build it again")
        self = cls.__new__(cls)
        self.spec, self.train_rows, self.train_seconds, self.add_seconds = None, 0, 0.0, 0.0
        self._use(index, gallery, nprobe, ef_search, rerank)
        return self

    def _use(self, index, gallery, nprobe, ef_search, rerank):
        faiss = _faiss()
        self.compressed = not isinstance(faiss.downcast_index(index), (faiss.IndexFlat, faiss.IndexIVFFlat,
                                                                       faiss.IndexHNSWFlat))
        if rerank is None:
            rerank = 10 if self.compressed and gallery is not None else 0
        if not isinstance(rerank, int) or rerank < 0:
            raise ValueError(f"rerank must be a non-negative integer, got {rerank!r}")
        if rerank and gallery is None:
            raise ValueError("rerank reads the candidates' rows from the gallery: give the gallery the index was built from")
        self.index, self.gallery, self.rerank, self.size = index, gallery, rerank, index.ntotal
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.nprobe = nprobe
        if hasattr(index, "hnsw"):
            index.hnsw.efSearch = ef_search

    def save(self, path) -> None:
        """Write the index to ``path`` (atomically: a killed write leaves no partial file)."""
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            _faiss().write_index(self.index, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def _sample(cls, gallery, num_gallery, size, chunk_size):
        """``size`` rows in 100 evenly spaced runs (a gallery sorted by category is sampled everywhere)."""
        if num_gallery <= size:
            return np.concatenate([cls._rows(gallery, s, s + chunk_size) for s in range(0, num_gallery, chunk_size)])
        length = max(1, size // 100)
        starts = np.linspace(0, num_gallery - length, 100).astype(np.int64)
        return np.concatenate([cls._rows(gallery, int(s), int(s) + length) for s in starts])

    @staticmethod
    def _rows(gallery, start, stop):
        return np.ascontiguousarray(_gallery_rows(gallery, start, stop, "cpu", torch.float32).numpy())

    def search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """Indices (Q, min(k, G)) of the approximately most similar gallery items, best first
        (-1 where the index found fewer than k)."""
        _check_features("queries", queries)
        if queries.shape[1] != self.index.d:
            raise ValueError(f"queries has dimension {queries.shape[1]} but the index has {self.index.d}")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k}")
        q = np.ascontiguousarray(queries.detach().to("cpu", torch.float32).numpy())
        k = min(k, self.size)
        _, indices = self.index.search(q, min(k * max(1, self.rerank), self.size))
        indices = torch.from_numpy(indices)
        if self.rerank:
            indices = torch.cat([self._rescore(torch.from_numpy(q[s:s + 256]), indices[s:s + 256], k)
                                 for s in range(0, len(q), 256)])
        return indices[:, :k].to(queries.device)

    def _rescore(self, queries, candidates, k):
        """The ``k`` best of each query's ``candidates`` by the exact dot product with their gallery rows."""
        found = candidates >= 0
        picked = candidates.clamp(min=0).flatten().numpy()
        unique, position = np.unique(picked, return_inverse=True)  # each row read once, in gallery order
        rows = _gallery_take(self.gallery, unique)[torch.from_numpy(position.reshape(-1))]
        scores = torch.einsum("qd,qcd->qc", queries, rows.view(*candidates.shape, -1))
        scores[~found] = -math.inf
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
        return candidates.gather(1, order)


def neighbour_recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    """Recall@k of an approximate search against exact search: the share of the exact top-k rows'
    items that ``found`` (Q, k) holds, over all queries."""
    if found.shape != exact.shape:
        raise ValueError(f"found {tuple(found.shape)} and exact {tuple(exact.shape)} differ in shape")
    return sum(len(set(a) & set(b)) for a, b in zip(found.tolist(), exact.tolist())) / max(1, exact.numel())


def resolve_spec(spec: str, num_gallery: int, dim: int) -> str:
    """``auto`` as the faiss description it stands for at this gallery size; others as given."""
    if spec != "auto":
        return spec
    lists = max(1, min(65536, round(4 * math.sqrt(num_gallery))))
    if num_gallery * dim * 4 <= AUTO_FLAT_BYTES:
        return f"IVF{lists},Flat"
    return f"IVF{lists},PQ{max(m for m in range(1, max(1, dim // 8) + 1) if dim % m == 0)}"


def _gallery_take(gallery, rows: np.ndarray) -> torch.Tensor:
    """float32 rows at the sorted positions ``rows`` of a tensor, an array or ``EmbeddingShards``."""
    if isinstance(gallery, torch.Tensor):
        return gallery.index_select(0, torch.from_numpy(rows).to(gallery.device)).to("cpu", torch.float32)
    return torch.from_numpy(np.asarray(gallery[rows], dtype=np.float32))


def _faiss_reason(err: RuntimeError) -> str:
    """A faiss error without its C++ location and failed condition."""
    return re.sub(r"^Error in .*? at \S+:\d+: (Error: '.*?' failed: )?", "", str(err).strip())
