"""The texts E2 is trained on: one global text per product and one raw string per tag entity."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Mapping, Sequence, Tuple

import torch

from .config import FASHIONGEN_ENTITIES


@dataclass(frozen=True)
class TextSpec:
    """Which tag fields form the global text (in order) and which are regional entities."""

    entities: Tuple[str, ...]
    global_fields: Tuple[str, ...]
    separator: str = ". "


#: FashionGen: ``composition. subcategory. brand. season. description``; the description is an entity too.
FASHIONGEN = TextSpec(FASHIONGEN_ENTITIES, ("composition", "subcategory", "brand", "season", "description"))
#: AmazonFashion: ``brand. title``, the brand is the only entity.
AMAZON_FASHION = TextSpec(("brand",), ("brand", "title"))


def build_texts(tags: Mapping[str, str], spec: TextSpec = FASHIONGEN) -> Tuple[str, List[str]]:
    """``(global text, [one string per entity])`` from one product's tag fields.

    Example:
        >>> build_texts({"brand": "Raf Simons", "title": "Wool coat"}, AMAZON_FASHION)
        ('Raf Simons. Wool coat', ['Raf Simons'])
    """
    needed = dict.fromkeys(spec.global_fields + spec.entities)
    missing = [name for name in needed if name not in tags]
    if missing:
        raise KeyError(f"tag field(s) {missing} missing; this product has {sorted(tags)}")
    values = {name: str(tags[name]).strip() for name in needed}
    global_text = spec.separator.join(values[f] for f in spec.global_fields if values[f])
    return global_text, [values[e] for e in spec.entities]


def trim_padding(tokens: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Cut the columns after the last non-padding token of any row (do it on the CPU, where tokens are made).

    CLIP's text tower gives the same embeddings for the trimmed batch (causal mask, end-token
    pooling) at a fraction of the cost for short strings.
    """
    used = (tokens != pad_id).reshape(-1, tokens.shape[-1]).any(dim=0).nonzero()
    return tokens[..., : int(used.max()) + 1 if len(used) else 1]


@dataclass
class EntityTokens:
    """Each item's K entity strings, tokenized once per distinct string.

    ``tokens`` (U, L): the distinct strings, shortest first, padding trimmed; ``index`` (B, K): which
    row of ``tokens`` is item b's entity k. Items with the same ``index[:, k]`` share entity k's value,
    so ``index`` doubles as the labels of the loss's multi-positive targets. ``buckets`` splits the rows
    into length classes, ``(end row, columns)`` each, so a brand is not padded to a description's length
    (:meth:`spans`); empty means one bucket of every row and column.
    """

    tokens: torch.Tensor
    index: torch.Tensor
    buckets: Tuple[Tuple[int, int], ...] = ()

    def __len__(self) -> int:
        return self.index.shape[0]

    def spans(self) -> List[Tuple[int, int, int]]:
        """``(start row, end row, columns)`` of each length bucket."""
        buckets = self.buckets or ((self.tokens.shape[0], self.tokens.shape[1]),)
        starts = [0] + [end for end, _ in buckets[:-1]]
        return [(start, end, columns) for start, (end, columns) in zip(starts, buckets)]

    def to(self, device) -> "EntityTokens":
        return EntityTokens(self.tokens.to(device, non_blocking=True), self.index.to(device, non_blocking=True),
                            self.buckets)


def tokenize_entities(tokenizer, entity_strings: Sequence[Sequence[str]], min_bucket: int = 8) -> EntityTokens:
    """Per-item lists of K entity strings -> :class:`EntityTokens`.

    Distinct strings are sorted by token length and split into buckets, from the longest down: a bucket
    takes every string longer than half its longest one (all of them once that is ``min_bucket`` tokens or
    fewer), so no string is padded to more than twice its length. Brands and seasons are a few tokens,
    descriptions dozens, and the text tower's cost is rows x columns.

    Example:
        >>> et = tokenize_entities(get_tokenizer("ViT-B-32"), [["SHIRTS", "Acne"], ["SHIRTS", "Prada"]])  # doctest: +SKIP
        >>> et.index.tolist()  # doctest: +SKIP
        [[0, 1], [0, 2]]
    """
    if not entity_strings:
        raise ValueError("no entity strings given")
    k = len(entity_strings[0])
    bad = [i for i, row in enumerate(entity_strings) if len(row) != k]
    if bad:
        raise ValueError(f"items {bad[:5]} have a different number of entity strings than item 0 ({k})")
    distinct = list(dict.fromkeys(s for row in entity_strings for s in row))
    tokens = tokenizer(distinct)
    lengths = (tokens != 0).long().cumsum(dim=1).argmax(dim=1) + 1  # last non-padding position + 1
    order = torch.argsort(lengths, stable=True)
    tokens, lengths = tokens[order], lengths[order].tolist()
    row_of = {distinct[i]: row for row, i in enumerate(order.tolist())}
    buckets, end = [], len(lengths)  # from the longest string down: a bucket pads each of its strings at most 2x
    while end:
        columns = lengths[end - 1]
        start = end
        while start and (2 * lengths[start - 1] > columns or columns <= min_bucket):
            start -= 1
        buckets.insert(0, (end, columns))
        end = start
    return EntityTokens(tokens[:, :lengths[-1]], torch.tensor([[row_of[s] for s in row] for row in entity_strings]),
                        tuple(buckets))
