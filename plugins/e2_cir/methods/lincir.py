"""LinCIR (Gu et al., CVPR 2024): the mapping network is trained from text only. Each training
caption's keyword phrases are replaced by ``$``, whose embedding is predicted from the caption's own
text embedding plus Gaussian noise; the loss pulls the masked caption's embedding back onto the
caption's. At test time the image embedding goes through the same network. Query:
``a photo of $ that {c1} and {c2}`` (SEARLE's convention, as LinCIR uses it).

Keyword phrases: :func:`e2_cir.phrases.keyword_phrases` (nltk's tagger where installed, else the
documented fallback; upstream uses spaCy)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..phrases import keyword_phrases, mask_phrase
from .base import CIRMethod, Phi, QueryBatch, TrainData, frozen


class LinCIR(CIRMethod):
    name = "lincir"
    convention = "searle"

    def __init__(self, epochs: int = 30, batch_size: int = 64, lr: float = 1e-4, noise: float = 0.5,
                 dropout: float = 0.1, seed: int = 0):
        super().__init__(epochs=epochs, batch_size=batch_size, lr=lr, noise=noise, dropout=dropout, seed=seed)

    def build(self, encoder):
        return Phi(encoder.embed_dim, 4 * encoder.embed_dim, encoder.token_width, self.options["dropout"])

    def fit(self, encoder, train: TrainData, progress: bool = True) -> None:
        o = self.options
        torch.manual_seed(o["seed"])
        frozen(encoder)
        pairs = [(c, masked) for c in dict.fromkeys(train.captions) if (masked := self.mask(c)) != c]
        if not pairs:
            raise ValueError("lincir: no training caption has a keyword phrase to mask")
        with torch.no_grad():
            targets = torch.cat([F.normalize(self.encode_texts(encoder, [c for c, _ in pairs[i:i + 256]], None), dim=-1)
                                 for i in range(0, len(pairs), 256)])
        self.network = self.build(encoder).to(encoder.device).train()
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=o["lr"], weight_decay=0.01)
        generator = torch.Generator().manual_seed(o["seed"])
        for _ in tqdm(range(o["epochs"]), desc="lincir", disable=not progress, dynamic_ncols=True):
            for batch in torch.randperm(len(pairs), generator=generator).split(o["batch_size"]):
                target = targets[batch]
                scale = torch.rand(len(batch), 1, generator=generator) * o["noise"]
                noisy = target + scale.to(target.device) * torch.randn(target.shape, generator=generator).to(target.device)
                pseudo = self.network(F.normalize(noisy, dim=-1))
                masked = F.normalize(self.encode_texts(encoder, [pairs[i][1] for i in batch.tolist()], pseudo), dim=-1)
                loss = (masked - target).pow(2).sum(dim=-1).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        self.network.eval()

    @staticmethod
    def mask(caption: str) -> str:
        """Every keyword phrase of the caption replaced by ``$``."""
        for phrase in sorted(keyword_phrases(caption), key=len, reverse=True):
            caption = mask_phrase(caption, phrase)
        return caption

    @torch.no_grad()
    def queries(self, encoder, batch: QueryBatch) -> torch.Tensor:
        pseudo = self.network(batch.reference_features.to(encoder.device))
        return self.encode_prompts(encoder, batch.prompts, pseudo)
