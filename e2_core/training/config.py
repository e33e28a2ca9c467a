"""TrainConfig: every setting of a training run, as plain values (the CLI builds it from flags)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Literal, Optional


@dataclass
class TrainConfig:
    """A training run: E2's two stages (new parts only, then everything) or the CLIP-FT baseline.

    Args:
        out: run folder (checkpoints, metrics.jsonl, best model); a run already there is resumed
        encoder: e2, or clip-ft for the CLIP fine-tuning baseline trained by the same loop
        model: open_clip architecture
        pretrained: open_clip tag, CLIP checkpoint file, or checkpoint directory to start from
        dataset: synthetic, fashiongen, amazon-fashion or catalog
        data_root: dataset folder or catalog file (synthetic: where it is generated)
        synthetic_size: tiny or small (synthetic data only)
        stage1_epochs: epochs of stage 1 (E2's new parameters only)
        stage2_epochs: epochs of stage 2 (everything; the only stage of clip-ft)
        stage1_lr: peak learning rate of stage 1
        stage2_lr: peak learning rate of stage 2
        stage1_steps: optimizer steps of stage 1, instead of stage1_epochs
        stage2_steps: optimizer steps of stage 2, instead of stage2_epochs
        max_steps: cap on optimizer steps per stage (quick runs)
        batch_size: items per micro-batch per process
        accumulate: micro-batches per optimizer step
        warmup_steps: linear warm-up before the cosine decay
        weight_decay: Adam weight decay
        precision: amp (bf16 where supported, else fp16 with loss scaling) or fp32
        device: auto, cpu, cuda, cuda:1, mps (torchrun sets one GPU per process)
        seed: seed of the data order, views and Gumbel noise
        workers: DataLoader worker processes
        checkpoint_every: optimizer steps between checkpoints (also at every epoch end)
        eval_every: optimizer steps between validation runs (0: at every epoch end)
        multi_positive: items sharing an entity value are positives of each other
        global_weight: weight of the global loss against the mean regional loss
        lora_rank: LoRA rank for stage 2 (0: full fine-tuning)
        strict: stop at the first unreadable image instead of skipping and reporting it
        progress: show a progress bar
    """

    out: str = "runs/e2"
    encoder: Literal["e2", "clip-ft"] = "e2"
    model: str = "ViT-B-32"
    pretrained: Optional[str] = None
    dataset: str = "synthetic"
    data_root: Optional[str] = None
    synthetic_size: str = "small"
    stage1_epochs: float = 5.0
    stage2_epochs: float = 20.0
    stage1_lr: float = 5e-4
    stage2_lr: float = 5e-5
    stage1_steps: Optional[int] = None
    stage2_steps: Optional[int] = None
    max_steps: Optional[int] = None
    batch_size: int = 64
    accumulate: int = 1
    warmup_steps: int = 100
    weight_decay: float = 1e-4
    precision: Literal["amp", "amp_bf16", "amp_fp16", "fp32"] = "amp"
    device: str = "auto"
    seed: int = 0
    workers: int = 2
    checkpoint_every: int = 200
    eval_every: int = 0
    multi_positive: bool = False
    global_weight: float = 0.5
    lora_rank: int = 0
    strict: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.encoder not in ("e2", "clip-ft"):
            raise ValueError(f"encoder must be 'e2' or 'clip-ft', got {self.encoder!r}")
        for name in ("batch_size", "accumulate", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    # settings that must match for a run folder to be resumed
    RESUME_KEYS = ("encoder", "model", "dataset", "batch_size", "accumulate", "seed", "lora_rank")
