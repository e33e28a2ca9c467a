"""Regional heads: "separated average pooling" of each entity's selection tokens."""
from __future__ import annotations

import copy
from typing import List

import torch
from torch import nn


def token_groups(num_entities: int, tokens_per_entity: int, compat: str = "native") -> List[range]:
    """Token positions pooled for each entity.

    In ``compat="reference"`` the last selection token is dropped before pooling, so the last
    group is one token short, as in the authors' code.
    """
    available = num_entities * tokens_per_entity - (1 if compat == "reference" else 0)
    return [range(k * tokens_per_entity, min((k + 1) * tokens_per_entity, available))
            for k in range(num_entities)]


def norm_indices(num_entities: int, compat: str = "native") -> List[int]:
    """Which LayerNorm each entity uses; in reference mode the last entity reuses the previous one's."""
    indices = list(range(num_entities))
    if compat == "reference" and num_entities > 1:
        indices[-1] = num_entities - 2
    return indices


class RegionalHeads(nn.Module):
    """Per entity: LayerNorm each of its tokens, average them, project to the embedding space.

    Every head starts as a copy of CLIP's final norm and image projection, so regional
    embeddings begin in CLIP's joint space and the regional loss is informative from step 0.
    """

    def __init__(self, num_entities: int, tokens_per_entity: int, norm: nn.Module, proj: torch.Tensor,
                 compat: str = "native"):
        super().__init__()
        self.groups = token_groups(num_entities, tokens_per_entity, compat)
        self.norm_index = norm_indices(num_entities, compat)
        self.norms = nn.ModuleList(copy.deepcopy(norm) for _ in range(num_entities))
        self.proj = nn.Parameter(proj.detach().clone().unsqueeze(0).repeat(num_entities, 1, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T, W) -> regional embeddings (B, num_entities, output_dim)."""
        pooled = [self.norms[n](tokens[:, group.start:group.stop]).mean(dim=1)
                  for group, n in zip(self.groups, self.norm_index)]
        return torch.einsum("bkw,kwd->bkd", torch.stack(pooled, dim=1), self.proj.to(tokens.dtype))

