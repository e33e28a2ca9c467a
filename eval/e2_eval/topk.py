"""Exact top-k search over a gallery of any size: chunks of queries against chunks of the gallery (a
tensor, or memory-mapped embedding shards), screened so that the cost stays close to the matrix
product's, with bounded extra memory.

Features are L2-normalised float tensors, so a dot product is the cosine similarity. On equal scores the
lower gallery index ranks first, whatever ``chunk_size`` is.
"""

import math

import numpy as np
import torch

__all__ = ["topk_indices"]


def _check_features(name, x):
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or not x.is_floating_point():
        raise ValueError(f"{name} must be a 2-D float tensor (items, dim), got "
                         f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
    _check_finite(name, x)


def _check_finite(name, x):
    # A sum is one cheap pass and finite whenever every value is; the exact test only when in doubt.
    if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def _check_pair(a_name, a, b_name, b):
    _check_features(a_name, a)
    _check_features(b_name, b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{a_name} has dimension {a.shape[1]} but {b_name} has {b.shape[1]}")


def _check_ks(ks):
    ks = (ks,) if isinstance(ks, int) else tuple(ks)
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    return ks


def _check_chunk_size(chunk_size):
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")


def _compute_dtype(dtype):
    """float16 and bfloat16 are scored in float32; float32 and float64 as they are."""
    return torch.promote_types(dtype, torch.float32)


#: A gallery chunk's items are screened in strided groups of this many (see ``_RunningTopK``), and
#: candidates are merged once there are ``_WAIT`` groups per query waiting or ``_WAIT_CHUNKS`` chunks'
#: worth (small tensors kept longer pin the freed memory of chunks' temporaries in the allocator, and
#: the resident size grew with the gallery).
_GROUP = 8
_WAIT, _WAIT_CHUNKS = 4, 8
_LOW_31, _LOW_32 = 2**31 - 1, 2**32 - 1


def _select_topk(values, indices, k):
    """Top ``k`` of each row by (score descending, gallery index ascending), in that order.

    Columns may come in any order; gallery indices are below 2**32. float32 scores are ranked by one
    64-bit key per entry, the score's bits made order-preserving above the complement of the index, so
    one ``topk`` settles ties as well; other dtypes by two stable sorts.
    """
    if values.dtype == torch.float32:
        bits = (values + 0.0).view(torch.int32)                         # + 0.0: -0.0 ranks as 0.0
        keys = ((bits ^ ((bits >> 31) & _LOW_31)).long() << 32) | (_LOW_32 - indices)
        keys = keys.topk(k, dim=1).values
        bits = (keys >> 32).int()
        return (bits ^ ((bits >> 31) & _LOW_31)).view(torch.float32), _LOW_32 - (keys & _LOW_32)
    order = indices.sort(dim=1).indices
    values, indices = values.gather(1, order), indices.gather(1, order)
    order = values.sort(dim=1, descending=True, stable=True).indices[:, :k]   # stable: lower index first
    return values.gather(1, order), indices.gather(1, order)


class _Screens:
    """Buffers for a chunk's group maxima and candidate mask, kept from chunk to chunk and shared by the
    query chunks, which take their turns."""

    def __init__(self):
        self.maxima = self.hits = None

    def get(self, n, rows, scores):
        size = n * rows
        if self.maxima is None or self.maxima.numel() < size:
            self.maxima = scores.new_empty(size)
            self.hits = torch.empty(size, dtype=torch.bool, device=scores.device)
        return self.maxima[:size].view(n, rows), self.hits[:size].view(n, rows)


class _RunningTopK:
    """The top ``k`` of each of ``rows`` queries over the gallery chunks added so far, in gallery order.

    A chunk's scores come gallery-major, (items, queries): ``gallery_chunk @ queries.T`` is the faster
    matrix product here. Only scores that can still enter the top k are kept: the chunk's items are
    screened in groups of ``_GROUP``, group j holding items j, j + n, j + 2n, ... (so that its maxima
    are an element-wise maximum of contiguous rows, the fast reduction). Each query keeps a floor, a
    score that k items seen before reach: a group is a candidate only if its maximum beats the floor
    (strictly: on a tie the earlier item wins) and, when more than one group per query would be,
    reaches a score that k items of the chunk itself reach (``_chunk_bound``, which then raises the
    floor). The last ``width % _GROUP`` items are always candidates. Candidates wait (see ``_WAIT``),
    then are merged into the top k, whose k-th score raises the floor.
    """

    def __init__(self, rows, k, dtype, device, screens):
        self.k, self.rows, self.seen = k, rows, 0
        self.values = torch.empty(rows, 0, dtype=dtype, device=device)
        self.indices = torch.empty(rows, 0, dtype=torch.long, device=device)
        self.floor = torch.full((rows,), -math.inf, dtype=dtype, device=device)
        self.pending, self.pending_groups = [], 0
        self.screens = screens

    def add(self, scores, offset):
        """Screens the (items, queries) scores of gallery items ``offset, offset + 1, ...``; False if
        any is NaN or infinite."""
        width, rows = scores.shape
        n, tail = width // _GROUP, width % _GROUP
        maxima, hits = self.screens.get(n, rows, scores)
        torch.amax(scores[:n * _GROUP].view(_GROUP, n, rows), dim=0, out=maxima)  # (n, rows): group j, query i
        row_best = maxima.amax(dim=0) if n else scores.new_zeros(rows)           # NaN if a score is
        if not torch.isfinite(row_best.sum() + scores[width - tail:].sum()):
            return False
        torch.gt(maxima, self.floor, out=hits)
        if n >= self.k and hits.sum() > self.rows:               # the chunk's own k-th best bounds more
            bound = self._chunk_bound(maxima)
            below = bound.nextafter(bound.new_tensor(-math.inf))  # above the float below the bound: at least the bound
            torch.gt(maxima, torch.maximum(self.floor, below), out=hits)
            torch.maximum(self.floor, bound, out=self.floor)
        hit_groups, hit_rows = hits.nonzero(as_tuple=True)
        if len(hit_rows):
            items = hit_groups[:, None] + n * torch.arange(_GROUP, device=scores.device)     # (hits, _GROUP)
            values = scores.view(-1).index_select(0, (items * rows + hit_rows[:, None]).view(-1))
            self._wait(hit_rows, values.view(-1, _GROUP), offset + items)
        if tail:
            values = scores.new_full((rows, _GROUP), -math.inf)                # padding: never selected
            values[:, :tail] = scores[width - tail:].t()
            indices = torch.arange(offset + width - tail, offset + width - tail + _GROUP, device=scores.device)
            self._wait(torch.arange(rows, device=scores.device), values, indices.expand(rows, _GROUP))
        self.seen += width
        if self.pending_groups >= _WAIT * self.rows or len(self.pending) >= _WAIT_CHUNKS:
            self._merge()
        return True

    def _chunk_bound(self, maxima):
        """Per query, a score that at least k items of the chunk reach: the k-th largest maximum of
        about 4k disjoint sets of groups (cheaper to find than the k-th largest group maximum, and
        never above it)."""
        n, rows = maxima.shape
        per = max(1, n // (4 * self.k))
        sets = n // per
        if per > 1:
            maxima = maxima[:per * sets].view(per, sets, rows).amax(dim=0)
        return maxima.t().topk(self.k, dim=1).values[:, -1]

    def _wait(self, rows, values, indices):
        self.pending.append((rows, values, indices))
        self.pending_groups += len(rows)

    def _merge(self):
        if not self.pending:
            return
        rows, values, indices = (torch.cat(parts) for parts in zip(*self.pending))
        self.pending, self.pending_groups = [], 0
        counts = torch.bincount(rows, minlength=self.rows)
        changed = counts.nonzero()[:, 0]
        position = torch.empty(self.rows, dtype=torch.long, device=rows.device)
        position[changed] = torch.arange(len(changed), device=rows.device)
        order = rows.argsort(stable=True)                  # each group's slot: its rank among its row's groups
        slot = torch.empty_like(rows)
        slot[order] = torch.arange(len(rows), device=rows.device) - (counts.cumsum(0) - counts)[rows[order]]
        slots = int(counts.max())
        target = position[rows] * slots + slot
        padded_values = values.new_full((len(changed) * slots, _GROUP), -math.inf).index_copy_(0, target, values)
        padded_indices = indices.new_zeros((len(changed) * slots, _GROUP)).index_copy_(0, target, indices)
        shape = (len(changed), slots * _GROUP)
        known = self.values.shape[1]
        values, indices = _select_topk(
            torch.cat([self.values.index_select(0, changed), padded_values.view(shape)], dim=1),
            torch.cat([self.indices.index_select(0, changed), padded_indices.view(shape)], dim=1),
            min(self.k, self.seen))
        if known < self.k:                                   # the first merge: every row has candidates
            self.values, self.indices = values, indices
        else:
            self.values.index_copy_(0, changed, values)
            self.indices.index_copy_(0, changed, indices)
        if self.values.shape[1] == self.k:
            torch.maximum(self.floor, self.values[:, -1], out=self.floor)

    def result(self):
        self._merge()
        return self.indices


def _gallery_shape(gallery):
    shape = tuple(getattr(gallery, "shape", ()))
    dtype = getattr(gallery, "dtype", None)
    floating = dtype.is_floating_point if isinstance(dtype, torch.dtype) else np.dtype(dtype or "O").kind == "f"
    if len(shape) != 2 or not floating or not hasattr(gallery, "__getitem__"):
        raise ValueError(f"gallery must be a 2-D float tensor or array (items, dim), got "
                         f"{type(gallery).__name__} {shape} {dtype}")
    return shape


def _gallery_rows(gallery, start, stop, device, dtype):
    rows = gallery[start:stop]
    if not isinstance(rows, torch.Tensor):
        rows = torch.from_numpy(np.array(rows))                     # a copy: memory-mapped files stay read-only
    return rows.to(device=device, dtype=dtype)


@torch.no_grad()
def topk_indices(queries, gallery, k, chunk_size=4096):
    """Indices of the ``k`` most similar gallery items for each query, best first.

    Similarity is the dot product (cosine for L2-normalised features). The gallery is read once, in
    chunks of ``chunk_size`` rows, and scored against chunks of ``chunk_size`` queries; each query
    keeps a running top ``k``. Few scores of a chunk can enter it: the chunk's items are screened in
    groups of 8 by their maximum and only groups that can are merged, so the cost stays close to that
    of the matrix product alone (the worst case, every chunk scoring all its items equal and above the
    chunks before it, makes every group a candidate: still exact, about 5 times slower).

    ``gallery`` is a tensor or anything with ``shape``, ``dtype`` and row slicing that returns arrays,
    such as a ``numpy.memmap`` or ``e2_embed.EmbeddingShards``: only one chunk of it is in memory at a
    time, moved to the queries' device. Extra memory, beside the (Q, k) result, is bounded by the
    chunk sizes: at most about ``160 * q * (g + k)`` bytes for q = min(Q, chunk_size) queries and
    g = min(G, chunk_size) gallery rows (float32), plus one converted gallery chunk. Measured with
    1,000 queries and the default 4096: under 55 MB on clustered embeddings, about 470 MB in that worst
    case; a smaller ``chunk_size`` lowers both.

    Ties: on equal scores the lower gallery index ranks first, independent of ``chunk_size``.
    ``k`` larger than the gallery is clipped to its size. Features that require grad are searched as
    they are (nothing is recorded for autograd).

    Returns:
        LongTensor (Q, min(k, G)) on the queries' device.

    Example:
        >>> q = torch.tensor([[1.0, 0.0]])
        >>> g = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
        >>> topk_indices(q, g, k=5).tolist()   # k clipped to 3; items 0 and 2 tie, 0 first
        [[1, 0, 2]]
    """
    _check_features("queries", queries)
    num_gallery, dim = _gallery_shape(gallery)
    if dim != queries.shape[1]:
        raise ValueError(f"queries has dimension {queries.shape[1]} but gallery has {dim}")
    _check_chunk_size(chunk_size)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    if num_gallery == 0:
        raise ValueError("gallery is empty")
    if num_gallery > _LOW_32:
        raise ValueError(f"gallery has {num_gallery} items; search at most 2**32 - 1 at a time and merge the results")
    k = min(k, num_gallery)
    device, dtype = queries.device, _compute_dtype(queries.dtype)
    starts = range(0, queries.shape[0], chunk_size)
    screens = _Screens()
    tops = [_RunningTopK(min(chunk_size, queries.shape[0] - s), k, dtype, device, screens) for s in starts]
    buffer = torch.empty(min(queries.shape[0], chunk_size) * min(num_gallery, chunk_size), dtype=dtype,
                         device=device)
    for g_start in range(0, num_gallery, chunk_size):
        g = _gallery_rows(gallery, g_start, g_start + chunk_size, device, dtype)
        for top, q_start in zip(tops, starts):
            q = queries[q_start:q_start + chunk_size].to(dtype)
            scores = torch.mm(g, q.T, out=buffer[:g.shape[0] * q.shape[0]].view(g.shape[0], q.shape[0]))
            if not top.add(scores, g_start):
                name = f"gallery rows {g_start}:{g_start + g.shape[0]}"
                _check_finite(name, g)
                raise ValueError(f"the scores of {name} overflow {dtype}; scale the features down")
    if not tops:
        return torch.empty(0, k, dtype=torch.long, device=device)
    return torch.cat([top.result() for top in tops])
