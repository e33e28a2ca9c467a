"""CIReVL (Karthik et al., ICLR 2024): training-free. Caption the reference image, have a language model
rewrite the caption as the instruction asks, and retrieve the gallery with the encoder's text tower.

CIReVL's code on FashionIQ (``src/utils.py``, ``src/compute_results.py``, ``src/prompts.py``):

* instruction: ``{c1} and {c2}``, each relative caption stripped of ``.?, `` (the ``cirevl`` convention);
* captioner: BLIP-2 FlanT5-XXL (LAVIS ``pretrain_flant5xxl``), prompted with :data:`CAPTION_PROMPT`, one
  caption per image (LAVIS defaults: 5 beams, at most 30 new tokens);
* rewriter: gpt-3.5-turbo, temperature 0, at most 700 tokens, stopping at a blank line, sent
  their ``structural_modifier_prompt_fashion`` then the caption and instruction lines (here
  :data:`REWRITE_PROMPT`, with this project's :data:`INSTRUCTIONS` unless ``prompt=FILE`` gives theirs); the
  answer is read by :func:`edited_description`;
* retrieval: one description per query (nothing averaged), tokenised at the context length with longer
  texts cut (end token kept), embedded, L2-normalised, gallery ranked by cosine similarity
  (:func:`encode_descriptions`; the gallery is the category's image split, Recall@10/50).

BLIP-2 and a hosted model do not run offline, so both steps are pluggable, and the offline defaults
depart from the original:

* captioner ``vocabulary`` (default): the encoder itself tags the image with the keyword phrases of
  the training captions it matches best (``a photo of {phrase}``, zero-shot) and writes
  ``a {garment} with {p1}, {p2} and {p3}``; or a decoder file of the ``caption`` task
  (``*.safetensors``: DeCap or CapDec trained for this encoder); or ``hf:PATH``, a local Hugging Face
  image-to-text model (:class:`HFCaptioner`; BLIP-2 gets CIReVL's prompt);
* rewriter ``template`` (default, deterministic): ``{caption} that {instruction}``; or ``hf:PATH``, a
  local Hugging Face text-generation model (:class:`HFRewriter`) sent CIReVL's prompt.

``caption_model`` (``QueryBatch -> captions``) and ``rewrite_model`` (``prompt -> answer``) may be
replaced by any callables of those shapes.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from e2_core import trim_padding

from ..phrases import Vocabulary
from .base import CIRMethod, QueryBatch, TrainData

GARMENTS = {"dress": "dress", "shirt": "shirt", "toptee": "top"}

#: CIReVL's code: the prompt its BLIP-2 captions every reference image with (``prompts.blip_prompt``).
CAPTION_PROMPT = "Describe the image in complete detail. You must especially focus on all the objects in the image"

#: The rewriter's instructions, in this project's words; the caption and the instruction follow on lines of
#: their own (``Image Content: ...``, ``Instruction: ...``), as in CIReVL's code. CIReVL's own FashionIQ
#: instructions (``structural_modifier_prompt_fashion`` in its ``src/prompts.py``, with worked examples) are one
#: option away: save that text to a file and give ``cirevl.prompt=FILE``.
INSTRUCTIONS = (
    "Below, after \"Image Content:\", is a description of a garment photo, and after \"Instruction:\" a change "
    "to make to the garment. Answer with one line that begins with \"Edited Description:\" and describes the "
    "garment after the change: its kind, colours, pattern, material, fit and details, in plain words.\n")
REWRITE_PROMPT = "{instructions}\nImage Content: {caption}\nInstruction: {instruction}"
#: SHA-256 of CIReVL's ``structural_modifier_prompt_fashion``: a prompt file holding exactly it is named so
CIREVL_FASHION_PROMPT_SHA256 = "73453274fcfbb108b2181defab2f8265d29c20fda15977fc0d19c08d3ecabb56"
ANSWER_PREFIX = "Edited Description:"


class CIReVL(CIRMethod):
    name = "cirevl"
    convention = "cirevl"
    needs = ("captions",)

    def __init__(self, captioner: str = "vocabulary", rewriter: str = "template", phrases: int = 3,
                 prompt: Optional[str] = None):
        """``prompt``: a text file with the rewriter's instructions (default :data:`INSTRUCTIONS`)."""
        super().__init__(captioner=captioner, rewriter=rewriter, phrases=phrases, prompt=prompt)
        self.instructions = INSTRUCTIONS
        if prompt is not None:
            path = Path(prompt)
            if not path.is_file():
                raise FileNotFoundError(f"cirevl prompt={prompt}: no such file (the rewriter's instructions)")
            self.instructions = path.read_text(encoding="utf-8")
        self.notes["rewriter_prompt"] = "CIReVL's structural_modifier_prompt_fashion" if hashlib.sha256(
            self.instructions.encode()).hexdigest() == CIREVL_FASHION_PROMPT_SHA256 else (prompt or "built in")
        self.vocabulary = None
        #: ``QueryBatch -> captions``; None: the vocabulary captioner. A decoder file of the caption
        #: task is loaded for the encoder in :meth:`prepare`.
        self.caption_model: Optional[Callable[[QueryBatch], List[str]]] = None
        if captioner != "vocabulary" and not captioner.endswith(".safetensors"):
            hf = HFCaptioner(_local_path("captioner", captioner, "vocabulary"))
            self.caption_model = lambda batch: hf([batch.load_image(name) for name in batch.reference_names])
        #: ``prompt -> answer``; None: the template rewriter.
        self.rewrite_model: Optional[Callable[[str], str]] = \
            HFRewriter(_local_path("rewriter", rewriter, "template")) if rewriter != "template" else None
        self.last_captions: List[str] = []
        self.last_texts: List[str] = []

    def prepare(self, encoder, train: TrainData) -> None:
        if self.options["captioner"].endswith(".safetensors"):
            from e2_caption import load_captioner  # the caption task's DeCap / CapDec, refused for another encoder

            decoder = load_captioner(self.options["captioner"], encoder)
            self.caption_model = lambda batch: decoder.caption_features(batch.reference_features)
        self.vocabulary = Vocabulary(train.captions)
        with torch.no_grad():
            self._phrase_features = F.normalize(
                self.encode_texts(encoder, [f"a photo of {p}" for p in self.vocabulary.phrases], None), dim=-1)

    def caption(self, encoder, batch: QueryBatch) -> List[str]:
        if self.caption_model is not None:
            return list(self.caption_model(batch))
        # the top phrases of each image (a row's scale does not change its top-k: raw embeddings will do)
        scores = batch.reference_features.to(self._phrase_features.device).float() @ self._phrase_features.t()
        top = scores.topk(min(self.options["phrases"], len(self.vocabulary)), dim=1).indices.tolist()
        garment = GARMENTS.get(batch.category, batch.category)
        return [f"a {garment} with " + _join([self.vocabulary.phrases[i] for i in row]) for row in top]

    def rewrite(self, caption: str, instruction: str) -> str:
        """The target description: the rewriter's, read as CIReVL's code reads it, or the template's."""
        if self.rewrite_model is None:
            return f"{caption} that {instruction}"
        prompt = REWRITE_PROMPT.format(instructions=self.instructions, caption=caption, instruction=instruction)
        return edited_description(self.rewrite_model(prompt), instruction)

    @torch.no_grad()
    def queries(self, encoder, batch: QueryBatch) -> torch.Tensor:
        if self.vocabulary is None:
            raise ValueError("cirevl: call prepare() with the training split first (its captioner's vocabulary)")
        captions = self.caption(encoder, batch)
        # the instruction as the convention wrote it; another convention's placeholder word is dropped
        instructions = [" ".join(w for w in p[0].split(" ") if w != self.placeholder) for p in batch.prompts]
        texts = [self.rewrite(c, i) for c, i in zip(captions, instructions)]
        self.last_captions, self.last_texts = captions, texts
        return encode_descriptions(encoder, texts)


def edited_description(answer: str, instruction: str) -> str:
    """CIReVL's code reads the rewriter's answer so: the first line that starts (after spaces) with
    ``Edited Description:`` gives the text between that colon and the next one, stripped; where no line
    does, or that text is empty, the description is the instruction itself."""
    for line in answer.split("\n"):
        if line.strip().startswith(ANSWER_PREFIX):
            return line.split(":")[1].strip() or instruction
    return instruction


def encode_descriptions(encoder, texts: List[str]) -> torch.Tensor:
    """L2-normalised text embeddings of the descriptions, as they are (CIReVL's code: tokenised at the
    context length, longer texts cut with the end token kept; no prompt template, nothing averaged)."""
    tokens = trim_padding(encoder.tokenizer(texts)).to(encoder.device)
    return F.normalize(encoder.encode_text(tokens).float(), dim=-1)


def _join(phrases: List[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _local_path(option: str, spec: str, default: str) -> str:
    if not spec.startswith("hf:"):
        raise ValueError(f"{option}={spec!r}: use {default} or hf:PATH to a local Hugging Face model folder")
    return spec[3:]


class HFCaptioner:
    """A local Hugging Face image-to-text model (BLIP-2, BLIP, GIT, a VisionEncoderDecoder, ...): images ->
    one caption each, by beam search as LAVIS's BLIP-2 ``generate`` does in CIReVL's code (5 beams, at
    most 30 new tokens). BLIP-2 and InstructBLIP are prompted with ``prompt`` (CIReVL's
    :data:`CAPTION_PROMPT`); other captioners caption unprompted. Nothing is downloaded."""

    PROMPTED = ("blip-2", "instructblip")

    def __init__(self, path: str, prompt: str = CAPTION_PROMPT, beams: int = 5, max_new_tokens: int = 30):
        import transformers

        self.prompt, self.beams, self.max_new_tokens = prompt, beams, max_new_tokens
        model_class = getattr(transformers, "AutoModelForImageTextToText", None) or transformers.AutoModelForVision2Seq
        try:
            self.model = model_class.from_pretrained(path, local_files_only=True).eval()
        except ValueError:  # e.g. a VisionEncoderDecoder, which the auto class does not map in every version
            self.model = transformers.VisionEncoderDecoderModel.from_pretrained(path, local_files_only=True).eval()
        self.prompted = getattr(self.model.config, "model_type", "") in self.PROMPTED
        if self.prompted:  # its processor puts the image's query tokens before the prompt
            self.processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
        else:
            self.images = transformers.AutoImageProcessor.from_pretrained(path, local_files_only=True)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)

    @torch.no_grad()
    def __call__(self, images) -> List[str]:
        images = list(images)
        settings = dict(num_beams=self.beams, max_new_tokens=self.max_new_tokens, min_length=1, do_sample=False)
        if not self.prompted:
            pixels = self.images(images=images, return_tensors="pt")["pixel_values"]
            ids = self.model.generate(pixel_values=pixels, **settings)
            return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        inputs = self.processor(images=images, text=[self.prompt] * len(images), return_tensors="pt", padding=True)
        ids = self.model.generate(**inputs, **settings)
        given = inputs["input_ids"]
        if ids.shape[1] > given.shape[1] and torch.equal(ids[:, :given.shape[1]], given):
            ids = ids[:, given.shape[1]:]  # a decoder-only language model gives the prompt back before its answer
        return [text.strip() for text in self.processor.batch_decode(ids, skip_special_tokens=True)]


class HFRewriter:
    """A local Hugging Face causal language model: prompt -> its greedy continuation up to the first
    blank line (CIReVL's code asks its model at temperature 0 for at most 700 tokens, stopping at a
    blank line). A chat model gets the prompt as one user message, as CIReVL's code sends it. A model
    whose context is shorter than prompt and answer sees the prompt's end (caption and instruction)."""

    def __init__(self, path: str, max_new_tokens: int = 700, stop: str = "\n\n"):
        import transformers

        self.max_new_tokens, self.stop = max_new_tokens, stop
        self.model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)

    @torch.no_grad()
    def __call__(self, prompt: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
            ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
        new = self.max_new_tokens
        limit = getattr(self.model.config, "max_position_embeddings", None) or \
            getattr(self.model.config, "n_positions", None)
        if limit and ids.shape[1] + new > limit:
            new = min(new, max(limit // 4, limit - ids.shape[1]))
            ids = ids[:, -(limit - new):]
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                  do_sample=False, stopping_criteria=[self._stop_after(ids.shape[1])],
                                  pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        return self._answer(out[0], ids.shape[1])

    def _answer(self, ids: torch.Tensor, start: int) -> str:
        return self.tokenizer.decode(ids[start:], skip_special_tokens=True).split(self.stop)[0]

    def _stop_after(self, start: int):
        """A stopping criterion: the answer so far holds the stop string (any tokenizer; a greedy answer
        is the same whether it stops there or is cut there)."""
        from transformers import StoppingCriteria

        rewriter = self

        class StopString(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.tensor([rewriter.stop in rewriter.tokenizer.decode(row[start:], skip_special_tokens=True)
                                     for row in input_ids], device=input_ids.device)

        return StopString()
