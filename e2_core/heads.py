"""Regional heads: "separated average pooling" of each entity's selection tokens."""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn


class RegionalHeads(nn.Module):
    """Per entity: LayerNorm each of its tokens, average them, project to the embedding space.

    ``groups[k]`` are entity k's token positions, ``norm_index[k]`` the LayerNorm it uses
    (:func:`e2_core.reference.head_layout`: one each, except in the reference mode).

    Every head starts as a copy of CLIP's final norm and image projection, so regional
    embeddings begin in CLIP's joint space and the regional loss is informative from step 0.
    """

    def __init__(self, groups: Sequence[range], norm_index: Sequence[int], norm: nn.Module, proj: torch.Tensor):
        super().__init__()
        self.groups, self.norm_index = list(groups), list(norm_index)
        self.norms = nn.ModuleList(copy.deepcopy(norm) for _ in self.groups)
        self.proj = nn.Parameter(proj.detach().clone().unsqueeze(0).repeat(len(self.groups), 1, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T, W) -> regional embeddings (B, num_entities, output_dim)."""
        pooled = [self.norms[n](tokens[:, group.start:group.stop]).mean(dim=1)
                  for group, n in zip(self.groups, self.norm_index)]
        return torch.einsum("bkw,kwd->bkd", torch.stack(pooled, dim=1), self.proj.to(tokens.dtype))

