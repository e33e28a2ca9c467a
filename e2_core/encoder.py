"""The encoder contract: what every task, harness and adapter of this package consumes.

An :class:`Encoder` wraps any open_clip ``CLIP`` (one made by open_clip itself, a CLIP-FT
checkpoint, or an ``E2Model``, which is a CLIP with E2's image tower) and gives, with no question
of which it is: image and text embeddings, the tokenizer, the preprocessing transforms, the
embedding dimension, a name, the text tower run with pseudo-word embeddings substituted at a
placeholder token (Pic2Word, SEARLE, LinCIR), and E2's regional outputs where the model has them.

Example:
    >>> encoder = e2_core.load_encoder("demo:e2")                      # doctest: +SKIP
    >>> images = torch.stack([encoder.preprocess(im) for im in pil_images])  # doctest: +SKIP
    >>> image_features = encoder.encode_image(images, normalize=True)  # doctest: +SKIP
    >>> tokens = encoder.tokenizer(["a photo of $ that is red"])        # doctest: +SKIP
    >>> query = encoder.encode_text_with_pseudo_tokens(tokens, pseudo, encoder.token_id("$"))  # doctest: +SKIP

Objects of other libraries can stand in for an ``Encoder`` when they have every attribute in
:data:`CONTRACT`; :func:`as_encoder` checks it and names what is missing.
"""
from __future__ import annotations

import hashlib
import string
from collections import Counter
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from open_clip.model import CLIP
from open_clip.transform import PreprocessCfg, image_transform_v2
from torch import nn

from .architecture import clip_config_of, tokenizer_for
from .model import E2VisionOutput, text_tower

#: What a stand-in for :class:`Encoder` must have.
CONTRACT = ("name", "embed_dim", "token_width", "tokenizer", "preprocess", "encode_image", "encode_text",
            "token_id", "encode_text_with_pseudo_tokens", "has_regions", "entities", "encode_image_regions", "label")


class Encoder(nn.Module):
    """An image-text encoder (CLIP or E2) behind one interface.

    Args:
        model: an open_clip ``CLIP`` or ``E2Model``.
        name: how results and tables call it (default: the kind and architecture).
        arch: its open_clip architecture name, when known (tokenizer; checkpoints).
    """

    def __init__(self, model: CLIP, name: Optional[str] = None, arch: Optional[str] = None):
        super().__init__()
        if not isinstance(model, CLIP):
            raise TypeError(f"Encoder wraps an open_clip CLIP or an E2Model, got {type(model).__name__}; "
                            "another library's encoder must provide e2_core.encoder.CONTRACT itself")
        self.model = model
        self.arch = arch or getattr(model, "clip_model", None)
        self.name = name or f"{self.kind} {self.arch or ''}".strip()
        self._tokenizer = None
        self._token_ids: dict = {}
        self._digest = (None, "")

    # --- what it is ------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """``"E2"`` when the model has E2's regional outputs, else ``"CLIP"``."""
        return "E2" if self.has_regions else "CLIP"

    @property
    def has_regions(self) -> bool:
        return hasattr(self.model, "encode_image_regions")

    @property
    def entities(self) -> Tuple[str, ...]:
        """The tag entities of E2's regional embeddings (empty for a CLIP)."""
        return tuple(getattr(self.model, "entities", ()))

    @property
    def embed_dim(self) -> int:
        projection = self.model.text_projection
        if projection is None:
            return self.token_width
        return projection.out_features if isinstance(projection, nn.Linear) else projection.shape[1]

    @property
    def token_width(self) -> int:
        """Width of the text tower's token embeddings (the space pseudo tokens live in)."""
        return self.model.token_embedding.embedding_dim

    @property
    def context_length(self) -> int:
        return self.model.context_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # --- inputs ----------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Callable:
        """open_clip's tokenizer of the architecture: ``tokenizer(list_of_str) -> (N, context) int64``."""
        if self._tokenizer is None:
            self._tokenizer = tokenizer_for(self.arch, self.context_length)
        return self._tokenizer

    @property
    def image_size(self) -> Tuple[int, int]:
        """(height, width) of the images ``preprocess`` makes and the image tower takes."""
        return tuple(self._preprocess_cfg().size)

    @property
    def preprocess(self) -> Callable:
        """PIL image -> tensor, as in evaluation (resize, centre crop, normalise)."""
        return image_transform_v2(self._preprocess_cfg(), is_train=False)

    @property
    def preprocess_train(self) -> Callable:
        return image_transform_v2(self._preprocess_cfg(), is_train=True)

    def input_view(self, image) -> "Image.Image":
        """A PIL image as the image tower sees it: ``preprocess``'s resize and crop, its normalisation undone.
        ``patch_boxes`` and ``image_size`` are in this image's pixels (a non-square photo loses its crop)."""
        from PIL import Image

        cfg = self._preprocess_cfg()
        pixels = self.preprocess(image) * torch.tensor(cfg.std).view(-1, 1, 1) + torch.tensor(cfg.mean).view(-1, 1, 1)
        array = pixels.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
        return Image.fromarray(array if array.shape[2] == 3 else array[:, :, 0])

    def _preprocess_cfg(self) -> PreprocessCfg:
        cfg = dict(getattr(self.model.visual, "preprocess_cfg", {}) or {})
        cfg.setdefault("size", tuple(self.model.visual.image_size))
        return PreprocessCfg(**cfg)

    def token_id(self, word: str) -> int:
        """The id of a word the tokenizer keeps as one token (e.g. a placeholder such as ``"$"``)."""
        if word not in self._token_ids:
            ids = [int(t) for t in self.tokenizer([word])[0] if int(t) != 0]
            if len(ids) != 3:  # start, the word, end
                raise ValueError(f"{word!r} is {len(ids) - 2} tokens for this tokenizer; a placeholder must be one token")
            self._token_ids[word] = ids[1]
        return self._token_ids[word]

    def vocabulary_coverage(self, texts: Sequence[str], examples: int = 5) -> Dict[str, Any]:
        """How much of ``texts`` the text tower can read. A token whose embedding row is all zero carries no
        meaning (a compactly stored checkpoint keeps only the rows of the vocabulary it was trained on, e.g.
        the demo encoders'; the others load as zeros): texts that differ only in such tokens embed alike.

        Returns ``tokens`` and ``distinct`` (token occurrences and distinct tokens of ``texts``, without
        start, end and padding), ``unembedded`` and ``unembedded_distinct`` (those whose row is zero),
        ``share`` (``unembedded / tokens``) and ``words``: up to ``examples`` frequent words holding one."""
        zero = (self.model.token_embedding.weight.detach() == 0).all(dim=1).cpu()
        special = self.tokenizer([""])[0].unique()  # start, end, padding
        counts = torch.zeros(len(zero), dtype=torch.int64)
        for i in range(0, len(texts), 4096):
            counts += torch.bincount(self.tokenizer(list(texts[i:i + 4096])).flatten(), minlength=len(zero))
        counts[special] = 0
        missing = counts * zero
        words = []
        if missing.any() and examples:  # among the 2,000 most frequent words with a letter
            frequent = [w for w, _ in Counter(w.strip(string.punctuation) for t in texts for w in t.split())
                        .most_common(2000) if any(c.isalpha() for c in w)]
            ids = self.tokenizer(frequent)
            words = [w for w, row in zip(frequent, zero[ids] & ~torch.isin(ids, special)) if row.any()]
        tokens, unembedded = int(counts.sum()), int(missing.sum())
        return {"tokens": tokens, "distinct": int((counts > 0).sum()), "unembedded": unembedded,
                "unembedded_distinct": int((missing > 0).sum()),
                "share": round(unembedded / tokens, 4) if tokens else 0.0, "words": words[:examples]}

    # --- embeddings ------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Global image embeddings (B, embed_dim) of preprocessed images."""
        return self.model.encode_image(images, normalize=normalize)

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Text embeddings (B, embed_dim) of token ids (B, L); padding may be trimmed (``trim_padding``)."""
        return text_tower(self.model, text, normalize=normalize)

    def encode_text_with_pseudo_tokens(self, text: torch.Tensor, pseudo_tokens: torch.Tensor, placeholder_id: int,
                                       normalize: bool = False) -> torch.Tensor:
        """Text embeddings with ``pseudo_tokens`` substituted for the placeholder's token embedding.

        Args:
            text: token ids (B, L); each row holds ``placeholder_id`` at least once.
            pseudo_tokens: (B, token_width), one pseudo word per row (used at every placeholder of
                that row), or (B, P, token_width) for P placeholders per row, in order.
            placeholder_id: the placeholder's token id (:meth:`token_id`).

        Gives exactly ``encode_text`` when ``pseudo_tokens`` is the placeholder's own embedding,
        and is differentiable in ``pseudo_tokens``.
        """
        where = text == placeholder_id
        counts = where.sum(dim=1)
        if pseudo_tokens.ndim == 2:
            pseudo_tokens = pseudo_tokens.unsqueeze(1)
            wrong = counts == 0
        else:
            wrong = counts != pseudo_tokens.shape[1]
        if bool(wrong.any()):
            rows = wrong.nonzero().flatten().tolist()[:5]
            raise ValueError(f"texts {rows} do not hold the placeholder token {placeholder_id} "
                             f"{'at least once' if pseudo_tokens.shape[1] == 1 else f'{pseudo_tokens.shape[1]} times'}")
        if pseudo_tokens.shape[0] != text.shape[0] or pseudo_tokens.shape[-1] != self.token_width:
            raise ValueError(f"pseudo_tokens {tuple(pseudo_tokens.shape)} do not fit texts {tuple(text.shape)} and "
                             f"token width {self.token_width}")
        embeddings = self.model.token_embedding(text)
        # the k-th placeholder of each row takes that row's k-th pseudo token
        order = where.long().cumsum(dim=1) - 1
        chosen = pseudo_tokens.to(embeddings.dtype).gather(
            1, order.clamp(min=0, max=pseudo_tokens.shape[1] - 1).unsqueeze(-1).expand(-1, -1, embeddings.shape[-1]))
        embeddings = torch.where(where.unsqueeze(-1), chosen, embeddings)
        return text_tower(self.model, text, token_embeddings=embeddings, normalize=normalize)

    def encode_image_regions(self, images: torch.Tensor, normalize: bool = False) -> E2VisionOutput:
        """E2's global and per-entity image embeddings and the selected patches (E2 only)."""
        if not self.has_regions:
            raise ValueError(f"{self.name} is a CLIP: it has no regional embeddings (only E2 encoders do)")
        return self.model.encode_image_regions(images, normalize=normalize)

    # --- identity --------------------------------------------------------------------------------
    def clip_config(self) -> dict:
        """The open_clip config that rebuilds the CLIP (of an E2: the CLIP it extends)."""
        return getattr(self.model, "clip_config", None) or clip_config_of(self.model, self.arch)

    def fingerprint(self) -> str:
        """A digest of the weights: equal digests, equal encoders (caches are keyed on it). Computed again
        only when a tensor was replaced or changed in place (its storage or version counter moved)."""
        state = self.model.state_dict()
        stamp = tuple((t.data_ptr(), t._version) for t in state.values())
        if self._digest[0] != stamp:
            digest = hashlib.blake2b(digest_size=12)
            digest.update(self.kind.encode())
            for name, tensor in state.items():
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            self._digest = (stamp, digest.hexdigest())
        return self._digest[1]

    def save_pretrained(self, path) -> Any:
        """Write a checkpoint directory that :func:`e2_core.load_encoder` reads back exactly."""
        from .checkpoint import save_pretrained

        return save_pretrained(self.model, path, arch=self.arch)

    @property
    def label(self) -> str:
        """A short name for result tables: the one given (e.g. by an encoder scheme), else kind and source."""
        return self.__dict__.get("_label") or f"{self.kind} ({self.name})"

    @label.setter
    def label(self, value: str) -> None:
        self.__dict__["_label"] = value

    def extra_repr(self) -> str:
        return f"name={self.name!r}, kind={self.kind}, arch={self.arch!r}, embed_dim={self.embed_dim}"


def as_encoder(obj: Any, name: Optional[str] = None) -> Any:
    """An :class:`Encoder` for an open_clip ``CLIP``/``E2Model``; any other object is returned as it
    is when it has the whole :data:`CONTRACT`, and refused naming what it lacks."""
    if isinstance(obj, Encoder):
        return obj
    if isinstance(obj, CLIP):
        return Encoder(obj, name=name)
    missing = [attr for attr in CONTRACT if not hasattr(obj, attr)]
    if missing:
        raise TypeError(f"{type(obj).__name__} is not an encoder: it lacks {', '.join(missing)} "
                        "(see e2_core.encoder.CONTRACT)")
    return obj
