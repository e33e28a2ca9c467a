"""LinCIR (Gu et al., CVPR 2024): the mapping network phi is trained from text only (self-masking
projection). Each training caption's keyword phrases are replaced by ``$``, whose embedding phi predicts
from the caption's own text embedding plus noise; the loss pulls the masked caption's embedding onto the
caption's. At test time the reference image's embedding goes through phi. Query: ``a photo of $ that
{c1} and {c2}`` averaged with the reversed order (SEARLE's convention, as LinCIR's evaluation uses it).

Defaults are LinCIR's code (``train_phi.py``, ``loader.py``, ``models.py``; README's training command):

* phi: Linear(D, 4D), GELU, Dropout(0.5), Linear(4D, 4D), GELU, Dropout(0.5), Linear(4D, token width).
* input: the caption's raw (unnormalised) projected text embedding ``t`` plus ``1.0 * u * n`` with
  ``u ~ U(0, 1)`` per caption and ``n ~ N(0, I)``, not renormalised; at test time the raw image embedding.
* loss: ``F.mse_loss`` (mean over batch and dimensions) between the raw embedding of the masked caption
  (phi's token at ``$``) and ``t``.
* AdamW, lr 1e-4, weight decay 0.01, constant rate, no clipping, no EMA; batches of 512 (64 on each of
  8 GPUs), shuffled, the last incomplete batch of a pass dropped. LinCIR runs 20000 steps over three
  caption sets (CC3M's captions and two prompt sets): ``steps=20000``; the default here is ``epochs``
  passes over the captions given.
* captions: lower-cased, ``$`` removed, stripped, cut to the context; masked by :meth:`LinCIR.self_mask`.

Keyword runs: :func:`e2_cir.phrases.keyword_runs` (spaCy's tagger upstream; nltk's where its data is
installed, else a function-word fallback). ``masking="phrases"`` is the earlier rule of this package
(:func:`e2_cir.phrases.keyword_phrases`, whole-word masking; captions without a phrase left out)."""
from __future__ import annotations

import random
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from e2_core import trim_padding

from ..phrases import keyword_phrases, keyword_runs, mask_phrase
from .base import Phi, PseudoWordMethod, TrainData, frozen

MARK = "[$]"  # the marker LinCIR's masking writes (its tokenizer's added token); spaced out to "$" here
FALLBACK = "a photo of $"  # LinCIR's text when the placeholder did not survive the cut to the context


class LinCIR(PseudoWordMethod):
    name = "lincir"
    convention = "searle"
    needs = ("captions",)

    def __init__(self, epochs: int = 30, steps: Optional[int] = None, batch_size: int = 512, lr: float = 1e-4,
                 weight_decay: float = 0.01, noise: float = 1.0, dropout: float = 0.5,
                 hidden_dim: Optional[int] = None, masking: str = "lincir", seed: int = 0):
        if masking not in ("lincir", "phrases"):
            raise ValueError(f"masking={masking!r}: use lincir or phrases")
        super().__init__(epochs=epochs, steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                         noise=noise, dropout=dropout, hidden_dim=hidden_dim, masking=masking, seed=seed)

    def build(self, encoder):
        hidden = self.options.get("hidden_dim") or 4 * encoder.embed_dim
        return Phi(encoder.embed_dim, hidden, encoder.token_width, self.options["dropout"])

    @classmethod
    def convert_original(cls, checkpoint: dict) -> Tuple[dict, dict]:
        """LinCIR's released phi (``lincir_large.pt``) or a checkpoint its training script saves:
        ``{"epoch": int, "Phi": state_dict}`` with ``layers.{0,3,6}.{weight,bias}`` (the same layout as
        :class:`Phi`). Gives the state dict and ``hidden_dim``; the input and output widths must be the
        encoder's embedding and token widths."""
        state = checkpoint.get("Phi", checkpoint) if isinstance(checkpoint, dict) else None
        expected = {f"layers.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")}
        if not isinstance(state, dict) or set(state) != expected:
            found = sorted(state)[:8] if isinstance(state, dict) else type(checkpoint).__name__
            raise ValueError(f"not a LinCIR phi checkpoint: expected a 'Phi' entry with {sorted(expected)}, "
                             f"found {found}")
        state = {k: v.float() for k, v in state.items()}
        hidden = state["layers.0.weight"].shape[0]
        if state["layers.3.weight"].shape != (hidden, hidden) or state["layers.6.weight"].shape[1] != hidden:
            raise ValueError("not a LinCIR phi checkpoint: its layers' widths do not chain")
        return state, {"hidden_dim": hidden}

    # --- training -------------------------------------------------------------------------------------
    def fit(self, encoder, train: TrainData, progress: bool = True) -> None:
        o = self.options
        torch.manual_seed(o["seed"])
        frozen(encoder)
        phrases = o["masking"] == "phrases"
        if phrases:
            captions = list(dict.fromkeys(train.captions))
            kept = [c for c in captions if self.mask(c) != c]
            self.notes["captions_left_out"] = {"count": len(captions) - len(kept), "of": len(captions),
                                               "why": "no keyword phrase to mask"}
        else:
            kept = list(train.captions)
            self.notes["captions_left_out"] = {"count": 0, "of": len(kept),
                                               "why": "none: LinCIR's masking keeps every caption"}
        if not kept:
            raise ValueError("lincir: no training caption to learn from")
        rng = random.Random(o["seed"])
        generator = torch.Generator().manual_seed(o["seed"])
        counts = {"keyword": 0, "random_word": 0, "a_photo_of": 0}

        def loss_of(rows: torch.Tensor) -> torch.Tensor:
            if phrases:
                captions = [kept[i] for i in rows.tolist()]
                masked, hows = [self.mask(c) for c in captions], ["keyword"] * len(captions)
            else:  # cleaned and masked as each batch is drawn, as LinCIR's data loader does
                captions = [self.clean(kept[i], encoder.tokenizer) for i in rows.tolist()]
                masked, hows = zip(*[self.self_mask(c, rng) for c in captions])
            tokens, lost = self.masked_tokens(encoder, list(masked))
            for how, fell_back in zip(hows, lost.tolist()):
                counts["a_photo_of" if fell_back else how] += 1
            with torch.no_grad():
                target = self.encode_texts(encoder, captions, None)
            return self.training_loss(encoder, target, tokens, self.draw_noise(target, generator))

        self.network = self.build(encoder).to(encoder.device).train()
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=o["lr"], weight_decay=o["weight_decay"])
        size = min(o["batch_size"], len(kept))
        per_pass = len(kept) // size  # the last incomplete batch of a pass is dropped
        steps = o["steps"] if o["steps"] is not None else o["epochs"] * per_pass
        order = torch.Generator().manual_seed(o["seed"])
        step = 0
        with tqdm(total=steps, desc="lincir", disable=not progress, dynamic_ncols=True) as bar:
            while step < steps:
                for rows in torch.randperm(len(kept), generator=order)[:per_pass * size].split(size):
                    loss = loss_of(rows)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    step += 1
                    bar.update(1)
                    if step == steps:
                        break
        self.network.eval()
        self.notes["masked"] = counts

    def draw_noise(self, target: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``noise * u * n``: ``u ~ U(0, 1)`` per row, ``n ~ N(0, I)`` (LinCIR's code: scale 1.0)."""
        scale = torch.rand(len(target), generator=generator).unsqueeze(-1)
        return (self.options["noise"] * scale * torch.randn(target.shape, generator=generator)).to(target.device)

    def training_loss(self, encoder, target: torch.Tensor, masked_tokens: torch.Tensor,
                      noise: torch.Tensor) -> torch.Tensor:
        """LinCIR's loss: phi's token from the raw caption embedding ``target`` plus ``noise`` put at ``$`` of
        the masked captions' ``masked_tokens``; mean squared error of the raw embeddings."""
        pseudo = self.network(target + noise)
        masked = encoder.encode_text_with_pseudo_tokens(masked_tokens.to(encoder.device), pseudo,
                                                        encoder.token_id(self.placeholder))
        return F.mse_loss(masked.float(), target.float(), reduction="mean")

    def masked_tokens(self, encoder, masked: List[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The masked captions' tokens (padding trimmed), and which rows lost their ``$`` to the cut to the
        context and became ``a photo of $`` (LinCIR's code)."""
        placeholder = encoder.token_id(self.placeholder)
        tokens = encoder.tokenizer(masked)
        lost = ~(tokens == placeholder).any(dim=1)
        if bool(lost.any()):
            tokens[lost] = encoder.tokenizer([FALLBACK])[0]
        return trim_padding(tokens), lost

    # --- masking --------------------------------------------------------------------------------------
    @staticmethod
    def clean(caption: Optional[str], tokenizer=None) -> str:
        """LinCIR's caption cleaning: lower-cased, ``$`` removed, stripped (GCC's ``<PERSON>`` -> ``person``);
        with a BPE ``tokenizer`` (``encode``/``decode``), a caption longer than the context is cut to its
        first ``context - 2`` tokens and decoded (75 in CLIP's context of 77, as LinCIR's code cuts)."""
        caption = (caption or "").replace("<PERSON>", "person").lower().replace("$", "").strip()
        encode, decode = getattr(tokenizer, "encode", None), getattr(tokenizer, "decode", None)
        if encode is not None and decode is not None:
            room = getattr(tokenizer, "context_length", 77) - 2
            ids = encode(caption)
            if len(ids) > room:
                caption = decode(ids[:room]).strip()
        return caption

    @staticmethod
    def self_mask(caption: str, rng: random.Random, runs: Optional[Sequence[str]] = None) -> Tuple[str, str]:
        """A cleaned caption masked as LinCIR's code masks it, and which rule did (``keyword``, ``random_word``).

        Each keyword run (:func:`e2_cir.phrases.keyword_runs`), in order, that occurs in the caption (as a
        substring, inside words too) has every occurrence replaced by the placeholder; at the first run that
        does not occur (or when there is none), one word of ``caption.split(" ")`` drawn by
        ``rng.sample`` has every occurrence replaced instead, and no later run is masked. The placeholder
        is spaced apart so that the tokenizer keeps it one token, as LinCIR's added token is. The empty
        caption becomes ``$``."""
        runs = keyword_runs(caption) if runs is None else list(runs)
        masked, how = caption, "keyword"
        for run in runs or [""]:
            if run and run in caption:
                masked = masked.replace(run, MARK)
            else:
                for word in rng.sample(caption.split(" "), k=1):
                    masked = masked.replace(word, MARK)
                how = "random_word"
                break
        return " ".join(masked.replace(MARK, " $ ").split()), how

    @staticmethod
    def mask(caption: str) -> str:
        """``masking="phrases"``: every keyword phrase of the caption replaced by ``$`` (whole words)."""
        for phrase in sorted(keyword_phrases(caption), key=len, reverse=True):
            caption = mask_phrase(caption, phrase)
        return caption
