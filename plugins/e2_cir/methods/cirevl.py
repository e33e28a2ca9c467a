"""CIReVL (Karthik et al., ICLR 2024): training-free. Caption the reference image, rewrite the caption
with the modification text (``{c1} and {c2}``), and retrieve with the encoder's text tower.

Upstream calls BLIP-2 as the captioner and a hosted language model as the rewriter: neither works
offline. Both are pluggable here:

* captioner ``vocabulary`` (default, offline): the encoder itself tags the image with the keyword
  phrases of the training captions it matches best (``a photo of {phrase}``, zero-shot) and writes
  ``a {garment} with {p1}, {p2} and {p3}``; a decoder file of the ``caption`` task (``*.safetensors``:
  DeCap or CapDec trained for this encoder); or ``hf:PATH``, any local Hugging Face image-to-text model;
* rewriter ``template`` (default, deterministic): ``{caption} that {c1} and {c2}``; or ``hf:PATH``,
  any local Hugging Face text-generation model, prompted with the caption and the instruction.
"""
from __future__ import annotations

from typing import List

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
    needs = ("captions",)

    def __init__(self, captioner: str = "vocabulary", rewriter: str = "template", phrases: int = 3):
        super().__init__(captioner=captioner, rewriter=rewriter, phrases=phrases)
        self.vocabulary = None
        self._caption_model = None  # a caption-task decoder file is loaded for the encoder in prepare()
        if captioner != "vocabulary" and not captioner.endswith(".safetensors"):
            self._caption_model = HFCaptioner(_local_path("captioner", captioner, "vocabulary"))
        self._rewrite_model = HFRewriter(_local_path("rewriter", rewriter, "template")) \
            if rewriter != "template" else None
        self.last_texts: List[str] = []

    def prepare(self, encoder, train: TrainData) -> None:
        if self.options["captioner"].endswith(".safetensors"):
            from e2_caption import load_captioner  # the caption task's DeCap / CapDec, refused for another encoder

            decoder = load_captioner(self.options["captioner"], encoder)
            self._caption_model = lambda images, features: decoder.caption_features(features)
        self.vocabulary = Vocabulary(train.captions)
        with torch.no_grad():
            self._phrase_features = F.normalize(
                self.encode_texts(encoder, [f"a photo of {p}" for p in self.vocabulary.phrases], None), dim=-1)

    def caption(self, encoder, batch: QueryBatch) -> List[str]:
        if isinstance(self._caption_model, HFCaptioner):
            return self._caption_model([batch.load_image(name) for name in batch.reference_names])
        if self._caption_model is not None:
            return self._caption_model(None, batch.reference_features)
        scores = batch.reference_features.to(self._phrase_features.device) @ self._phrase_features.t()
        top = scores.topk(min(self.options["phrases"], len(self.vocabulary)), dim=1).indices.tolist()
        garment = GARMENTS.get(batch.category, batch.category)
        return [f"a {garment} with " + _join([self.vocabulary.phrases[i] for i in row]) for row in top]

    def rewrite(self, caption: str, instruction: str) -> str:
        if self._rewrite_model is None:
            return f"{caption} that {instruction}"
        generated = self._rewrite_model(REWRITE_PROMPT.format(caption=caption, instruction=instruction))
        return generated.strip().split("\n")[0].strip() or f"{caption} that {instruction}"

    @torch.no_grad()
    def queries(self, encoder, batch: QueryBatch) -> torch.Tensor:
        if self.vocabulary is None:
            raise ValueError("cirevl: call prepare() with the training split first (its captioner's vocabulary)")
        captions = self.caption(encoder, batch)
        texts = [self.rewrite(caption, prompts[0]) for caption, prompts in zip(captions, batch.prompts)]
        self.last_texts = texts
        return F.normalize(self.encode_texts(encoder, texts, None), dim=-1)


def _join(phrases: List[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _local_path(option: str, spec: str, default: str) -> str:
    if not spec.startswith("hf:"):
        raise ValueError(f"{option}={spec!r}: use {default} or hf:PATH to a local Hugging Face model folder")
    return spec[3:]


class HFCaptioner:
    """A local Hugging Face image-to-text model (BLIP, GIT, a VisionEncoderDecoder, ...): images -> captions.
    Greedy decoding; nothing is downloaded."""

    def __init__(self, path: str, max_new_tokens: int = 30):
        import transformers

        self.max_new_tokens = max_new_tokens
        model_class = getattr(transformers, "AutoModelForImageTextToText", None) or transformers.AutoModelForVision2Seq
        try:
            self.model = model_class.from_pretrained(path, local_files_only=True).eval()
        except ValueError:  # e.g. a VisionEncoderDecoder, which the auto class does not map in every version
            self.model = transformers.VisionEncoderDecoderModel.from_pretrained(path, local_files_only=True).eval()
        self.images = transformers.AutoImageProcessor.from_pretrained(path, local_files_only=True)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)

    @torch.no_grad()
    def __call__(self, images) -> List[str]:
        pixels = self.images(images=images, return_tensors="pt")["pixel_values"]
        ids = self.model.generate(pixel_values=pixels, max_new_tokens=self.max_new_tokens, do_sample=False)
        return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


class HFRewriter:
    """A local Hugging Face causal language model: prompt -> its greedy continuation."""

    def __init__(self, path: str, max_new_tokens: int = 40):
        import transformers

        self.max_new_tokens = max_new_tokens
        self.model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)

    @torch.no_grad()
    def __call__(self, prompt: str) -> str:
        inputs = self.tokenizer(prompt, return_tensors="pt")
        ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        return self.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
