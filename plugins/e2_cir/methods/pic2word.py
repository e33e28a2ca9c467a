"""Pic2Word (Saito et al., CVPR 2023): a mapping network turns the image embedding into one pseudo
word; trained on images only (contrastive between the image and ``a photo of *`` with its pseudo
word), encoder frozen. Query: ``a photo of * , {c2} and {c1}``."""
from __future__ import annotations

import torch
from tqdm import tqdm

from .base import CIRMethod, Phi, QueryBatch, TrainData, frozen, info_nce


class Pic2Word(CIRMethod):
    name = "pic2word"
    convention = "pic2word"
    placeholder = "*"

    def __init__(self, epochs: int = 20, batch_size: int = 64, lr: float = 1e-4, temperature: float = 0.07,
                 dropout: float = 0.1, seed: int = 0):
        super().__init__(epochs=epochs, batch_size=batch_size, lr=lr, temperature=temperature, dropout=dropout,
                         seed=seed)

    def build(self, encoder):
        return Phi(encoder.embed_dim, encoder.embed_dim, encoder.token_width, self.options["dropout"], "relu")

    def fit(self, encoder, train: TrainData, progress: bool = True) -> None:
        o = self.options
        torch.manual_seed(o["seed"])
        frozen(encoder)
        self.network = self.build(encoder).to(encoder.device).train()
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=o["lr"], weight_decay=0.1)
        features = train.image_features.to(encoder.device)
        generator = torch.Generator().manual_seed(o["seed"])
        for _ in tqdm(range(o["epochs"]), desc="pic2word", disable=not progress, dynamic_ncols=True):
            for batch in torch.randperm(len(features), generator=generator).split(o["batch_size"]):
                if len(batch) < 2:
                    continue
                images = features[batch]
                text = self.encode_texts(encoder, ["a photo of $"] * len(batch), self.network(images))
                loss = info_nce(images, text, o["temperature"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        self.network.eval()

    @torch.no_grad()
    def queries(self, encoder, batch: QueryBatch) -> torch.Tensor:
        pseudo = self.network(batch.reference_features.to(encoder.device))
        return self.encode_prompts(encoder, batch.prompts, pseudo)
