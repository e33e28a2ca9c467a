"""E2's objective: a global and a regional (one per tag entity) symmetric InfoNCE sharing one
``logit_scale``. Total = ``global_weight * L_global + (1 - global_weight) * weighted mean_k L_k``, plus an
optional penalty on different entities' selection tokens picking the same patch (:func:`patch_sharing`)."""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                     labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Symmetric InfoNCE with in-batch negatives over L2-normalised features.

    With ``labels`` (B,), items sharing a label are positives of each other (targets spread
    evenly over them); without, only the diagonal is positive.
    """
    logits = logit_scale * image_features @ text_features.t()
    if labels is None:
        target = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    same = (labels[:, None] == labels[None, :]).to(logits.dtype)
    target = same / same.sum(dim=1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


class RegionalContrastiveLoss(nn.Module):
    """The E2 loss. Takes the dict ``E2Model.forward`` returns (with ``entity_text``).

    Args:
        entities: the model's entity names, in order.
        global_weight: weight of the global term (the reference uses 0.5).
        entity_weights: per-entity weights of the regional mean (default all 1); an entity the
            images cannot show can be weighted 0.
        patch_sharing_weight: weight of :func:`patch_sharing` in the total (0: none, as in the paper).
        multi_positive: items of a batch that share an entity label are positives of each other
            for that entity (the reference treats them as negatives). When the shared values are the
            same string, their text embeddings are identical and the gradients equal single-positive
            InfoNCE's (the targets differ by a constant); it changes training when labels group
            different strings (e.g. brand ids over spellings of a brand).

    Example:
        >>> loss_fn = RegionalContrastiveLoss(model.entities, multi_positive=True)      # doctest: +SKIP
        >>> out = model(images, texts, entity_text)                                     # doctest: +SKIP
        >>> losses = loss_fn(**out, entity_labels=entity_text.index)                     # doctest: +SKIP
        >>> losses["loss"].backward()                                                    # doctest: +SKIP
    """

    def __init__(self, entities: Sequence[str], global_weight: float = 0.5,
                 entity_weights: Optional[Mapping[str, float]] = None, multi_positive: bool = False,
                 patch_sharing_weight: float = 0.0):
        super().__init__()
        self.entities = tuple(entities)
        unknown = sorted(set(entity_weights or {}) - set(self.entities))
        if unknown:
            raise ValueError(f"entity_weights names unknown entities {unknown}; the entities are {list(self.entities)}")
        if not 0.0 <= global_weight <= 1.0:
            raise ValueError(f"global_weight must be in [0, 1], got {global_weight}")
        self.global_weight = global_weight
        self.entity_weights = [float((entity_weights or {}).get(e, 1.0)) for e in self.entities]
        if sum(self.entity_weights) <= 0 and global_weight < 1:
            raise ValueError("entity_weights are all zero; raise one or set global_weight=1")
        self.multi_positive = multi_positive
        if patch_sharing_weight < 0:
            raise ValueError(f"patch_sharing_weight must be >= 0, got {patch_sharing_weight}")
        self.patch_sharing_weight = patch_sharing_weight

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                image_regional_features: torch.Tensor, entity_text_features: torch.Tensor,
                entity_labels: Optional[torch.Tensor] = None, selection_logits: Optional[torch.Tensor] = None,
                **unused) -> Dict[str, torch.Tensor]:
        """Returns ``{"loss", "loss_global", "loss_<entity>"...}``, and ``patch_sharing`` when it is weighted."""
        batch, k = image_regional_features.shape[:2]
        if k != len(self.entities) or entity_text_features.shape[:2] != (batch, k):
            raise ValueError(f"regional features {tuple(image_regional_features.shape)} / entity text features "
                             f"{tuple(entity_text_features.shape)} do not match batch {batch} x entities "
                             f"{list(self.entities)}")
        if self.multi_positive and entity_labels is None:
            raise ValueError("multi_positive=True needs entity_labels, e.g. EntityTokens.index")
        out = {"loss_global": contrastive_loss(image_features, text_features, logit_scale)}
        regional_loss = 0.0
        for i, (name, weight) in enumerate(zip(self.entities, self.entity_weights)):
            labels = entity_labels[:, i] if self.multi_positive else None
            out[f"loss_{name}"] = contrastive_loss(image_regional_features[:, i], entity_text_features[:, i],
                                                   logit_scale, labels)
            regional_loss = regional_loss + weight * out[f"loss_{name}"]
        regional_loss = regional_loss / max(sum(self.entity_weights), 1e-12)
        out["loss"] = self.global_weight * out["loss_global"] + (1 - self.global_weight) * regional_loss
        if self.patch_sharing_weight > 0:
            if selection_logits is None:
                raise ValueError("patch_sharing_weight > 0 needs the selection_logits E2Model.forward returns")
            out["patch_sharing"] = patch_sharing(selection_logits, len(self.entities))
            out["loss"] = out["loss"] + self.patch_sharing_weight * out["patch_sharing"]
        return out


def patch_sharing(selection_logits: torch.Tensor, num_entities: int) -> torch.Tensor:
    """How often two selection tokens of different entities pick the same patch when training samples the
    picks (each token's pick ~ softmax of its logits): ``sum_n p_t(n) p_u(n)`` averaged over such pairs, images
    and fusion blocks. ``selection_logits`` (..., T, N) holds the entities' tokens in groups of ``T / K``.

    Example:
        >>> logits = torch.zeros(1, 4, 8)   # 2 entities x 2 tokens, uniform over 8 patches
        >>> round(patch_sharing(logits, num_entities=2).item(), 4)
        0.125
    """
    tokens = selection_logits.shape[-2]
    if tokens % num_entities:
        raise ValueError(f"{tokens} selection tokens do not split into {num_entities} entities")
    probs = selection_logits.float().softmax(dim=-1)
    same_patch = probs @ probs.transpose(-1, -2)  # (..., T, T)
    entity = torch.arange(tokens, device=probs.device) // (tokens // num_entities)
    return same_patch[..., entity[:, None] != entity[None, :]].mean()
