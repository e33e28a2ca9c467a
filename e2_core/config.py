"""E2Config: what E2 adds to a CLIP image tower, as one JSON-serialisable dataclass."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple

#: FashionGen's tag entities, in the order of the reference implementation's token groups.
FASHIONGEN_ENTITIES = ("subcategory", "brand", "description", "season", "composition")

COMPAT_MODES = ("native", "reference")
TOKEN_ATTENTION = ("one-way", "full", "picks-only", "isolated")


@dataclass
class E2Config:
    """Configuration of E2's selection tokens, fusion blocks and regional heads.

    Example:
        >>> cfg = E2Config(entities=("brand",), tokens_per_entity=4)
        >>> E2Config.from_dict(cfg.to_dict()) == cfg
        True
    """

    # Names of the tag entities; one group of selection tokens and one regional head each.
    entities: Tuple[str, ...] = FASHIONGEN_ENTITIES
    # Selection tokens per entity (the reference uses 2, so 10 tokens for FashionGen).
    tokens_per_entity: int = 2
    # Number of ViT layers run before fusion block 1 and before fusion block 2.
    # None: the reference placement for 12 layers (8, 11), scaled to other depths.
    fusion_layers: Optional[Tuple[int, int]] = None
    # Gumbel-softmax temperature at the start of training; it shapes the gradient of the
    # straight-through selection (the forward pass always picks exactly one patch).
    gumbel_tau: float = 2.0
    # Temperature reached at the end of the schedule (see fusion.TemperatureSchedule).
    gumbel_tau_end: float = 0.5
    # Scale of the Gumbel noise in training's forward pick, reached by the end of each stage on the same
    # schedule from 1: 0 ends on the argmax pick that evaluation makes, so the last steps train on the
    # selections the model is scored with; 1 keeps sampling each pick from softmax(logits) (the paper).
    # Checkpoints saved before the field existed were trained with 1 and load as such.
    gumbel_noise_end: float = 0.0
    # Sample Gumbel noise in eval mode too (the reference does; default is argmax).
    stochastic_eval: bool = False
    # Scale of the fusion query projection Wq at init, relative to width**-0.5. Small values
    # make the first selections near-uniform, so every patch gets explored; with a sharp start
    # all tokens lock onto one background patch.
    query_init_scale: float = 0.1
    # Value projection Wv at init: "identity" passes the selected patch token through unchanged,
    # so the last layer sees in-distribution tokens at step 0; "random" is the reference init.
    value_init: str = "identity"
    # Before fusion block 2, "one-way": the selection tokens read CLS and patches but CLIP's own tokens do not
    # read them, so CLIP's computation is untouched until the last layer (E2 starts where its CLIP is);
    # "full": every token attends to every token, as in the paper. "picks-only": one-way, and the selection tokens
    # do not read the patches either (only CLS and each other), so what they hold of the image's details is
    # what their picks brought in. "isolated": as picks-only, and the tokens read no CLS either, before or after the
    # fusion blocks: their regional embeddings hold nothing of the image but their picks. Checkpoints saved before this field
    # existed were trained with "full" and load as such.
    token_attention: str = "one-way"
    # Fusion block 2 picks from its own selection logits plus ``pick_carry`` times fusion block 1's (detached; the
    # same patches, each token its own): with 0 the two blocks pick independently (the paper); above it block 2
    # re-reads the patch block 1 chose, a layer deeper, unless its own logits outweigh that.
    pick_carry: float = 0.0
    # The fusion blocks' selection logits read each patch less its position's mean over the images (the batch's
    # in training, a running mean in evaluation), so a token cannot prefer a grid position for its own sake.
    centre_positions: bool = False
    # "native", or "reference" to reproduce the authors' forward pass exactly (token order,
    # the dropped last token, the last group sharing the previous group's LayerNorm).
    compat: str = "native"

    # fields whose default changed after checkpoints were saved without them: what those were trained with
    SAVED_BEFORE = {"token_attention": "full", "gumbel_noise_end": 1.0}

    def __post_init__(self):
        self.entities = tuple(self.entities)
        if self.fusion_layers is not None:
            self.fusion_layers = tuple(int(n) for n in self.fusion_layers)
        if not self.entities:
            raise ValueError("E2Config.entities is empty: name at least one tag entity, e.g. ('brand',)")
        if len(set(self.entities)) != len(self.entities):
            raise ValueError(f"E2Config.entities has duplicates: {self.entities}")
        if self.tokens_per_entity < 1:
            raise ValueError(f"E2Config.tokens_per_entity must be >= 1, got {self.tokens_per_entity}")
        if self.gumbel_noise_end < 0:
            raise ValueError(f"E2Config.gumbel_noise_end must be >= 0, got {self.gumbel_noise_end}")
        if self.pick_carry < 0:
            raise ValueError(f"E2Config.pick_carry must be >= 0, got {self.pick_carry}")
        if self.value_init not in ("identity", "random"):
            raise ValueError(f"E2Config.value_init must be 'identity' or 'random', got {self.value_init!r}")
        if self.token_attention not in TOKEN_ATTENTION:
            raise ValueError(f"E2Config.token_attention must be one of {TOKEN_ATTENTION}, got {self.token_attention!r}")
        if self.compat == "reference" and self.token_attention != "full":
            self.token_attention = "full"  # the authors' forward pass
        if self.compat not in COMPAT_MODES:
            raise ValueError(f"E2Config.compat must be one of {COMPAT_MODES}, got {self.compat!r}")
        if self.compat == "reference" and (len(self.entities), self.tokens_per_entity) != (5, 2):
            raise ValueError("E2Config.compat='reference' reproduces the 5-entity, 2-token reference model; "
                             f"got {len(self.entities)} entities x {self.tokens_per_entity} tokens")

    @property
    def num_tokens(self) -> int:
        return len(self.entities) * self.tokens_per_entity

    def resolve_fusion_layers(self, depth: int) -> Tuple[int, int]:
        """Layers run before each fusion block for a ViT of ``depth`` layers."""
        if self.fusion_layers is not None:
            first, second = self.fusion_layers
        else:
            if depth < 3:
                raise ValueError(f"E2 needs a ViT with at least 3 layers to place two fusion blocks, got {depth}")
            second = depth - 1
            first = min(round(depth * 8 / 12), second - 1)
        if not 1 <= first < second < depth:
            raise ValueError(f"fusion_layers={(first, second)} must satisfy 1 <= first < second < depth={depth}")
        return first, second

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "E2Config":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown E2Config field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**{**cls.SAVED_BEFORE, **data})

    def replace(self, **overrides) -> "E2Config":
        return self.from_dict({**self.to_dict(), **overrides})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


__all__ = ["E2Config", "FASHIONGEN_ENTITIES", "COMPAT_MODES", "TOKEN_ATTENTION"]
