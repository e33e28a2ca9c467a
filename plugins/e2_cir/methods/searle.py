"""SEARLE (Baldrati et al., ICCV 2023): optimisation-based textual inversion (OTI) finds, for each
training image, the pseudo word whose ``a photo of $`` matches the image, regularised so that the
pseudo word behaves like a word for the image's concepts; the network phi is then distilled from
those pseudo words. Query: ``a photo of $ that {c1} and {c2}`` averaged with the reversed order.

Upstream draws the regulariser's concepts from a fixed vocabulary and its phrases from a language
model (GPT). No language model can be called here: concepts are the keyword phrases of the training
captions, and the phrases are the training captions that hold them (:class:`e2_cir.phrases.Vocabulary`).
Recipe here: OTI from N(0, 0.02) with AdamW (lr 2e-2, weight decay 0.01), loss weights cosine 1 / regulariser
0.5, one template ``a photo of $``, the top 5 concepts, 30 steps; phi: 3 linear layers, GELU, dropout 0.5,
distilled by symmetric InfoNCE (20 epochs x 64). Not yet the original's: SEARLE's own code samples templates,
keeps an EMA (0.99) of the pseudo words, draws from the top 15 concepts for 350 steps and distils phi with a
2N-way contrastive loss at temperature 0.25 plus the regulariser for 100 epochs x 256."""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..phrases import Vocabulary, mask_phrase
from .base import Phi, PseudoWordMethod, TrainData, frozen, info_nce


class SEARLE(PseudoWordMethod):
    name = "searle"
    convention = "searle"
    needs = ("images", "captions")

    def __init__(self, oti_steps: int = 30, oti_lr: float = 2e-2, epochs: int = 20, batch_size: int = 64,
                 lr: float = 1e-4, top_k_concepts: int = 5, dropout: float = 0.5, seed: int = 0):
        super().__init__(oti_steps=oti_steps, oti_lr=oti_lr, epochs=epochs, batch_size=batch_size, lr=lr,
                         top_k_concepts=top_k_concepts, dropout=dropout, seed=seed)

    def build(self, encoder):
        return Phi(encoder.embed_dim, 4 * encoder.embed_dim, encoder.token_width, self.options["dropout"])

    def fit(self, encoder, train: TrainData, progress: bool = True) -> None:
        o = self.options
        torch.manual_seed(o["seed"])
        rng = random.Random(o["seed"])
        frozen(encoder)
        device = encoder.device
        images = train.image_features.to(device)
        vocabulary = Vocabulary(train.captions)
        self.notes["captions_left_out"] = {"count": vocabulary.without_phrase, "of": len(train.captions),
                                           "why": "no keyword phrase for the regulariser's concepts"}
        with torch.no_grad():
            concepts = F.normalize(self.encode_texts(encoder, [f"a photo of {p}" for p in vocabulary.phrases], None),
                                   dim=-1)
        top = (images @ concepts.t()).topk(min(o["top_k_concepts"], len(vocabulary)), dim=1).indices.cpu()

        def regulariser(rows, pseudo):
            """Each image's pseudo word in a training caption, in place of one of the image's concepts."""
            phrases, masked = [], []
            for row in rows:
                concept = vocabulary.phrases[rng.choice(top[row].tolist())]
                caption = rng.choice(vocabulary.captions[concept])
                phrases.append(caption)
                masked.append(mask_phrase(caption, concept))
            with torch.no_grad():
                reference = self.encode_texts(encoder, phrases, None)
            return (1 - F.cosine_similarity(self.encode_texts(encoder, masked, pseudo), reference)).mean()

        # 1. optimisation-based textual inversion, batch by batch
        oti = torch.empty(len(images), encoder.token_width, device=device)
        batches = torch.arange(len(images)).split(o["batch_size"])
        for rows in tqdm(batches, desc="searle OTI", disable=not progress, dynamic_ncols=True):
            tokens = torch.empty(len(rows), encoder.token_width, device=device).normal_(std=0.02).requires_grad_()
            optimizer = torch.optim.AdamW([tokens], lr=o["oti_lr"], weight_decay=0.01)
            for _ in range(o["oti_steps"]):
                text = self.encode_texts(encoder, ["a photo of $"] * len(rows), tokens)
                cosine = (1 - F.cosine_similarity(text, images[rows])).mean()
                loss = (cosine + 0.5 * regulariser(rows.tolist(), tokens)) / 1.5
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            oti[rows] = tokens.detach()

        # 2. phi distilled from the OTI pseudo words
        def loss_of(rows):
            estimated = self.network(images[rows])
            return info_nce(oti[rows], estimated, 0.25) + 0.75 * regulariser(rows.tolist(), estimated)

        self.train_network(encoder, len(images), loss_of, "searle phi", progress)
