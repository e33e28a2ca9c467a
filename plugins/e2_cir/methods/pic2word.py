"""Pic2Word (Saito et al., CVPR 2023): a mapping network turns the image embedding into one pseudo
word; trained on images only (contrastive between the image and ``a photo of *`` with its pseudo
word), encoder frozen. Query: ``a photo of * , {c2} and {c1}``."""
from __future__ import annotations

import torch

from .base import Phi, PseudoWordMethod, TrainData, frozen, info_nce


class Pic2Word(PseudoWordMethod):
    name = "pic2word"
    convention = "pic2word"
    needs = ("images",)
    placeholder = "*"

    def __init__(self, epochs: int = 20, batch_size: int = 64, lr: float = 1e-4, temperature: float = 0.07,
                 dropout: float = 0.1, seed: int = 0):
        super().__init__(epochs=epochs, batch_size=batch_size, lr=lr, temperature=temperature, dropout=dropout,
                         seed=seed)

    def build(self, encoder):
        return Phi(encoder.embed_dim, encoder.embed_dim, encoder.token_width, self.options["dropout"], "relu")

    def fit(self, encoder, train: TrainData, progress: bool = True) -> None:
        torch.manual_seed(self.options["seed"])
        frozen(encoder)
        features = train.image_features.to(encoder.device)

        def loss_of(rows):
            images = features[rows]
            text = self.encode_texts(encoder, ["a photo of $"] * len(rows), self.network(images))
            return info_nce(images, text, self.options["temperature"])

        self.train_network(encoder, len(features), loss_of, "pic2word", progress, weight_decay=0.1)
