"""What every zero-shot captioner of this task is: a :class:`~e2_caption.decoder.PrefixLM` trained on
embeddings of one encoder, used from Python as ``captioner(images) -> captions`` (CIReVL's captioner
too), and saved as safetensors with the encoder it belongs to."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from tqdm import tqdm

from e2_core.checkpoint import save_tensors
from e2_core.embedding import embed_images

from .decoder import DecoderConfig, PrefixLM
from .vocab import BPEVocab, HFVocab, vocab_from_state


#: the batch a decoder trains on (:meth:`Captioner.fit`)
TRAIN_BATCH = 64


def epochs_for(epochs: int, captions: int, min_steps: int, batch_size: int = TRAIN_BATCH) -> int:
    """``epochs``, or more where ``captions`` are too few for ``min_steps`` optimizer steps at ``batch_size``."""
    per_epoch = max(1, -(-captions // batch_size))
    return max(epochs, -(-min_steps // per_epoch))


class CaptionerMismatch(ValueError):
    """A saved decoder that belongs to another method or another encoder."""


class Captioner:
    """Base of DeCap and CapDec. Subclasses set ``name`` and what they train on (``pairs``), turn training
    captions into the decoder's input embeddings (:meth:`training_inputs`) and test images into them
    (:meth:`image_inputs`). A new captioner is one module and one line in the ``e2_plugins.caption_methods``
    entry-point group."""

    name = ""
    pairs = False  # trained on image-caption pairs (not zero-shot: not run unless asked for); else on text alone

    def __init__(self, encoder, config: Optional[DecoderConfig] = None, beams: int = 1, max_tokens: int = 30,
                 **options):
        self.encoder = encoder
        self.config = config or DecoderConfig()
        self.beams, self.max_tokens, self.options = beams, max_tokens, options
        self.vocab = None  # BPEVocab or HFVocab: captions <-> the decoder's ids
        self.decoder: Optional[PrefixLM] = None
        self.trained_on: Optional[Dict] = None  # what the decoder learnt from (dataset, captions' digest, epochs)

    # --- what a method defines ------------------------------------------------------------------------
    def training_inputs(self, text_features: torch.Tensor, image_features: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def image_inputs(self, image_features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, captions: Sequence[str], text_features: torch.Tensor) -> None:
        """What the method keeps from the training captions besides the decoder (DeCap: its memory)."""

    # --- shared ---------------------------------------------------------------------------------------
    def fit(self, captions: Sequence[str], text_features: torch.Tensor, image_features: Optional[torch.Tensor] = None,
            epochs: int = 10, batch_size: int = TRAIN_BATCH, lr: float = 2e-4, label_smoothing: float = 0.1, seed: int = 0,
            progress: bool = True) -> List[float]:
        """Train the decoder to write ``captions`` from the method's inputs; returns the loss per epoch."""
        torch.manual_seed(seed)
        self.vocab = HFVocab(self.config.language_model) if self.config.language_model else \
            BPEVocab.from_captions(self.encoder.tokenizer, captions)
        self.config.vocab_size, self.config.eos_id = self.vocab.size, self.vocab.eos
        self.prepare(captions, text_features)
        self.decoder = PrefixLM(self.encoder.embed_dim, self.config).train()
        optimizer = torch.optim.AdamW(self.decoder.parameters(), lr=lr, weight_decay=0.01)
        tokens, mask = self.vocab.encode(captions, self.config.max_tokens)
        generator = torch.Generator().manual_seed(seed)
        history = []
        for _ in tqdm(range(epochs), desc=f"{self.name} decoder", disable=not progress, dynamic_ncols=True):
            total = 0.0
            for rows in torch.randperm(len(captions), generator=generator).split(batch_size):
                inputs = self.training_inputs(text_features[rows],
                                              image_features[rows] if image_features is not None else None)
                loss = self.decoder.loss(inputs, tokens[rows], mask[rows], label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(rows)
            history.append(total / len(captions))
        self.decoder.eval()
        return history

    @torch.no_grad()
    def caption_features(self, image_features: torch.Tensor) -> List[str]:
        """Captions of L2-normalised image embeddings."""
        if self.decoder is None:
            raise ValueError(f"{self.name}: the decoder is not trained; fit() or load() it first")
        ids = self.decoder.generate(self.image_inputs(F.normalize(image_features.float(), dim=-1)), self.beams,
                                    self.max_tokens)
        return [self.decode(row) for row in ids]

    def decode(self, ids: Sequence[int]) -> str:
        return self.vocab.decode(ids)

    def __call__(self, images) -> List[str]:
        """PIL images (or image files) -> captions (the encoder embeds them)."""
        images = list(images)
        features = embed_images(self.encoder, images, batch_size=max(1, len(images)), strict=True).features
        return self.caption_features(features.to(self.encoder.device))

    # --- on disk --------------------------------------------------------------------------------------
    def extra_tensors(self) -> Dict[str, torch.Tensor]:
        return {}

    def load_extra(self, tensors: Dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`extra_tensors` saved."""

    def save(self, path: Path, trained_on: Optional[Dict] = None) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = self.decoder.state_dict()
        if state["lm.lm_head.weight"].data_ptr() == state["lm.transformer.wte.weight"].data_ptr():
            del state["lm.lm_head.weight"]  # tied to the token embedding: stored once
        tensors = {f"decoder.{k}": v.detach().cpu().contiguous() for k, v in state.items()}
        tensors.update({f"extra.{k}": v.detach().cpu().contiguous() for k, v in self.extra_tensors().items()})
        meta = {"method": self.name, "config": json.dumps(self.config.to_dict()), "vocab": json.dumps(self.vocab.state()),
                "options": json.dumps(self.options), "encoder": self.encoder.name,
                "encoder_fingerprint": self.encoder.fingerprint(), "trained_on": json.dumps(trained_on or {})}
        self.trained_on = trained_on
        return save_tensors(tensors, path, meta)

    def load(self, path: Path) -> "Captioner":
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("method") != self.name:
            raise CaptionerMismatch(f"{path} holds a {meta.get('method', 'unknown')} decoder, not a {self.name} one")
        if meta.get("encoder_fingerprint") != self.encoder.fingerprint():
            raise CaptionerMismatch(
                f"{path} was trained for the encoder {meta.get('encoder', '?')} (weights "
                f"{meta.get('encoder_fingerprint', '?')[:12]}), not for {self.encoder.name} (weights "
                f"{self.encoder.fingerprint()[:12]}): a decoder reads one embedding space. Train one for this "
                "encoder (remove the file, or use another folder, decoders=...)")
        self.config = DecoderConfig(**json.loads(meta["config"]))
        self.trained_on = json.loads(meta.get("trained_on", "{}")) or None
        self.vocab = vocab_from_state(json.loads(meta["vocab"]), self.encoder.tokenizer)
        self.decoder = PrefixLM(self.encoder.embed_dim, self.config)
        missing, unexpected = self.decoder.load_state_dict(
            {k[8:]: v for k, v in tensors.items() if k.startswith("decoder.")}, strict=False)
        if unexpected or set(missing) - {"lm.lm_head.weight"}:
            raise CaptionerMismatch(f"{path} does not fit a {self.name} decoder: missing {missing[:3]}, "
                                    f"unexpected {unexpected[:3]}")
        self.decoder.lm.tie_weights()
        self.decoder.eval()
        self.load_extra({k[6:]: v for k, v in tensors.items() if k.startswith("extra.")})
        return self
