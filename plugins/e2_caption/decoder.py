"""The prefix language model DeCap and CapDec share: a mapper turns an embedding into ``prefix_length``
token embeddings, and a GPT-2-style decoder (transformers ``GPT2LMHeadModel``, built from a config
with random weights, or loaded from a local path) continues them into a caption. A new decoder writes
the encoder's own BPE ids (open_clip's tokenizer, kept to the ids the training captions use unless
``full_vocab``); a local language model writes its own tokenizer's ids (:mod:`e2_caption.vocab`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DecoderConfig:
    """Shape of the prefix decoder; every value is saved with the decoder and reloads exactly. The defaults
    are the demo's (small enough to train on a CPU in minutes); :meth:`paper` gives the originals'."""

    layers: int = 2  # GPT-2 blocks (DeCap's code: 4; CapDec's: GPT-2 base, 12)
    heads: int = 4  # GPT-2 attention heads (DeCap's: 4; CapDec's: 12)
    width: int = 256  # GPT-2 width (both: 768)
    positions: int = 0  # GPT-2 positions (both: 1024); 0: prefix_length + 64
    prefix_length: int = 1  # prefix tokens the decoder reads (DeCap's: 1; CapDec's: 40)
    mapper: str = "linear"  # "linear" (DeCap's one Linear layer) or "transformer" (ClipCap's mapper, CapDec's)
    mapper_layers: int = 2  # transformer mapper blocks (CapDec's: 8)
    mapper_heads: int = 8  # its attention heads (CapDec's: 8 at every width)
    mapper_qkv_bias: bool = False  # biases on its queries, keys and values (CapDec's: none)
    mapper_dropout: float = 0.0  # dropout inside its blocks (CapDec's: 0)
    clip_length: int = 0  # tokens the embedding is projected to, before the constants; 0: prefix_length (CapDec's: 40)
    max_tokens: int = 0  # caption tokens kept in training; 0: CapDec's rule (mean + 10 std of lengths, <= the longest)
    start_token: bool = False  # the prefix first predicts the start-of-text token, then the caption (DeCap's training)
    full_vocab: bool = False  # every BPE id in the decoder's vocabulary, not only the training captions' ones
    vocab_size: int = 49408  # set from the vocabulary
    eos_id: int = 0  # set from the vocabulary
    bos_id: int = -1  # set from the vocabulary when start_token (-1: none)
    language_model: Optional[str] = None  # a local GPT-2-style model folder (its own width and tokenizer)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> "DecoderConfig":
        """A saved config; values a file predates are the ones it was made with (:data:`BEFORE_FIELDS`)."""
        known = {f.name for f in fields(cls)}
        filled = {k: v(saved) for k, v in BEFORE_FIELDS.items() if k not in saved}
        return cls(**{**filled, **{k: v for k, v in saved.items() if k in known}})

    @classmethod
    def paper(cls, method: str, language_model: Optional[str] = None) -> "DecoderConfig":
        """The original's decoder: ``"decap"`` (DeCap's code: a 4-layer, 4-head, 768-wide GPT-2 from scratch
        over CLIP's BPE ids, one prefix token from one Linear layer, the start token predicted first, 20
        tokens with start and end) or ``"capdec"`` / ``"clipcap"`` (CapDec's code: GPT-2 base fine-tuned,
        from ``language_model`` when given, else of its shape from scratch; an 8-layer, 8-head transformer
        mapper from 40 projected tokens to a 40-token prefix; captions cut by its length rule)."""
        if method == "decap":
            return cls(layers=4, heads=4, width=768, positions=1024, prefix_length=1, mapper="linear",
                       max_tokens=18, start_token=True, full_vocab=True, language_model=language_model)
        if method in ("capdec", "clipcap"):
            return cls(layers=12, heads=12, width=768, positions=1024, prefix_length=40, clip_length=40,
                       mapper="transformer", mapper_layers=8, mapper_heads=8, max_tokens=0,
                       language_model=language_model)
        raise ValueError(f"no paper decoder for {method!r}: decap, capdec or clipcap")


#: what a decoder saved before a field existed was made with
BEFORE_FIELDS = {"mapper_heads": lambda saved: max(1, saved.get("width", 256) // 64),
                 "mapper_qkv_bias": lambda _: True, "mapper_dropout": lambda _: 0.1}


class PrefixLM(nn.Module):
    """``embedding (B, D) -> prefix (B, P, W) -> caption token ids``."""

    def __init__(self, embed_dim: int, config: DecoderConfig):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        self.config = config
        if config.language_model:
            self.lm = GPT2LMHeadModel.from_pretrained(config.language_model, local_files_only=True)
        else:
            positions = config.positions or config.prefix_length + 64
            self.lm = GPT2LMHeadModel(GPT2Config(vocab_size=config.vocab_size, n_positions=positions,
                                                 n_embd=config.width, n_layer=config.layers, n_head=config.heads,
                                                 bos_token_id=config.eos_id, eos_token_id=config.eos_id))
        width = self.lm.config.n_embd
        if config.mapper == "linear":
            self.mapper = nn.Linear(embed_dim, config.prefix_length * width)
        else:
            self.mapper = TransformerMapper(embed_dim, width, config.prefix_length, config.mapper_layers,
                                            clip_length=config.clip_length or config.prefix_length,
                                            heads=config.mapper_heads, qkv_bias=config.mapper_qkv_bias,
                                            dropout=config.mapper_dropout)

    def prefix(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.mapper(embedding).view(len(embedding), self.config.prefix_length, -1)

    def loss(self, embedding: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
             label_smoothing: float = 0.0) -> torch.Tensor:
        """Next-token cross-entropy of caption ``tokens`` (B, L: text then end; ``mask`` marks them) after the
        prefix (and the start token, with ``start_token``)."""
        if self.config.start_token:
            tokens = torch.cat([torch.full_like(tokens[:, :1], self.config.bos_id), tokens], dim=1)
            mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        prefix = self.prefix(embedding)
        inputs = torch.cat([prefix, self.lm.get_input_embeddings()(tokens)], dim=1)
        logits = self.lm(inputs_embeds=inputs).logits[:, prefix.shape[1] - 1:-1]
        return F.cross_entropy(logits[mask], tokens[mask], label_smoothing=label_smoothing)

    @torch.no_grad()
    def generate(self, embedding: torch.Tensor, beams: int = 1, max_tokens: int = 30) -> List[List[int]]:
        """Token ids of each embedding's caption (greedy when ``beams`` is 1, else beam search), cut at the end
        token; start tokens are dropped (DeCap's notebook removes them from the text)."""
        eos = self.config.eos_id
        max_tokens = min(max_tokens, self.lm.config.n_positions - self.config.prefix_length)
        out = self.lm.generate(inputs_embeds=self.prefix(embedding), max_new_tokens=max_tokens, num_beams=beams,
                               do_sample=False, eos_token_id=eos, pad_token_id=eos,
                               attention_mask=torch.ones(len(embedding), self.config.prefix_length, dtype=torch.long,
                                                         device=embedding.device))
        rows = [row[:row.index(eos)] if eos in row else row for row in out.tolist()]
        return [[t for t in row if t != self.config.bos_id] for row in rows]


class TransformerMapper(nn.Module):
    """ClipCap's transformer mapper (CapDec's code): the embedding projected to ``clip_length`` tokens, followed
    by ``length`` learned constants (initialised N(0, 1)), through pre-norm blocks; the constants' outputs are
    the prefix."""

    def __init__(self, embed_dim: int, width: int, length: int, layers: int, clip_length: Optional[int] = None,
                 heads: int = 8, qkv_bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.length, self.clip_length = length, clip_length or length
        self.project = nn.Linear(embed_dim, self.clip_length * width)
        self.constants = nn.Parameter(torch.randn(length, width))
        self.transformer = nn.ModuleDict({"layers": nn.ModuleList(
            MapperBlock(width, heads, qkv_bias, dropout) for _ in range(layers))})

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        x = self.project(embedding).view(len(embedding), self.clip_length, -1)
        x = torch.cat([x, self.constants.expand(len(embedding), -1, -1)], dim=1)
        for block in self.transformer["layers"]:
            x = block(x)
        return x[:, self.clip_length:].reshape(len(embedding), -1)


class MapperBlock(nn.Module):
    """One block of the mapper: ``x + attention(norm1(x))``, then ``x + linear2(relu(linear1(norm2(x))))`` with
    an MLP twice as wide (CapDec's code: mlp_ratio 2). Parameter names follow ``nn.TransformerEncoderLayer``,
    which earlier decoders of this task were built with, so their files load."""

    def __init__(self, width: int, heads: int, qkv_bias: bool = False, dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"the mapper's width {width} is not a multiple of its {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_attn = nn.Module()
        self.self_attn.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))  # queries, keys, values
        self.self_attn.in_proj_bias = nn.Parameter(torch.zeros(3 * width)) if qkv_bias else None
        self.self_attn.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.self_attn.in_proj_weight)
        self.linear1, self.linear2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        drop = self.dropout if self.training else 0.0
        x = x + F.dropout(self.attention(self.norm1(x), drop), drop, self.training)
        hidden = F.dropout(F.relu(self.linear1(self.norm2(x))), drop, self.training)
        return x + F.dropout(self.linear2(hidden), drop, self.training)

    def attention(self, x: torch.Tensor, drop: float) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = F.linear(x, self.self_attn.in_proj_weight, self.self_attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.view(b, n, self.heads, w // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        return self.self_attn.out_proj(out.transpose(1, 2).reshape(b, n, w))
