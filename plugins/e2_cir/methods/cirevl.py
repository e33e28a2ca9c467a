"""CIReVL (Karthik et al., ICLR 2024): training-free. Caption the reference image, rewrite the caption
with the modification text (``{c1} and {c2}``), and retrieve with the encoder's text tower.

Upstream calls BLIP-2 as the captioner and a hosted language model as the rewriter: neither works
offline. Both are pluggable here:

* captioner ``vocabulary`` (default, offline): the encoder itself tags the image with the keyword
  phrases of the training captions it matches best (``a photo of {phrase}``, zero-shot) and writes
  ``a {garment} with {p1}, {p2} and {p3}``; or ``hf:PATH``, any local Hugging Face image-to-text model;
* rewriter ``template`` (default, deterministic): ``{caption} that {c1} and {c2}``; or ``hf:PATH``,
  any local Hugging Face text-generation model, prompted with the caption and the instruction.
"""
from __future__ import annotations

from typing import Callable, List

import torch
import torch.nn.functional as F

from ..phrases import Vocabulary
from .base import CIRMethod, QueryBatch, TrainData

GARMENTS = {"dress": "dress", "shirt": "shirt", "toptee": "top"}
REWRITE_PROMPT = ("Image description: {caption}\nInstruction: {instruction}\n"
                  "Description of the image after the instruction is applied:")


class CIReVL(CIRMethod):
    name = "cirevl"
    convention = "cirevl"

    def __init__(self, captioner: str = "vocabulary", rewriter: str = "template", phrases: int = 3):
        super().__init__(captioner=captioner, rewriter=rewriter, phrases=phrases)
        self.vocabulary = None
        self._caption_model = _hf_pipeline("image-to-text", captioner) if captioner != "vocabulary" else None
        self._rewrite_model = _hf_pipeline("text-generation", rewriter) if rewriter != "template" else None
        self.last_texts: List[str] = []

    def prepare(self, encoder, train: TrainData) -> None:
        self.vocabulary = Vocabulary(train.captions)
        with torch.no_grad():
            self._phrase_features = F.normalize(
                self.encode_texts(encoder, [f"a photo of {p}" for p in self.vocabulary.phrases], None), dim=-1)

    def caption(self, encoder, batch: QueryBatch) -> List[str]:
        if self._caption_model is not None:
            return [out[0]["generated_text"].strip() for out in
                    (self._caption_model(batch.load_image(name)) for name in batch.reference_names)]
        scores = batch.reference_features.to(self._phrase_features.device) @ self._phrase_features.t()
        top = scores.topk(min(self.options["phrases"], len(self.vocabulary)), dim=1).indices.tolist()
        garment = GARMENTS.get(batch.category, batch.category)
        return [f"a {garment} with " + _join([self.vocabulary.phrases[i] for i in row]) for row in top]

    def rewrite(self, caption: str, instruction: str) -> str:
        if self._rewrite_model is None:
            return f"{caption} that {instruction}"
        prompt = REWRITE_PROMPT.format(caption=caption, instruction=instruction)
        generated = self._rewrite_model(prompt, max_new_tokens=40, do_sample=False,
                                        return_full_text=False)[0]["generated_text"]
        return generated.strip().split("\n")[0].strip() or f"{caption} that {instruction}"

    @torch.no_grad()
    def queries(self, encoder, batch: QueryBatch) -> torch.Tensor:
        if self.vocabulary is None and self._caption_model is None:
            raise ValueError("cirevl: call prepare() with the training split first (its captioner's vocabulary)")
        captions = self.caption(encoder, batch)
        texts = [self.rewrite(caption, prompts[0]) for caption, prompts in zip(captions, batch.prompts)]
        self.last_texts = texts
        return F.normalize(self.encode_texts(encoder, texts, None), dim=-1)


def _join(phrases: List[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _hf_pipeline(task: str, spec: str) -> Callable:
    """``hf:PATH`` -> a local transformers pipeline (nothing is downloaded)."""
    if not spec.startswith("hf:"):
        raise ValueError(f"{'--captioner' if task == 'image-to-text' else '--rewriter'} {spec!r}: use "
                         f"{'vocabulary' if task == 'image-to-text' else 'template'} or hf:PATH to a local "
                         "Hugging Face model folder")
    try:
        from transformers import pipeline
    except ImportError as err:
        raise ImportError("hf: captioners and rewriters need transformers: pip install transformers") from err
    return pipeline(task, model=spec[3:])
