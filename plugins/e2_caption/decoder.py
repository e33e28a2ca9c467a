"""The prefix language model DeCap and CapDec share: a mapper turns an embedding into ``prefix_length``
token embeddings, and a GPT-2-style decoder (transformers ``GPT2LMHeadModel``, built from a config
with random weights, or loaded from a local path) continues them into a caption. A new decoder writes
the encoder's own BPE ids (open_clip's tokenizer, kept to the ids the training captions use); a local
language model writes its own tokenizer's ids (:mod:`e2_caption.vocab`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DecoderConfig:
    """Sizes of the prefix decoder (every one a config value; upstream DeCap: 4 layers, 4 heads, width 768)."""

    layers: int = 2
    heads: int = 4
    width: int = 256
    prefix_length: int = 1
    mapper: str = "linear"  # "linear" (DeCap) or "transformer" (CapDec / ClipCap)
    mapper_layers: int = 2
    max_tokens: int = 20  # captions are cut here in training
    vocab_size: int = 49408  # set from the vocabulary
    eos_id: int = 0  # set from the vocabulary
    language_model: Optional[str] = None  # a local GPT-2-style model folder (its own width and tokenizer)

    def to_dict(self) -> dict:
        return asdict(self)


class PrefixLM(nn.Module):
    """``embedding (B, D) -> prefix (B, P, W) -> caption token ids``."""

    def __init__(self, embed_dim: int, config: DecoderConfig):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        self.config = config
        if config.language_model:
            self.lm = GPT2LMHeadModel.from_pretrained(config.language_model, local_files_only=True)
        else:
            self.lm = GPT2LMHeadModel(GPT2Config(vocab_size=config.vocab_size, n_positions=config.prefix_length + 64, n_embd=config.width, n_layer=config.layers,
                                                 n_head=config.heads, bos_token_id=config.eos_id,
                                                 eos_token_id=config.eos_id))
        width = self.lm.config.n_embd
        if config.mapper == "linear":
            self.mapper = nn.Linear(embed_dim, config.prefix_length * width)
        else:
            self.mapper = TransformerMapper(embed_dim, width, config.prefix_length, config.mapper_layers)

    def prefix(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.mapper(embedding).view(len(embedding), self.config.prefix_length, -1)

    def loss(self, embedding: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
             label_smoothing: float = 0.0) -> torch.Tensor:
        """Next-token cross-entropy of caption ``tokens`` (B, L: text then end; ``mask`` marks them) after the prefix."""
        prefix = self.prefix(embedding)
        inputs = torch.cat([prefix, self.lm.get_input_embeddings()(tokens)], dim=1)
        logits = self.lm(inputs_embeds=inputs).logits[:, prefix.shape[1] - 1:-1]
        return F.cross_entropy(logits[mask], tokens[mask], label_smoothing=label_smoothing)

    @torch.no_grad()
    def generate(self, embedding: torch.Tensor, beams: int = 1, max_tokens: int = 30) -> List[List[int]]:
        """Token ids of each embedding's caption (greedy when ``beams`` is 1, else beam search), cut at the end token."""
        eos = self.config.eos_id
        max_tokens = min(max_tokens, self.lm.config.n_positions - self.config.prefix_length)
        out = self.lm.generate(inputs_embeds=self.prefix(embedding), max_new_tokens=max_tokens, num_beams=beams,
                               do_sample=False, eos_token_id=eos, pad_token_id=eos,
                               attention_mask=torch.ones(len(embedding), self.config.prefix_length, dtype=torch.long,
                                                         device=embedding.device))
        return [row[:row.index(eos)] if eos in row else row for row in out.tolist()]


class TransformerMapper(nn.Module):
    """ClipCap's transformer mapper: the embedding projected to ``length`` tokens plus learned
    constants, refined by a small transformer encoder."""

    def __init__(self, embed_dim: int, width: int, length: int, layers: int):
        super().__init__()
        self.length = length
        self.project = nn.Linear(embed_dim, length * width)
        self.constants = nn.Parameter(torch.randn(length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, nhead=max(1, width // 64), dim_feedforward=2 * width,
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        x = self.project(embedding).view(len(embedding), self.length, -1)
        x = torch.cat([x, self.constants.expand(len(embedding), -1, -1)], dim=1)
        return self.transformer(x)[:, self.length:].reshape(len(embedding), -1)
