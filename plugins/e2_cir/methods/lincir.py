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

from ..phrases import keyword_phrases, mask_phrase
from .base import Phi, PseudoWordMethod, TrainData, frozen


class LinCIR(PseudoWordMethod):
    name = "lincir"
    convention = "searle"
    needs = ("captions",)

    def __init__(self, epochs: int = 30, batch_size: int = 64, lr: float = 1e-4, noise: float = 0.5,
                 dropout: float = 0.1, seed: int = 0):
        super().__init__(epochs=epochs, batch_size=batch_size, lr=lr, noise=noise, dropout=dropout, seed=seed)

    def build(self, encoder):
        return Phi(encoder.embed_dim, 4 * encoder.embed_dim, encoder.token_width, self.options["dropout"])

    def fit(self, encoder, train: TrainData, progress: bool = True) -> None:
        o = self.options
        torch.manual_seed(o["seed"])
        frozen(encoder)
        captions = list(dict.fromkeys(train.captions))
        pairs = [(c, masked) for c in captions if (masked := self.mask(c)) != c]
        if not pairs:
            raise ValueError("lincir: no training caption has a keyword phrase to mask")
        self.notes["captions_left_out"] = {"count": len(captions) - len(pairs), "of": len(captions),
                                           "why": "no keyword phrase to mask"}
        with torch.no_grad():
            targets = torch.cat([F.normalize(self.encode_texts(encoder, [c for c, _ in pairs[i:i + 256]], None), dim=-1)
                                 for i in range(0, len(pairs), 256)])
        generator = torch.Generator().manual_seed(o["seed"])

        def loss_of(rows):
            target = targets[rows]
            scale = torch.rand(len(rows), 1, generator=generator).to(target.device) * o["noise"]
            noisy = target + scale * torch.randn(target.shape, generator=generator).to(target.device)
            pseudo = self.network(F.normalize(noisy, dim=-1))
            masked = F.normalize(self.encode_texts(encoder, [pairs[i][1] for i in rows.tolist()], pseudo), dim=-1)
            return (masked - target).pow(2).sum(dim=-1).mean()

        self.train_network(encoder, len(pairs), loss_of, "lincir", progress, min_batch=1)

    @staticmethod
    def mask(caption: str) -> str:
        """Every keyword phrase of the caption replaced by ``$``."""
        for phrase in sorted(keyword_phrases(caption), key=len, reverse=True):
            caption = mask_phrase(caption, phrase)
        return caption
