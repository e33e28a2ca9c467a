"""Selection tokens and the fusion block: E2's hard choice of one image patch per token."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class SelectionTokens(nn.Module):
    """Learnable query tokens, ``tokens_per_entity`` per tag entity, grouped entity by entity.

    They join the ViT sequence after the positional embedding (they have no position).
    """

    def __init__(self, num_tokens: int, width: int):
        super().__init__()
        self.tokens = nn.Parameter(width ** -0.5 * torch.randn(num_tokens, width))

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.tokens.unsqueeze(0).expand(batch_size, -1, -1)


class FusionBlock(nn.Module):
    """Hard attention from selection tokens (queries) to patch tokens (keys/values).

    Each token picks one patch, ``v = Wv·patch``, and becomes ``(v + token) / 2``. With ``num_patches`` the
    picks compare content, not places: the selection logits read each patch less its position's mean over the
    images (the batch's in training, a running mean of it in evaluation), so no patch is picked for where it is.
    """

    def __init__(self, width: int, query_init_scale: float = 1.0, value_init: str = "random",
                 logit_scale: float | None = None, num_patches: Optional[int] = None, momentum: float = 0.1):
        super().__init__()
        self.q = nn.Linear(width, width, bias=False)
        self.k = nn.Linear(width, width, bias=False)
        self.v = nn.Linear(width, width, bias=False)
        std = width ** -0.5
        nn.init.normal_(self.q.weight, std=std * query_init_scale)
        nn.init.normal_(self.k.weight, std=std)
        if value_init == "identity":
            nn.init.eye_(self.v.weight)
        else:
            nn.init.normal_(self.v.weight, std=std)
        self.logit_scale = logit_scale if logit_scale is not None else 1.0 / math.sqrt(width)
        self.tau = 1.0
        self.noise = 1.0
        self.stochastic_eval = False
        self.momentum = momentum
        self.register_buffer("position_mean", None if num_patches is None else torch.zeros(num_patches, width))

    def centred(self, patches: torch.Tensor) -> torch.Tensor:
        """Patches less their position's mean over images, when the block centres positions (else unchanged)."""
        if self.position_mean is None:
            return patches
        if self.training and patches.shape[0] > 1:
            mean = patches.mean(dim=0)
            with torch.no_grad():
                self.position_mean.lerp_(mean.float(), self.momentum)
        else:
            mean = self.position_mean.to(patches.dtype)
        return patches - mean

    def logits(self, tokens: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """Selection logits (B, T, N) of each token over the patches."""
        # q·(Wk p) = (q Wk)·p: fold the key projection into the T queries, never project all N patches
        return (self.q(tokens) @ self.k.weight) @ patches.transpose(1, 2) * self.logit_scale

    def forward(self, tokens: torch.Tensor, patches: torch.Tensor, prior: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens (B, T, W), patches (B, N, W) -> fused tokens (B, T, W), chosen patch index (B, T), selection
        logits (B, T, N); ``prior`` (B, T, N), when given, is added to the logits before the pick."""
        logits = self.logits(tokens, self.centred(patches))
        if prior is not None:
            logits = logits + prior
        # (one-hot @ P) Wv = one-hot @ (P Wv): only the chosen patches go through Wv
        if self.training or self.stochastic_eval:
            weights = straight_through_pick(logits.float(), self.tau, self.noise).to(patches.dtype)
            index, picked = weights.detach().argmax(dim=-1), weights @ patches
        else:
            index = logits.argmax(dim=-1)
            picked = patches_at(patches, index)
        return self.fuse(tokens, picked), index, logits

    def fuse(self, tokens: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
        """Each token (B, T, W) joined with the patch it picked (B, T, W): ``(Wv·patch + token) / 2``."""
        return (self.v(picked) + tokens) / 2


def patches_at(patches: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """patches (B, N, W), index (B, T) -> the indexed patch of each token (B, T, W)."""
    return patches.gather(1, index.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))


def straight_through_pick(logits: torch.Tensor, tau: float, noise: float = 1.0) -> torch.Tensor:
    """Straight-through Gumbel-softmax over the last dim: a one-hot forward, a soft (temperature ``tau``) gradient.

    The forward picks ``argmax(logits + noise * g)`` with Gumbel noise ``g``: ``noise=1`` samples from
    ``softmax(logits)`` (the usual Gumbel-softmax), ``noise=0`` picks the argmax, as evaluation does.
    """
    if noise > 0:  # argmax(logits / noise + g) = argmax(logits + noise * g), the same soft weights
        return F.gumbel_softmax(logits / noise, tau=tau / noise, hard=True)
    soft = (logits / tau).softmax(dim=-1)
    hard = F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(soft.dtype)
    return hard - soft.detach() + soft


class TemperatureSchedule:
    """Cosine anneal from ``start`` to ``end`` over ``total_steps`` (the Gumbel temperature and noise per stage).

    Example:
        >>> s = TemperatureSchedule(2.0, 0.5, total_steps=100)
        >>> s(0), s(100)
        (2.0, 0.5)
    """

    def __init__(self, start: float, end: float, total_steps: int):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.start, self.end, self.total_steps = float(start), float(end), int(total_steps)

    def __call__(self, step: int) -> float:
        progress = min(max(step, 0), self.total_steps) / self.total_steps
        return self.end + 0.5 * (self.start - self.end) * (1 + math.cos(math.pi * progress))
