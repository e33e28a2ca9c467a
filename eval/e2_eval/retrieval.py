"""Cross-modal retrieval metrics: Recall@K, the full and the sample-100 protocols (top-k search itself is
``e2_eval.topk``).

Features are L2-normalised float tensors, so a dot product is the cosine similarity. Nothing here
normalises them for you.

Tie conventions (stated once here, repeated in each docstring):

* Full protocol (``topk_indices``, ``recall_at_k``, ``cross_modal_retrieval``): on equal scores the
  lower gallery index ranks first, whatever ``chunk_size`` is. A positive tied with negatives counts as
  retrieved at K only if this rule puts it in the top K.
* Sample protocol (``sampled_retrieval``): a negative that scores exactly as high as the positive ranks
  above it (pessimistic), so all-equal features score 0 at every K smaller than the candidate list.
"""

import numpy as np
import torch

from .topk import _check_chunk_size, _check_ks, _check_pair, _compute_dtype, topk_indices

__all__ = ["RetrievalRecall", "cross_modal_retrieval", "recall_at_k", "sample_negatives", "sampled_retrieval",
           "topk_indices"]


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
            advice = (f"ask for at most {len(smallest) - 1}" if len(smallest) > 1
                      else "drop or merge single-item groups")
            raise ValueError(f"group {key!r} has only {len(smallest)} item(s), so {len(smallest) - 1} possible "
                             f"negatives per item, but {num_negatives} negatives were asked for; {advice}")

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
