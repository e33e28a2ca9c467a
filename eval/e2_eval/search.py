"""Approximate nearest-neighbour search with faiss, for galleries too large for exact search.

Exact top-k is ``topk_indices``; this optional backend (``pip install 'e2-plugins[faiss]'``) builds a
faiss inner-product index instead: IVF (inverted lists, ``nprobe`` of them searched) or HNSW (a graph),
any faiss ``index_factory`` description. The gallery is read in chunks like ``topk_indices`` reads
it, so memory-mapped embedding shards work; the index itself holds what its description says (a full
copy of the vectors for ``Flat`` storage, far less with ``PQ``).
"""
from __future__ import annotations

import math
import re

import numpy as np
import torch

from .topk import _check_chunk_size, _check_features, _gallery_rows, _gallery_shape

__all__ = ["FaissIndex"]


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
        spec: a faiss ``index_factory`` description: ``"IVF4096,Flat"``, ``"HNSW32"``, ``"IVF65536,PQ64"``
            (10M+ items in little memory), ``"Flat"`` (exact). ``"auto"`` is ``IVF{n},Flat`` with n about
            4 * sqrt(G) lists.
        nprobe: inverted lists searched per query (IVF); more is slower and more exact.
        ef_search: candidate list size of an HNSW search; more is slower and more exact.
        train_size: gallery rows (evenly spaced) that train the index (IVF centroids, PQ codebooks).
        chunk_size: gallery rows read and added at a time.

    Ties are whatever faiss does; use ``topk_indices`` where exact results and tie order matter.

    Example:
        >>> index = FaissIndex(gallery, "IVF1024,Flat", nprobe=16)   # doctest: +SKIP
        >>> index.search(queries, k=10)                               # doctest: +SKIP
    """

    def __init__(self, gallery, spec: str = "auto", nprobe: int = 32, ef_search: int = 128,
                 train_size: int = 100_000, chunk_size: int = 65536):
        faiss = _faiss()
        _check_chunk_size(chunk_size)
        num_gallery, dim = _gallery_shape(gallery)
        if num_gallery == 0:
            raise ValueError("gallery is empty")
        if spec == "auto":
            spec = f"IVF{max(1, min(65536, round(4 * math.sqrt(num_gallery))))},Flat"
        self.spec, self.size = spec, num_gallery
        try:
            self.index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as err:
            raise ValueError(f"faiss cannot build {spec!r} ({_faiss_reason(err)}); give an index_factory description "
                             f"such as 'IVF4096,Flat', 'HNSW32', 'IVF65536,PQ64' or 'Flat', or 'auto'") from None
        if not self.index.is_trained:
            sample = self._sample(gallery, num_gallery, train_size, chunk_size)
            try:
                self.index.train(sample)
            except RuntimeError as err:
                raise ValueError(f"faiss cannot train {spec!r} on {len(sample)} rows of the {num_gallery}-item gallery "
                                 f"({_faiss_reason(err)}); use fewer lists or centroids for a gallery this size, "
                                 f"or spec='auto'") from None
        for start in range(0, num_gallery, chunk_size):
            self.index.add(self._rows(gallery, start, start + chunk_size))
        params = faiss.extract_index_ivf(self.index) if "IVF" in spec else None
        if params is not None:
            params.nprobe = nprobe
        if hasattr(self.index, "hnsw"):
            self.index.hnsw.efSearch = ef_search

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
        _, indices = self.index.search(q, min(k, self.size))
        return torch.from_numpy(indices).to(queries.device)


def _faiss_reason(err: RuntimeError) -> str:
    """A faiss error without its C++ location and failed condition."""
    return re.sub(r"^Error in .*? at \S+:\d+: (Error: '.*?' failed: )?", "", str(err).strip())
