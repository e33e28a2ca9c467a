"""SEARLE (Baldrati et al., ICCV 2023): optimisation-based textual inversion (OTI) finds, for each
training image, the pseudo word whose template prompts match the image, regularised so that the pseudo
word behaves like a word for the image's concepts; the network phi is then distilled from those pseudo
words. Query: ``a photo of $ that {c1} and {c2}`` averaged with the reversed order.

As SEARLE's code (``src/``; the defaults are its settings):

- concepts (``image_concepts_association.py``): a concept's embedding is the normalised mean of its
  normalised embeddings in the 24 PALAVRA templates (``utils.get_templates``); each image's concepts are
  ranked by cosine with its normalised embedding.
- OTI (``oti_inversion.py``): batches of 32 images in order; pseudo words drawn from N(0, 0.02), AdamW
  (lr 2e-2, weight decay 0.01), 350 steps. Every step each image gets a template drawn uniformly from the
  24 and a phrase drawn uniformly from all the phrases of its top-15 concepts, with the concept's first
  occurrence replaced by ``$``. Loss ``(1 * (1 - cos(template, image)) + 0.5 * (1 - cos(masked phrase,
  phrase))) / 1.5``, means over the batch. An EMA (decay 0.99, started at the initial words, updated after
  every step) of the pseudo words is kept, and it is what phi learns from.
- a concept any of whose phrases does not hold it is dropped (``notes["concepts_dropped"]``).
- phi (``phi.py``, ``train_phi.py``): Linear(D, 4D), GELU, Dropout 0.5, Linear(4D, 4D), GELU, Dropout 0.5,
  Linear(4D, token width), fed the raw image embedding. AdamW (lr 1e-4, weight decay 0.01), 100 epochs of
  shuffled batches of 256, the last partial batch dropped. Loss ``1 * contrastive + 0.75 * regulariser``:
  the 2N-way contrastive loss (:func:`contrastive_loss`, temperature 0.25) between the EMA pseudo words
  and phi's, and ``1 - cos`` between a phrase and the phrase with its concept replaced by phi's word, the
  concept drawn uniformly from the image's top 150, the phrase uniformly from the concept's.
- the released phi (``hubconf.py``: ``{"Phi": state_dict}``) loads through :meth:`SEARLE.convert_original`.

Not as SEARLE's code:

- phrases: SEARLE's are GPT-Neo 2.7B's 256 completions of ``a photo of {concept} that``; no language model
  runs here, so a concept's phrases are the training captions that hold it (:class:`e2_cir.phrases.Vocabulary`).
- concepts: the ``vocabulary_size`` (256) most frequent keyword phrases of the training captions, not
  OpenImages v7's 20,931 class names; the top 150 of 256 is a much broader draw than the top 150 of 20,931.
- OTI and phi are trained on the training split's images (SEARLE's code: ImageNet1K's test images), embedded
  as the task embeds them (SEARLE's code first pads each image to aspect ratio 1.25, its "targetpad").
- the OTI draw is uniform over the pooled phrases, as the code does; with 256 phrases for every concept that
  is uniform over concepts, but caption counts differ, so here frequent concepts are drawn more often
  (``oti_draw="concepts"``: a concept uniformly, then one of its phrases).
- masking: the first whole-word occurrence (:func:`e2_cir.phrases.mask_phrase`); SEARLE's code replaces a
  substring, and in phi's regulariser every occurrence (only the first then takes the pseudo word).
- float32 throughout (SEARLE's code: float16 autocast with a gradient scaler). Templates, phrases and
  concepts are drawn by ``random.Random(seed)`` in the code's order (its own ``random`` draws them), the
  pseudo words' init and dropout by torch's generator, the epochs' shuffles by a generator of their own;
  seed 0 (the code: 42).
- edge cases the code does not survive: a training set smaller than one batch is one batch (the code trains
  nothing); an image none of whose top-k concepts survives gets its nearest surviving concept
  (``notes["images_given_nearest_concept"]``; the code fails in OTI and redraws forever in phi's training).
"""
from __future__ import annotations

import bisect
import random
from dataclasses import dataclass
from typing import Dict, List, Sequence, Set, Tuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..phrases import Vocabulary, mask_phrase
from .base import Phi, PseudoWordMethod, TrainData, frozen

#: SEARLE's code: the 24 templates of PALAVRA (utils.get_templates), ``$`` where the word goes.
PALAVRA_TEMPLATES = (
    "This is a photo of a $", "This photo contains a $", "A photo of a $", "This is an illustration of a $",
    "This illustration contains a $", "An illustrations of a $", "This is a sketch of a $",
    "This sketch contains a $", "A sketch of a $", "This is a diagram of a $", "This diagram contains a $",
    "A diagram of a $", "A $", "We see a $", "$", "We see a $ in this photo", "We see a $ in this image",
    "We see a $ in this illustration", "We see a $ photo", "We see a $ image", "We see a $ illustration",
    "$ photo", "$ image", "$ illustration",
)


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """SEARLE's distillation loss: over the 2N normalised rows of ``a`` and ``b``, each row's positive is
    its pair and the softmax runs over the other 2N - 1 rows (the pair included), averaged over all 2N."""
    n = len(a)
    z = F.normalize(torch.cat([a, b]), dim=-1)
    logits = (z @ z.t() / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device),
                                                   float("-inf"))
    positive = torch.cat([logits.diagonal(n), logits.diagonal(-n)])
    return (torch.logsumexp(logits, dim=1) - positive).mean()


@dataclass
class Concepts:
    """The regulariser's concepts: the vocabulary, the concepts dropped, and each image's concepts, nearest
    first (``ranking``, indices into ``vocabulary.phrases``)."""

    vocabulary: Vocabulary
    dropped: Set[str]
    ranking: torch.Tensor  # (N, K)
    nearest: torch.Tensor  # (N,) each image's nearest concept that is not dropped

    def top(self, row: int, k: int) -> List[str]:
        """The image's top-``k`` concepts less those dropped (its nearest surviving one if none is left)."""
        phrases = self.vocabulary.phrases
        kept = [phrases[i] for i in self.ranking[row, :k].tolist() if phrases[i] not in self.dropped]
        return kept or [phrases[int(self.nearest[row])]]


class SEARLE(PseudoWordMethod):
    name = "searle"
    convention = "searle"
    needs = ("images", "captions")

    def __init__(self, oti_steps: int = 350, oti_lr: float = 2e-2, oti_weight_decay: float = 0.01,
                 oti_batch_size: int = 32, ema_decay: float = 0.99, top_k_concepts: int = 15,
                 oti_cosine_weight: float = 1.0, oti_regulariser_weight: float = 0.5, oti_draw: str = "phrases",
                 epochs: int = 100, batch_size: int = 256, lr: float = 1e-4, weight_decay: float = 0.01,
                 temperature: float = 0.25, distillation_weight: float = 1.0, regulariser_weight: float = 0.75,
                 phi_top_k_concepts: int = 150, dropout: float = 0.5, hidden_dim: int = None,
                 drop_last: bool = True, templates: str = "palavra", vocabulary_size: int = 256, seed: int = 0):
        if oti_draw not in ("phrases", "concepts"):
            raise ValueError(f"oti_draw={oti_draw!r}: 'phrases' (SEARLE's code) or 'concepts'")
        super().__init__(oti_steps=oti_steps, oti_lr=oti_lr, oti_weight_decay=oti_weight_decay,
                         oti_batch_size=oti_batch_size, ema_decay=ema_decay, top_k_concepts=top_k_concepts,
                         oti_cosine_weight=oti_cosine_weight, oti_regulariser_weight=oti_regulariser_weight,
                         oti_draw=oti_draw, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                         temperature=temperature, distillation_weight=distillation_weight,
                         regulariser_weight=regulariser_weight, phi_top_k_concepts=phi_top_k_concepts,
                         dropout=dropout, hidden_dim=hidden_dim, drop_last=drop_last, templates=templates,
                         vocabulary_size=vocabulary_size, seed=seed)
        self.templates()  # refuse a bad template set now

    def build(self, encoder):
        hidden = self.options.get("hidden_dim") or 4 * encoder.embed_dim
        return Phi(encoder.embed_dim, hidden, encoder.token_width, self.options["dropout"])

    def templates(self) -> Tuple[str, ...]:
        """The templates (``$`` where the word goes): ``"palavra"``, or one's own separated by ``|``."""
        spec = self.options["templates"]
        templates = PALAVRA_TEMPLATES if spec == "palavra" else tuple(t.strip() for t in str(spec).split("|"))
        if not templates or any(t.count("$") != 1 for t in templates):
            raise ValueError(f"templates={spec!r}: 'palavra', or templates separated by '|', each with one '$'")
        return templates

    # --- training -------------------------------------------------------------------------------------
    def fit(self, encoder, train: TrainData, progress: bool = True) -> None:
        o = self.options
        torch.manual_seed(o["seed"])
        rng = random.Random(o["seed"])
        frozen(encoder)
        images = train.image_features.to(encoder.device).float()
        concepts = self.concepts(encoder, images, train.captions)
        targets = self.invert(encoder, images, concepts, rng, progress)
        self.distil(encoder, images, targets, concepts, rng, progress)

    @torch.no_grad()
    def concepts(self, encoder, images: torch.Tensor, captions: Sequence[str]) -> Concepts:
        """The vocabulary of the captions, the concepts dropped, and each image's concepts ranked."""
        o = self.options
        vocabulary = Vocabulary(captions, size=o["vocabulary_size"])
        self.notes["captions_left_out"] = {"count": vocabulary.without_phrase, "of": len(captions),
                                           "why": "no keyword phrase for the regulariser's concepts"}
        dropped = {p for p in vocabulary.phrases if any(mask_phrase(c, p) == c for c in vocabulary.captions[p])}
        self.notes["concepts_dropped"] = {"count": len(dropped), "of": len(vocabulary),
                                          "why": "a phrase of the concept cannot be masked (SEARLE's code drops "
                                                 "such concepts)"}
        if len(dropped) == len(vocabulary):
            raise ValueError("searle: no concept of the training captions can be masked in its phrases")
        similarity = F.normalize(images, dim=-1) @ self.concept_embeddings(encoder, vocabulary.phrases).t()
        k = min(max(o["top_k_concepts"], o["phi_top_k_concepts"]), len(vocabulary))
        keep = torch.tensor([p not in dropped for p in vocabulary.phrases], device=similarity.device)
        concepts = Concepts(vocabulary, dropped, similarity.topk(k, dim=1).indices.cpu(),
                            similarity.masked_fill(~keep, float("-inf")).argmax(dim=1).cpu())
        k = min(o["top_k_concepts"], o["phi_top_k_concepts"])
        self.notes["images_given_nearest_concept"] = {
            "count": sum(all(vocabulary.phrases[i] in dropped for i in concepts.ranking[row, :k].tolist())
                         for row in range(len(images))) if dropped else 0,
            "of": len(images), "why": f"every one of its top-{k} concepts was dropped"}
        return concepts

    def concept_embeddings(self, encoder, phrases: Sequence[str]) -> torch.Tensor:
        """Each concept's embedding: its normalised embeddings in the templates, averaged, normalised."""
        templates = self.templates()
        texts = [t.replace("$", p) for p in phrases for t in templates]
        features = torch.cat([F.normalize(self.encode_texts(encoder, texts[i:i + 256], None), dim=-1)
                              for i in range(0, len(texts), 256)])
        return F.normalize(features.view(len(phrases), len(templates), -1).mean(dim=1), dim=-1)

    def invert(self, encoder, images: torch.Tensor, concepts: Concepts, rng: random.Random,
               progress: bool = True) -> torch.Tensor:
        """OTI: each image's pseudo word (the EMA of its optimised word), batch by batch in order."""
        o = self.options
        device = encoder.device
        targets = torch.empty(len(images), encoder.token_width, device=device)
        starts = range(0, len(images), o["oti_batch_size"])
        for start in tqdm(starts, desc="searle OTI", disable=not progress, dynamic_ncols=True):
            rows = list(range(start, min(start + o["oti_batch_size"], len(images))))
            tokens = torch.empty(len(rows), encoder.token_width, device=device).normal_(std=0.02)
            tokens = torch.nn.Parameter(tokens)
            ema = tokens.detach().clone()
            optimizer = torch.optim.AdamW([tokens], lr=o["oti_lr"], weight_decay=o["oti_weight_decay"])
            for _ in range(o["oti_steps"]):
                optimizer.zero_grad()
                texts, phrases, masked = self.oti_draw(rng, rows, concepts)
                loss, _, _ = self.oti_loss(encoder, tokens, images[rows], texts, phrases, masked)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    ema = o["ema_decay"] * ema + (1 - o["ema_decay"]) * tokens
            targets[rows] = ema
        return targets

    def oti_draw(self, rng: random.Random, rows: List[int],
                 concepts: Concepts) -> Tuple[List[str], List[str], List[str]]:
        """One OTI step's texts: a template per image, then a phrase per image and that phrase masked."""
        templates = self.templates()
        texts = [templates[i] for i in rng.choices(range(len(templates)), k=len(rows))]
        captions = concepts.vocabulary.captions
        phrases, masked = [], []
        for row in rows:
            top = concepts.top(row, self.options["top_k_concepts"])
            if self.options["oti_draw"] == "concepts":
                concept = rng.choice(top)
                phrase = rng.choice(captions[concept])
            else:  # uniform over the pooled phrases of the image's concepts, as SEARLE's code
                ends = [0]
                for concept in top:
                    ends.append(ends[-1] + len(captions[concept]))
                j = rng.choice(range(ends[-1]))
                i = bisect.bisect_right(ends, j) - 1
                concept, phrase = top[i], captions[top[i]][j - ends[i]]
            phrases.append(phrase)
            masked.append(mask_phrase(phrase, concept))
        return texts, phrases, masked

    def oti_loss(self, encoder, tokens: torch.Tensor, images: torch.Tensor, texts: List[str], phrases: List[str],
                 masked: List[str]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """OTI's objective for one step: (weighted total, template-image cosine loss, regulariser)."""
        o = self.options
        cosine = (1 - F.cosine_similarity(self.encode_texts(encoder, texts, tokens), images)).mean()
        with torch.no_grad():
            reference = self.encode_texts(encoder, phrases, None)
        regulariser = (1 - F.cosine_similarity(self.encode_texts(encoder, masked, tokens), reference)).mean()
        weights = o["oti_cosine_weight"], o["oti_regulariser_weight"]
        return (weights[0] * cosine + weights[1] * regulariser) / sum(weights), cosine, regulariser

    def distil(self, encoder, images: torch.Tensor, targets: torch.Tensor, concepts: Concepts,
               rng: random.Random, progress: bool = True) -> None:
        """phi learns the OTI pseudo words from the images (2N-way contrastive loss plus the regulariser)."""
        o = self.options
        captions = concepts.vocabulary.captions

        def loss_of(rows):
            chosen = [rng.choice(concepts.top(r, o["phi_top_k_concepts"])) for r in rows.tolist()]
            estimated = self.network(images[rows])
            phrases = [rng.choice(captions[c]) for c in chosen]
            return self.distillation_loss(encoder, targets[rows], estimated, phrases,
                                          [mask_phrase(p, c) for p, c in zip(phrases, chosen)])[0]

        whole = min(o["batch_size"], len(images)) if o["drop_last"] else 1
        self.train_network(encoder, len(images), loss_of, "searle phi", progress, weight_decay=o["weight_decay"],
                           min_batch=max(whole, 1))

    def distillation_loss(self, encoder, targets: torch.Tensor, estimated: torch.Tensor, phrases: List[str],
                          masked: List[str]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """phi's loss on one batch: (weighted total, contrastive loss, regulariser)."""
        o = self.options
        distillation = contrastive_loss(targets, estimated, o["temperature"])
        with torch.no_grad():
            reference = self.encode_texts(encoder, phrases, None)
        regulariser = (1 - F.cosine_similarity(reference, self.encode_texts(encoder, masked, estimated))).mean()
        total = o["distillation_weight"] * distillation + o["regulariser_weight"] * regulariser
        return total, distillation, regulariser

    # --- the authors' released network ----------------------------------------------------------------
    @classmethod
    def convert_original(cls, checkpoint: dict) -> Tuple[Dict[str, torch.Tensor], Dict[str, int]]:
        """SEARLE's released phi (a dict whose ``Phi`` holds the network's state dict, keys ``layers.{0,3,6}.*``,
        as its ``torch.hub`` entry and ``train_phi.save_phi`` write it), or that state dict itself ->
        (our state dict, ``{"hidden_dim"}``)."""
        source = checkpoint.get("Phi", checkpoint)
        expected = {f"layers.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")}
        ours: Dict[str, torch.Tensor] = {}
        for key, value in source.items():
            name = key[len("module."):] if key.startswith("module.") else key
            if name not in expected:
                raise ValueError(f"{key!r} is not a key of SEARLE's phi (layers.0/3/6.weight/bias)")
            ours[name] = value.float()
        if set(ours) != expected:
            raise ValueError(f"not a whole SEARLE phi: {', '.join(sorted(expected - set(ours)))} missing")
        return ours, {"hidden_dim": ours["layers.0.weight"].shape[0]}
