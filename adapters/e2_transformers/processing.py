"""The encoder's tokenizer and preprocessing as transformers' ``CLIPTokenizer``, ``CLIPImageProcessor``
and ``CLIPProcessor``, saved and loaded by transformers alone."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

# open_clip's names for the two special tokens, and transformers' names for the same ids
_SPECIAL = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}


def clip_tokenizer(encoder) -> CLIPTokenizer:
    """open_clip's tokenizer of the encoder (its bundled BPE vocabulary and merges) as a ``CLIPTokenizer``
    giving the same ids up to the end token. Padding is transformers' CLIP convention (the end token, with
    an attention mask) where open_clip pads with id 0; the text tower reads neither (causal attention,
    pooled at the first end token), so the embeddings are the same.

    Built the supported way, from ``vocab.json`` and ``merges.txt`` files read by ``from_pretrained``
    (transformers 5 ignores ``CLIPTokenizer(vocab_file=..., merges_file=...)``).
    """
    source = encoder.tokenizer
    if not hasattr(source, "bpe_ranks"):
        raise ValueError(f"{encoder.name}'s tokenizer ({type(source).__name__}) is not open_clip's BPE tokenizer; "
                         "load its own transformers tokenizer instead")
    vocab = {_SPECIAL.get(token, token): index for token, index in source.encoder.items()}
    merges = [" ".join(pair) for pair, _ in sorted(source.bpe_ranks.items(), key=lambda item: item[1])]
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        Path(folder, "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=encoder.context_length)


def clip_image_processor(encoder) -> CLIPImageProcessor:
    """The encoder's evaluation preprocessing (resize the short side, centre crop, normalise) as a
    ``CLIPImageProcessor``."""
    cfg = encoder._preprocess_cfg()
    height, width = cfg.size if isinstance(cfg.size, (tuple, list)) else (cfg.size, cfg.size)
    if cfg.resize_mode != "shortest":
        raise ValueError(f"{encoder.name} resizes with mode {cfg.resize_mode!r}; CLIPImageProcessor resizes the "
                         "shortest side only")
    return CLIPImageProcessor(size={"shortest_edge": min(height, width)}, crop_size={"height": height, "width": width},
                              image_mean=list(cfg.mean), image_std=list(cfg.std),
                              resample=3 if cfg.interpolation == "bicubic" else 2)


def clip_processor(encoder) -> CLIPProcessor:
    """Tokenizer and image processor together, as ``AutoProcessor.from_pretrained`` returns them."""
    return CLIPProcessor(image_processor=clip_image_processor(encoder), tokenizer=clip_tokenizer(encoder))


__all__ = ["clip_image_processor", "clip_processor", "clip_tokenizer"]
