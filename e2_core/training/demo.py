"""The demo encoders every task uses when given none: a small CLIP-FT and a small E2, trained by
this package's trainer on synthetic products on first use and cached.

Recipe (``DEMO``): a small CLIP (``ViT-S-16-128``) is first pre-trained from scratch on synthetic
products disjoint from the task data; CLIP-FT and E2 are then fine-tuned from it on the same
data, for the same number of steps, with the same seed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, Optional

from ..data.open import default_synthetic_root
from .config import TrainConfig
from .loop import train


@dataclass(frozen=True)
class Recipe:
    model: str = "ViT-S-16-128"
    pretrain_products: int = 8000
    pretrain_steps: int = 400
    finetune_steps: int = 300
    stage1_fraction: float = 0.3  # of E2's fine-tuning steps spent on stage 1 (new parts only)
    batch_size: int = 64
    pretrain_lr: float = 1e-3
    finetune_lr: float = 1e-4
    seed: int = 0


DEMO = Recipe()


def cache_root() -> Path:
    return Path(os.environ.get("E2_PLUGINS_CACHE", Path.home() / ".cache" / "e2-plugins"))


def pretrain_clip(recipe: Recipe, out: Path, data_root: Path, **overrides) -> Path:
    """A small CLIP trained from scratch on synthetic products that the fine-tuning data does not hold."""
    from ..data.synthetic import SIZES, write_fashiongen

    if not (data_root / "fashiongen_256_256_train.h5").is_file():
        skip = sum(SIZES["small"].values())  # products after the task data's, so the sets are disjoint
        write_fashiongen(data_root, {"train": recipe.pretrain_products, "validation": 256},
                         seed=recipe.seed, offset=skip)
    cfg = TrainConfig(out=str(out), encoder="clip-ft", model=recipe.model, dataset="synthetic",
                      data_root=str(data_root), stage2_steps=recipe.pretrain_steps,
                      stage2_lr=recipe.pretrain_lr, batch_size=recipe.batch_size, warmup_steps=50,
                      seed=recipe.seed, **overrides)
    return Path(train(cfg)["finetune"])


def finetune(kind: str, recipe: Recipe, start: Path, out: Path, data_root: Optional[Path] = None,
             evaluate=None, callbacks=(), **overrides) -> Path:
    """CLIP-FT or E2 (both stages) from the pre-trained CLIP, on the synthetic ``small`` split."""
    common = dict(out=str(out), model=recipe.model, pretrained=str(start), dataset="synthetic",
                  data_root=str(data_root) if data_root else None, synthetic_size="small",
                  batch_size=recipe.batch_size, seed=recipe.seed, warmup_steps=20, **overrides)
    if kind == "clip-ft":
        cfg = TrainConfig(encoder="clip-ft", stage2_steps=recipe.finetune_steps, stage2_lr=recipe.finetune_lr,
                          **common)
        return Path(train(cfg, evaluate, callbacks)["finetune"])
    stage1 = round(recipe.finetune_steps * recipe.stage1_fraction)
    cfg = TrainConfig(encoder="e2", stage1_steps=stage1, stage2_steps=recipe.finetune_steps - stage1,
                      stage1_lr=recipe.finetune_lr * 10, stage2_lr=recipe.finetune_lr, **common)
    return Path(train(cfg, evaluate, callbacks)["stage2"])


def demo_root(recipe: Recipe = DEMO) -> Path:
    return cache_root() / f"demo-{recipe.model}"


def recipe_run(kind: str, recipe: Recipe, root: Path, seed: int, **overrides) -> Path:
    """One fine-tuning run of the recipe under ``root`` (shared with benchmarks/e2_vs_clipft.py):
    ``root/pretrain`` is the shared start, ``root/<kind>/seed<seed>`` the run."""
    start = pretrain_clip(recipe, root / "pretrain", root / "synthetic-pretrain", **overrides)
    return finetune(kind, replace(recipe, seed=seed), start, root / kind / f"seed{seed}",
                    default_synthetic_root("small", 0), **overrides)


def demo_encoders(recipe: Recipe = DEMO, log: Callable[[str], None] = print) -> Dict[str, Path]:
    """``{"clip-ft": checkpoint, "e2": checkpoint}``, trained on first use (minutes on 2 CPU cores) and cached."""
    root = demo_root(recipe)
    if not all((root / kind / "seed0" / "done").exists() for kind in ("clip-ft", "e2")):
        log(f"training the demo encoders once into {root} (cached for every later run) ...")
    result = {}
    for kind in ("clip-ft", "e2"):
        result[kind] = recipe_run(kind, recipe, root, 0)
        (root / kind / "seed0" / "done").touch()
    return result
