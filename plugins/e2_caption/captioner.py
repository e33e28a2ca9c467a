"""What every zero-shot captioner of this task is: a :class:`~e2_caption.decoder.PrefixLM` trained on
embeddings of one encoder, used from Python as ``captioner(images) -> captions`` (CIReVL's captioner
too), and saved as safetensors with the encoder it belongs to. A captioner is built from a preset
(``preset=``): ``demo``, small enough to train on a CPU in minutes, or ``paper``, the original's decoder,
optimiser and decoding (:class:`Preset`)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from tqdm import tqdm

from e2_core.checkpoint import save_tensors
from e2_core.embedding import embed_images

from .decoder import DecoderConfig, PrefixLM
from .vocab import _END, _START, BPEVocab, HFVocab, vocab_from_state


#: the batch a decoder trains on (:meth:`Captioner.fit`)
TRAIN_BATCH = 64
#: the presets a captioner is built from
PRESETS = ("demo", "paper")


def epochs_for(epochs: int, captions: int, min_steps: int, batch_size: int = TRAIN_BATCH) -> int:
    """``epochs``, or more where ``captions`` are too few for ``min_steps`` optimizer steps at ``batch_size``."""
    per_epoch = max(1, -(-captions // batch_size))
    return max(epochs, -(-min_steps // per_epoch))


@dataclass
class Training:
    """How :meth:`Captioner.fit` trains a decoder: AdamW, a warm-up, then a constant or linearly decaying rate.
    The defaults are the demo's; :meth:`paper` gives the originals'."""

    epochs: int = 3
    batch_size: int = TRAIN_BATCH
    lr: float = 2e-4
    warmup: int = 0  # optimizer steps of linear warm-up from 0
    schedule: str = "constant"  # after the warm-up: "constant", or "linear" down to 0 at the last step
    weight_decay: float = 0.01  # AdamW's decoupled weight decay
    eps: float = 1e-8  # AdamW's epsilon
    label_smoothing: float = 0.1

    def __post_init__(self):
        if self.schedule not in ("constant", "linear"):
            raise ValueError(f"schedule {self.schedule!r}: constant or linear")

    @classmethod
    def paper(cls, method: str) -> "Training":
        """The original's training. Both use transformers' AdamW (eps 1e-6, no weight decay; here torch's, whose
        epsilon is added after the bias correction instead of before) and its linear warm-up and decay. DeCap's
        code: lr 1e-5, 1,000 warm-up steps, 10 epochs, 64 captions on each of 2 GPUs, label smoothing 0.1.
        CapDec's: lr 2e-5, 5,000 warm-up steps, 10 epochs, batch 34, no smoothing."""
        if method == "decap":
            return cls(epochs=10, batch_size=128, lr=1e-5, warmup=1000, schedule="linear", weight_decay=0.0,
                       eps=1e-6, label_smoothing=0.1)
        if method in ("capdec", "clipcap"):
            return cls(epochs=10, batch_size=34, lr=2e-5, warmup=5000, schedule="linear", weight_decay=0.0,
                       eps=1e-6, label_smoothing=0.0)
        raise ValueError(f"no paper training for {method!r}: decap, capdec or clipcap")


@dataclass
class Preset:
    """What a captioner is built with unless told otherwise: its decoder, its training, its decoding."""

    config: DecoderConfig
    training: Training = field(default_factory=Training)
    beams: int = 1  # beam width (1: greedy)
    max_tokens: int = 64  # tokens generated at most (the demo decoders' positions hold 64 after the prefix)


class CaptionerMismatch(ValueError):
    """A saved decoder that belongs to another method or another encoder."""


class Captioner:
    """Base of DeCap and CapDec. Subclasses set ``name`` and what they train on (``pairs``), turn training
    captions into the decoder's input embeddings (:meth:`training_inputs`) and test images into them
    (:meth:`image_inputs`), and may define their presets (:meth:`preset`). A new captioner is one module and
    one line in the ``e2_plugins.caption_methods`` entry-point group.

    ``config``, ``training``, ``beams`` and ``max_tokens`` override the preset's; ``language_model`` (a local
    GPT-2-style folder) replaces the decoder built from scratch."""

    name = ""
    pairs = False  # trained on image-caption pairs (not zero-shot: not run unless asked for); else on text alone

    def __init__(self, encoder, config: Optional[DecoderConfig] = None, beams: Optional[int] = None,
                 max_tokens: Optional[int] = None, training: Optional[Training] = None, preset: str = "demo",
                 language_model: Optional[str] = None, **options):
        if preset not in PRESETS:
            raise ValueError(f"preset {preset!r}: one of {', '.join(PRESETS)}")
        made = self.preset(preset)
        self.encoder, self.preset_name = encoder, preset
        self.config = config or made.config
        if language_model:
            self.config = replace(self.config, language_model=language_model)
        self.training = training or made.training
        self.beams = made.beams if beams is None else beams
        self.max_tokens = made.max_tokens if max_tokens is None else max_tokens
        self.options = options
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

    @classmethod
    def preset(cls, name: str) -> Preset:
        """The settings of preset ``name`` (here: the demo's decoder; a method adds its ``paper`` one)."""
        if name != "demo":
            raise ValueError(f"{cls.name or cls.__name__} has no {name!r} preset")
        return Preset(DecoderConfig())

    # --- shared ---------------------------------------------------------------------------------------
    def fit(self, captions: Sequence[str], text_features: torch.Tensor, image_features: Optional[torch.Tensor] = None,
            epochs: Optional[int] = None, batch_size: Optional[int] = None, lr: Optional[float] = None,
            label_smoothing: Optional[float] = None, seed: int = 0, progress: bool = True) -> List[float]:
        """Train the decoder to write ``captions`` from the method's inputs; returns the loss per epoch. The
        arguments given override :attr:`training`."""
        given = dict(epochs=epochs, batch_size=batch_size, lr=lr, label_smoothing=label_smoothing)
        run = replace(self.training, **{k: v for k, v in given.items() if v is not None})
        torch.manual_seed(seed)
        self.build(captions, text_features).train()
        optimizer = torch.optim.AdamW(self.decoder.parameters(), lr=run.lr, eps=run.eps, weight_decay=run.weight_decay)
        scheduler = _schedule(optimizer, run, run.epochs * -(-len(captions) // run.batch_size))
        tokens, mask = self.vocab.encode(captions, self.config.max_tokens or caption_length_limit(self.vocab, captions))
        generator = torch.Generator().manual_seed(seed)
        history = []
        for _ in tqdm(range(run.epochs), desc=f"{self.name} decoder", disable=not progress, dynamic_ncols=True):
            total = 0.0
            for rows in torch.randperm(len(captions), generator=generator).split(run.batch_size):
                inputs = self.training_inputs(text_features[rows],
                                              image_features[rows] if image_features is not None else None)
                loss = self.decoder.loss(inputs, tokens[rows], mask[rows], run.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total += loss.item() * len(rows)
            history.append(total / len(captions))
        self.decoder.eval()
        return history

    def build(self, captions: Sequence[str], text_features: torch.Tensor) -> PrefixLM:
        """The untrained decoder for ``captions`` (its vocabulary, random weights) and what the method keeps
        from them (:meth:`prepare`)."""
        self.vocab = self._vocabulary(captions)
        self.config.vocab_size, self.config.eos_id = self.vocab.size, self.vocab.eos
        self.config.bos_id = self.vocab.index[_START] if self.config.start_token and self.vocab.kind == "bpe" else -1
        self.prepare(captions, text_features)
        self.decoder = PrefixLM(self.encoder.embed_dim, self.config)
        return self.decoder

    def _vocabulary(self, captions: Sequence[str]):
        if self.config.language_model:
            return HFVocab(self.config.language_model)
        tokenizer = self.encoder.tokenizer
        if self.config.full_vocab:
            size = getattr(tokenizer, "vocab_size", _END + 1)
            return BPEVocab(tokenizer, [_END] + [i for i in range(size) if i != _END])
        vocab = BPEVocab.from_captions(tokenizer, captions)
        return BPEVocab(tokenizer, vocab.ids + [_START]) if self.config.start_token else vocab

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
                "options": json.dumps(self.options), "preset": self.preset_name, "encoder": self.encoder.name,
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
        self.config = DecoderConfig.from_dict(json.loads(meta["config"]))
        self.preset_name = meta.get("preset", self.preset_name)
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


def caption_length_limit(vocab, captions: Sequence[str]) -> int:
    """Tokens kept of each training caption when ``max_tokens`` is 0 (CapDec's rule): the mean length plus 10
    standard deviations, at most the longest."""
    _, mask = vocab.encode(captions, 1 << 30)
    lengths = (mask.sum(dim=1) - 1).float()  # without the end token
    spread = lengths.std().item() if len(lengths) > 1 else 0.0
    return max(1, min(int(lengths.mean().item() + spread * 10), int(lengths.max().item())))


def _schedule(optimizer, training: Training, steps: int):
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

    if training.schedule == "linear":
        return get_linear_schedule_with_warmup(optimizer, training.warmup, steps)
    return get_constant_schedule_with_warmup(optimizer, training.warmup)
