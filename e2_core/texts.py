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


def entity_labels(entity_text: torch.Tensor) -> torch.Tensor:
    """Token ids (B, K, L) -> ids (B, K) equal where two items share an entity's string.

    These feed the loss's multi-positive targets: the same brand twice in a batch is a positive pair.
    Exact-string labels leave the gradients as single-positive InfoNCE's (see
    ``RegionalContrastiveLoss``); labels from a normalised tag vocabulary group different spellings.
    """
    labels = [torch.unique(entity_text[:, k], dim=0, return_inverse=True)[1] for k in range(entity_text.shape[1])]
    return torch.stack(labels, dim=1)


def tokenize_entities(tokenizer, entity_strings: Sequence[Sequence[str]]) -> torch.Tensor:
    """Per-item lists of K entity strings -> token ids (B, K, L)."""
    if not entity_strings:
        raise ValueError("no entity strings given")
    k = len(entity_strings[0])
    bad = [i for i, row in enumerate(entity_strings) if len(row) != k]
    if bad:
        raise ValueError(f"items {bad[:5]} have a different number of entity strings than item 0 ({k})")
    tokens = tokenizer([s for row in entity_strings for s in row])
    return tokens.view(len(entity_strings), k, -1)
