"""Cross-modal retrieval metrics: top-k search, Recall@K, the full and the sample-100 protocols.

Features are L2-normalised float tensors, so a dot product is the cosine similarity. Nothing here
normalises them for you.

Tie conventions (stated once here, repeated in each docstring):

* Full protocol (``topk_indices``, ``recall_at_k``, ``cross_modal_retrieval``): on equal scores the
  lower gallery index ranks first, whatever ``chunk_size`` is. A positive tied with negatives counts as
  retrieved at K only if this rule puts it in the top K.
* Sample protocol (``sampled_retrieval``): a negative that scores exactly as high as the positive ranks
  above it (pessimistic), so all-equal features score 0 at every K smaller than the candidate list.
"""

import math

import numpy as np
import torch

__all__ = ["RetrievalRecall", "cross_modal_retrieval", "recall_at_k", "sample_negatives", "sampled_retrieval",
           "topk_indices"]


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


def _positives_tensor(positives, num_queries, num_gallery):
    """(Q, P) LongTensor of the positive gallery indices of each query, padded with -1."""
    if isinstance(positives, torch.Tensor):
        if positives.ndim != 1 or positives.is_floating_point() or positives.is_complex():
            raise ValueError(f"a positives tensor must be a 1-D integer tensor (Q,), got "
                             f"{positives.dtype} {tuple(positives.shape)}")
        rows = [[j] for j in positives.tolist()]
    else:
        rows = [sorted(set(int(j) for j in p)) for p in positives]
    if len(rows) != num_queries:
        raise ValueError(f"positives has {len(rows)} entries for {num_queries} queries")
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"query {i} has no positive; Recall@K is undefined for it, leave it out")
        if row[0] < 0 or row[-1] >= num_gallery:
            raise ValueError(f"query {i} has positive indices {row}, outside the gallery [0, {num_gallery})")
    table = torch.full((len(rows), max(len(row) for row in rows)), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        table[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return table


def recall_at_k(queries, gallery, positives, ks=(1, 5, 10), chunk_size=4096):
    """Recall@K in percent: the share of queries with at least one positive among their top K.

    Args:
        queries: (Q, D) L2-normalised features.
        gallery: (G, D) L2-normalised features.
        positives: LongTensor (Q,) with the one positive gallery index per query, or a list of Q
            sets/lists of positive gallery indices (several positives per query). Every query needs one.
        ks: the cut-offs. K larger than the gallery means the whole gallery (so 100).
        chunk_size: rows per chunk, see ``topk_indices``.

    Ties: deterministic and pessimistic towards a positive with a higher index. On equal scores the
    lower gallery index ranks first, so a positive tied with negatives counts only if it still falls in
    the top K under that rule.

    Returns:
        ``{K: recall}`` with floats in [0, 100].

    Example:
        >>> q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> g = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
        >>> recall_at_k(q, g, torch.tensor([0, 0]), ks=(1, 2))   # query 1 ranks item 1 above item 0
        {1: 50.0, 2: 100.0}
    """
    ks = _check_ks(ks)
    _check_pair("queries", queries, "gallery", gallery)
    if queries.shape[0] == 0:
        raise ValueError("queries is empty")
    table = _positives_tensor(positives, queries.shape[0], gallery.shape[0])
    top = topk_indices(queries, gallery, max(ks), chunk_size=chunk_size).cpu()      # (Q, K)
    hits = (top[:, :, None] == table[:, None, :]).any(dim=2)                         # (Q, K)
    return {k: hits[:, :k].any(dim=1).double().mean().item() * 100.0 for k in ks}


def _paired(image_features, text_features):
    _check_pair("image_features", image_features, "text_features", text_features)
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(f"image_features has {image_features.shape[0]} items but text_features has "
                         f"{text_features.shape[0]}; item i's image must match item i's text")
    if image_features.shape[0] == 0:
        raise ValueError("no items")
    return image_features.shape[0]


def cross_modal_retrieval(image_features, text_features, ks=(1, 5, 10), chunk_size=4096):
    """Image-to-text and text-to-image Recall@K under the full protocol (rank against all N items).

    Item i's image matches item i's text and nothing else. Ties: the lower index ranks first (see
    ``recall_at_k``).

    Returns:
        ``{"i2t": {K: recall}, "t2i": {K: recall}, "sumr": sum of all the recalls}``.

    Example:
        >>> x = torch.eye(3)
        >>> cross_modal_retrieval(x, x, ks=(1,))
        {'i2t': {1: 100.0}, 't2i': {1: 100.0}, 'sumr': 200.0}
    """
    ks = _check_ks(ks)
    n = _paired(image_features, text_features)
    targets = torch.arange(n)
    i2t = recall_at_k(image_features, text_features, targets, ks, chunk_size)
    t2i = recall_at_k(text_features, image_features, targets, ks, chunk_size)
    return {"i2t": i2t, "t2i": t2i, "sumr": sum(i2t.values()) + sum(t2i.values())}


def sample_negatives(groups, num_negatives=100, seed=0):
    """For each item, ``num_negatives`` distinct other items of the same group, drawn reproducibly.

    Args:
        groups: a sequence (list, array, 1-D tensor) of hashable group keys, one per item, e.g. the
            sub-category of each product.
        num_negatives: negatives per item.
        seed: seed of the ``numpy.random.Generator``; the same groups and seed give the same result.

    Raises:
        ValueError: if a group has fewer than ``num_negatives`` other members (nothing is padded);
            the smallest such group is named with its size.

    Returns:
        LongTensor (N, num_negatives) of item indices; row i never contains i.

    Example:
        >>> sample_negatives(["shirt", "shirt", "shirt", "jeans", "jeans"], num_negatives=1).shape
        torch.Size([5, 1])
    """
    if isinstance(groups, (torch.Tensor, np.ndarray)):
        groups = groups.tolist()
    if not isinstance(num_negatives, int) or num_negatives < 0:
        raise ValueError(f"num_negatives must be a non-negative integer, got {num_negatives}")
    members = {}
    for i, key in enumerate(groups):
        members.setdefault(key, []).append(i)
    if members:
        key, smallest = min(members.items(), key=lambda item: len(item[1]))
        if len(smallest) - 1 < num_negatives:
            advice = (f"use num_negatives <= {len(smallest) - 1}" if len(smallest) > 1
                      else "drop or merge single-item groups")
            raise ValueError(f"group {key!r} has only {len(smallest)} item(s), so {len(smallest) - 1} possible "
                             f"negatives per item, but num_negatives={num_negatives}; {advice}")

    rng = np.random.default_rng(seed)
    member_arrays = {key: np.asarray(idx, dtype=np.int64) for key, idx in members.items()}
    position = {}
    for idx in members.values():
        position.update((item, p) for p, item in enumerate(idx))
    out = np.empty((len(groups), num_negatives), dtype=np.int64)
    for i, key in enumerate(groups):
        same = member_arrays[key]
        picks = rng.choice(len(same) - 1, size=num_negatives, replace=False)
        picks += picks >= position[i]      # skip the item itself
        out[i] = same[picks]
    return torch.from_numpy(out)


@torch.no_grad()
def _sampled_recall(queries, gallery, candidates, ks, chunk_size):
    """Recall@K of each query against its own candidate list; candidate 0 is the positive."""
    device, dtype = queries.device, _compute_dtype(queries.dtype)
    ranks = []
    for start in range(0, queries.shape[0], chunk_size):
        q = queries[start:start + chunk_size].to(dtype)
        rows = candidates[start:start + chunk_size].to(gallery.device)
        cand = gallery[rows].to(device=device, dtype=dtype)                # (c, 1 + M, D)
        scores = torch.bmm(cand, q[:, :, None])[:, :, 0]                   # (c, 1 + M)
        # Pessimistic: a negative with the positive's exact score ranks above it.
        ranks.append((scores[:, 1:] >= scores[:, :1]).sum(dim=1).cpu())
    rank = torch.cat(ranks)                                                 # 0 = positive ranked first
    return {k: (rank < k).double().mean().item() * 100.0 for k in ks}


def sampled_retrieval(image_features, text_features, groups, num_negatives=100, ks=(1, 5, 10), seed=0,
                      chunk_size=1024):
    """Image-to-text and text-to-image Recall@K under the sample-100 protocol.

    Each query (image i for i2t, text i for t2i) is ranked against its positive (item i of the other
    modality) and ``num_negatives`` items of the same group from ``sample_negatives(groups,
    num_negatives, seed)``; both directions use the same negatives. K larger than the candidate list
    means all of it (so 100).

    Ties: pessimistic. A negative scoring exactly as high as the positive ranks above it.

    ``chunk_size`` queries are scored at a time with a batched matmul over their gathered candidates,
    about ``chunk_size * (1 + num_negatives) * D`` numbers in memory.

    Returns:
        ``{"i2t": {K: recall}, "t2i": {K: recall}, "sumr": sum of all the recalls}``.

    Example:
        >>> x = torch.eye(4)
        >>> sampled_retrieval(x, x, groups=[0, 0, 1, 1], num_negatives=1, ks=(1,))
        {'i2t': {1: 100.0}, 't2i': {1: 100.0}, 'sumr': 200.0}
    """
    ks = _check_ks(ks)
    _check_chunk_size(chunk_size)
    n = _paired(image_features, text_features)
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries for {n} items")
    negatives = sample_negatives(groups, num_negatives, seed)
    candidates = torch.cat([torch.arange(n)[:, None], negatives], dim=1)
    i2t = _sampled_recall(image_features, text_features, candidates, ks, chunk_size)
    t2i = _sampled_recall(text_features, image_features, candidates, ks, chunk_size)
    return {"i2t": i2t, "t2i": t2i, "sumr": sum(i2t.values()) + sum(t2i.values())}


class RetrievalRecall:
    """Accumulates paired image and text features over batches, then computes retrieval recall.

    Features are detached and kept on the CPU; ``compute`` can move them to a ``device`` for scoring.

    Example:
        >>> metric = RetrievalRecall(ks=(1,))
        >>> metric.update(torch.eye(4)[:2], torch.eye(4)[:2])
        >>> metric.update(torch.eye(4)[2:], torch.eye(4)[2:])
        >>> metric.compute()["sumr"]
        200.0
    """

    def __init__(self, ks=(1, 5, 10), chunk_size=4096):
        self.ks = _check_ks(ks)
        _check_chunk_size(chunk_size)
        self.chunk_size = chunk_size
        self.reset()

    def reset(self):
        """Forget everything accumulated."""
        self._images, self._texts = [], []

    def update(self, image_features, text_features):
        """Add a batch of paired features (item i's image matches item i's text)."""
        _paired(image_features, text_features)
        self._images.append(image_features.detach().cpu())
        self._texts.append(text_features.detach().cpu())

    def compute(self, protocol="full", groups=None, num_negatives=100, seed=0, device=None):
        """``cross_modal_retrieval`` (protocol "full") or ``sampled_retrieval`` (protocol "sample",
        which needs ``groups`` for every item accumulated) over everything accumulated."""
        if not self._images:
            raise ValueError("nothing to compute: call update() first")
        images = torch.cat(self._images).to(device or "cpu")
        texts = torch.cat(self._texts).to(device or "cpu")
        if protocol == "full":
            return cross_modal_retrieval(images, texts, self.ks, self.chunk_size)
        if protocol == "sample":
            if groups is None:
                raise ValueError('protocol "sample" needs groups (one group key per accumulated item)')
            return sampled_retrieval(images, texts, groups, num_negatives, self.ks, seed)
        raise ValueError(f'protocol must be "full" or "sample", got {protocol!r}')
