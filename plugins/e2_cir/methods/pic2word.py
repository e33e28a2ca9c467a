"""Pic2Word (Saito et al., CVPR 2023): a mapping network turns the raw image embedding into one pseudo
word; trained on images only, encoder frozen: symmetric cross-entropy between the image and
``a photo of *`` with its pseudo word, at the CLIP's own (frozen) logit scale. Query:
``a photo of * , {c2} and {c1}``.

Pic2Word's code: the network is ``n_layer`` (2) blocks of Linear -> Dropout(0.1) -> ReLU of width 512,
then a Linear to the token width; it reads the unnormalised image embedding; image and text features
are normalised only for the loss. Its README's training run: AdamW, lr 1e-4, weight decay 0.1 on weights
(none on biases), betas (0.9, 0.98) and eps 1e-6 (its ViT settings), batch 128 per GPU (negatives
gathered over GPUs), 30 epochs of CC3M's training images, cosine schedule after 10,000 warm-up steps.
Here: the same per-step settings on the training split's images for ``epochs`` passes, constant
learning rate, last partial batch kept.
"""
from __future__ import annotations

import re
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .base import PseudoWordMethod, TrainData, frozen


class MappingNetwork(nn.Module):
    """Image embedding -> pseudo-word token: ``n_layer`` x (Linear, Dropout, ReLU), then a Linear."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, n_layer: int = 2, dropout: float = 0.1):
        super().__init__()
        self.hidden = nn.ModuleList(nn.Linear(input_dim if i == 0 else hidden_dim, hidden_dim)
                                    for i in range(n_layer))
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for linear in self.hidden:
            x = F.relu(self.dropout(linear(x)))
        return self.out(x)


def symmetric_cross_entropy(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy of ``scale`` x cosine, pairs on the diagonal."""
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    target = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(scale * image @ text.t(), target) + F.cross_entropy(scale * text @ image.t(), target)) / 2


class Pic2Word(PseudoWordMethod):
    name = "pic2word"
    convention = "pic2word"
    needs = ("images",)
    placeholder = "*"

    def __init__(self, epochs: int = 20, batch_size: int = 128, lr: float = 1e-4, weight_decay: float = 0.1,
                 betas: Tuple[float, float] = (0.9, 0.98), eps: float = 1e-6, hidden_dim: int = 512, n_layer: int = 2,
                 dropout: float = 0.1, temperature: Optional[float] = None, seed: int = 0):
        """``temperature``: None trains at the encoder's own logit scale (as Pic2Word); a number overrides it."""
        super().__init__(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, betas=tuple(betas),
                         eps=eps, hidden_dim=hidden_dim, n_layer=n_layer, dropout=dropout, temperature=temperature,
                         seed=seed)

    def build(self, encoder):
        o = self.options
        return MappingNetwork(encoder.embed_dim, o["hidden_dim"], encoder.token_width, o["n_layer"], o["dropout"])

    def logit_scale(self, encoder) -> torch.Tensor:
        """What the cosines are multiplied by: the encoder's ``exp(logit_scale)``, or 1 / ``temperature``."""
        if self.options["temperature"] is not None:
            return torch.tensor(1.0 / self.options["temperature"], device=encoder.device)
        scale = getattr(getattr(encoder, "model", None), "logit_scale", None)
        if scale is None:
            raise ValueError(f"{getattr(encoder, 'name', 'this encoder')} has no logit_scale; give pic2word a "
                             "temperature")
        return scale.detach().exp()

    def loss(self, encoder, image_features: torch.Tensor) -> torch.Tensor:
        """The training loss of one batch of raw image embeddings."""
        text = self.encode_texts(encoder, ["a photo of $"] * len(image_features), self.network(image_features))
        return symmetric_cross_entropy(image_features, text, self.logit_scale(encoder))

    def optimizer(self) -> torch.optim.Optimizer:
        """AdamW over the network, weight decay on its weights only."""
        o = self.options
        params = list(self.network.named_parameters())
        return torch.optim.AdamW([{"params": [p for n, p in params if n.endswith("bias")], "weight_decay": 0.0},
                                  {"params": [p for n, p in params if not n.endswith("bias")],
                                   "weight_decay": o["weight_decay"]}],
                                 lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"])

    def fit(self, encoder, train: TrainData, progress: bool = True) -> None:
        o = self.options
        torch.manual_seed(o["seed"])
        frozen(encoder)
        features = train.image_features.to(encoder.device)
        self.network = self.build(encoder).to(encoder.device).train()
        optimizer = self.optimizer()
        generator = torch.Generator().manual_seed(o["seed"])
        for _ in tqdm(range(o["epochs"]), desc="pic2word", disable=not progress, dynamic_ncols=True):
            for rows in torch.randperm(len(features), generator=generator).split(o["batch_size"]):
                if len(rows) < 2:
                    continue
                loss = self.loss(encoder, features[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        self.network.eval()

    @classmethod
    def convert_original(cls, checkpoint: dict) -> Tuple[Dict[str, torch.Tensor], Dict[str, int]]:
        """Pic2Word's released checkpoint (a dict whose ``state_dict_img2text`` holds the network, keys
        ``module.layers.{i}.0.*`` and ``module.fc_out.*`` as saved under DistributedDataParallel), or that
        state dict itself -> (our state dict, ``{"hidden_dim", "n_layer"}``)."""
        source = checkpoint.get("state_dict_img2text", checkpoint)
        ours: Dict[str, torch.Tensor] = {}
        for key, value in source.items():
            name = key[len("module."):] if key.startswith("module.") else key
            hidden = re.fullmatch(r"layers\.(\d+)\.0\.(weight|bias)", name)
            out = re.fullmatch(r"fc_out\.(weight|bias)", name)
            if hidden:
                ours[f"hidden.{hidden[1]}.{hidden[2]}"] = value.float()
            elif out:
                ours[f"out.{out[1]}"] = value.float()
            else:
                raise ValueError(f"{key!r} is not a key of Pic2Word's mapping network (layers.N.0.*, fc_out.*)")
        n_layer = len({k for k in ours if k.startswith("hidden.")}) // 2
        if "out.weight" not in ours or n_layer == 0 or any(f"hidden.{i}.weight" not in ours for i in range(n_layer)):
            raise ValueError("not a whole Pic2Word mapping network: it needs layers.0..N-1 and fc_out")
        return ours, {"hidden_dim": ours["out.weight"].shape[1], "n_layer": n_layer}
