"""The demo encoders every task uses when given none: a small CLIP-FT and a small E2, trained by
this package's trainer on synthetic products on first use and cached. They are the encoder
sources ``demo:clip-ft`` and ``demo:e2`` (entry-point group ``e2_plugins.encoders``).

Recipe (``DEMO``): a small CLIP (``ViT-S-16-128``) is first pre-trained from scratch on synthetic
products disjoint from the task data; CLIP-FT and E2 are then fine-tuned from it on the same
data with the same seed, E2's stage 1 (its new parts only) running on top of CLIP-FT's steps as in
the paper.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, Optional

from e2_core.data import default_synthetic_root
from e2_core.data.builders.synthetic import SIZES, write_fashiongen

from .config import Stage, TrainConfig
from .loop import train

KINDS = ("clip-ft", "e2")


@dataclass(frozen=True)
class Recipe:
    model: str = "ViT-S-16-128"
    pretrain_products: int = 8000
    pretrain_steps: int = 400
    finetune_steps: int = 300
    stage1_fraction: float = 0.3  # E2's stage 1 (new parts only): this share of the fine-tuning steps, run
    stage1_on_top: bool = True      # on top of the steps CLIP-FT gets, as in the paper (False: within them)
    batch_size: int = 64
    pretrain_lr: float = 1e-3
    finetune_lr: float = 1e-4
    seed: int = 0


DEMO = Recipe()


def cache_root() -> Path:
    return Path(os.environ.get("E2_PLUGINS_CACHE", Path.home() / ".cache" / "e2-plugins"))


def pretrain_clip(recipe: Recipe, out: Path, data_root: Path, **overrides) -> Path:
    """A small CLIP trained from scratch on synthetic products that the fine-tuning data does not hold."""
    if not (data_root / "fashiongen_256_256_train.h5").is_file():
        skip = sum(SIZES["small"].values())  # products after the task data's, so the sets are disjoint
        print(f"generating {recipe.pretrain_products} synthetic pre-training products in {data_root} ...", flush=True)
        write_fashiongen(data_root, {"train": recipe.pretrain_products, "validation": 256},
                         seed=recipe.seed, offset=skip, progress=True)
    cfg = TrainConfig(out=str(out), method="clip-ft", model=recipe.model, dataset="synthetic",
                      data_root=str(data_root), stages=[Stage("finetune", lr=recipe.pretrain_lr,
                                                              steps=recipe.pretrain_steps)],
                      batch_size=recipe.batch_size, warmup_steps=50, seed=recipe.seed, **overrides)
    return Path(train(cfg)["finetune"])


def finetune(kind: str, recipe: Recipe, start: Path, out: Path, data_root: Optional[Path] = None,
             evaluate=None, callbacks=(), **overrides) -> Path:
    """CLIP-FT or E2 (both stages) from the pre-trained CLIP, on the synthetic ``small`` split."""
    data_root = Path(data_root) if data_root else default_synthetic_root("small", 0)
    if not (data_root / "fashiongen_256_256_validation.h5").is_file():
        print(f"generating the synthetic products in {data_root} ...", flush=True)
        write_fashiongen(data_root, "small", progress=True)
    common = dict(out=str(out), model=recipe.model, pretrained=str(start), dataset="synthetic",
                  data_root=str(data_root), batch_size=recipe.batch_size, seed=recipe.seed, warmup_steps=20,
                  **overrides)
    if kind == "clip-ft":
        cfg = TrainConfig(method="clip-ft", stages=[Stage("finetune", lr=recipe.finetune_lr,
                                                          steps=recipe.finetune_steps)], **common)
        return Path(train(cfg, evaluate, callbacks)["finetune"])
    stage1 = round(recipe.finetune_steps * recipe.stage1_fraction)
    stage2 = recipe.finetune_steps if recipe.stage1_on_top else recipe.finetune_steps - stage1
    cfg = TrainConfig(method="e2", stages=[Stage("stage1", lr=recipe.finetune_lr * 10, steps=stage1),
                                           Stage("stage2", lr=recipe.finetune_lr, steps=stage2)], **common)
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
    return {kind: demo_encoder(kind, recipe, log) for kind in KINDS}


def demo_encoder(name: str, recipe: Recipe = DEMO, log: Callable[[str], None] = print) -> Path:
    """The demo encoders demo:e2 and demo:clip-ft: small, trained on synthetic products on first use, cached.

    Returns the checkpoint of ``name`` (``e2`` or ``clip-ft``).
    """
    if name not in KINDS:
        raise ValueError(f"unknown demo encoder {name!r}; the demo encoders are " + ", ".join(f"demo:{k}" for k in KINDS))
    root = demo_root(recipe)
    done = root / name / "seed0" / "done"
    if not done.exists():
        steps = recipe.finetune_steps + (0 if (root / "pretrain" / "finetune" / "done.json").is_file()
                                         else recipe.pretrain_steps)
        if name == "e2" and recipe.stage1_on_top:
            steps += round(recipe.finetune_steps * recipe.stage1_fraction)
        log(f"training the demo encoder demo:{name} once into {root} (cached for every later run): {steps} steps, "
            f"roughly {max(1, round(steps / 60))} min on 2 CPU cores (about 1 s a step; less on a GPU) ...")
    path = recipe_run(name, recipe, root, 0)
    done.touch()
    return path
