"""The recipe of the demo encoders (``demo:clip-ft`` and ``demo:e2``, shipped and loaded by
``e2_core.demo``): ``python -m e2_train.demo`` trains them with this package's trainer on synthetic
products and says whether the result is identical to the shipped files.

Recipe (``DEMO``): a small CLIP (``ViT-S-16-128``) is first pre-trained from scratch on synthetic
products disjoint from the task data; CLIP-FT and E2 are then fine-tuned from it on the same
data with the same seed, E2's stage 1 (its new parts only) running on top of CLIP-FT's steps as in
the paper. The shipped copies are stored compactly: half precision, and of the token embedding only
the rows of the synthetic generator's vocabulary (the only rows training moves; the others load as
zeros, so words the generator never writes carry no meaning for these encoders).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Optional

import torch

from e2_core.checkpoint import CONFIG_NAME, FORMAT, WEIGHTS_NAME, compact_state_dict, load_checkpoint, save_tensors
from e2_core.data import default_synthetic_root
from e2_core.demo import KINDS, SHIPPED_SHA256, sha256
from e2_core.texts import build_texts
from e2_data.synthetic import SIZES, brand_names, catalog, tags_of, write_fashiongen

from .config import Stage, TrainConfig
from .loop import train

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Recipe:
    model: str = "ViT-S-16-128"
    pretrain_products: int = 8000
    pretrain_steps: int = 400
    finetune_steps: int = 1800
    stage1_fraction: float = 0.3  # E2's stage 1 (new parts only): this share of the fine-tuning steps, run
    stage1_on_top: bool = True      # on top of the steps CLIP-FT gets, as in the paper (False: within them)
    batch_size: int = 64
    pretrain_lr: float = 1e-3
    finetune_lr: float = 1e-4
    stage2_new_lr: Optional[float] = 1e-3  # E2's added parts in stage 2 (stage 1's rate); None: finetune_lr
    gumbel_noise_end: float = 0.0  # E2's training picks end on evaluation's argmax (1: sampled throughout)
    seed: int = 0


DEMO = Recipe()

def cache_root() -> Path:
    return Path(os.environ.get("E2_PLUGINS_CACHE", Path.home() / ".cache" / "e2-plugins"))


def pretrain_clip(recipe: Recipe, out: Path, data_root: Path, dataset: str = "synthetic", **overrides) -> Path:
    """A small CLIP trained from scratch on products that the fine-tuning data does not hold: synthetic ones
    (generated at ``data_root`` when missing), or ``dataset``'s at ``data_root``."""
    if dataset == "synthetic" and not (data_root / "fashiongen_256_256_train.h5").is_file():
        skip = sum(SIZES["small"].values())  # products after the task data's, so the sets are disjoint
        log.warning("generating %d synthetic pre-training products in %s ...", recipe.pretrain_products, data_root)
        write_fashiongen(data_root, {"train": recipe.pretrain_products, "validation": 256},
                         seed=recipe.seed, offset=skip, progress=True)
    cfg = TrainConfig(out=str(out), method="clip-ft", model=recipe.model, dataset=dataset,
                      data_root=str(data_root), stages=[Stage("finetune", lr=recipe.pretrain_lr,
                                                              steps=recipe.pretrain_steps)],
                      batch_size=recipe.batch_size, warmup_steps=50, seed=recipe.seed, **overrides)
    return Path(train(cfg)["finetune"])


def finetune(kind: str, recipe: Recipe, start: Path, out: Path, data_root: Optional[Path] = None,
             evaluate=None, callbacks=(), dataset: str = "synthetic", **overrides) -> Path:
    """CLIP-FT (``clip-ft``, or ``clip-ft-entities`` with E2's entity losses on its image embedding) or E2
    (both stages) from the pre-trained CLIP, on the synthetic ``small`` split (or ``dataset`` at ``data_root``)."""
    data_root = Path(data_root) if data_root else default_synthetic_root("small", 0)
    common = dict(out=str(out), model=recipe.model, pretrained=str(start), dataset=dataset,
                  data_root=str(data_root), batch_size=recipe.batch_size, seed=recipe.seed, warmup_steps=20,
                  **overrides)
    if kind in ("clip-ft", "clip-ft-entities"):
        cfg = TrainConfig(method=kind, stages=[Stage("finetune", lr=recipe.finetune_lr,
                                                          steps=recipe.finetune_steps)], **common)
        return Path(train(cfg, evaluate, callbacks)["finetune"])
    stage1 = round(recipe.finetune_steps * recipe.stage1_fraction)
    stage2 = recipe.finetune_steps if recipe.stage1_on_top else recipe.finetune_steps - stage1
    new_lr = recipe.finetune_lr if recipe.stage2_new_lr is None else recipe.stage2_new_lr
    cfg = TrainConfig(method="e2", stages=[Stage("stage1", lr=recipe.finetune_lr * 10, steps=stage1),
                                           Stage("stage2", lr=recipe.finetune_lr, steps=stage2, new_lr=new_lr)],
                      gumbel_noise_end=recipe.gumbel_noise_end, **common)
    return Path(train(cfg, evaluate, callbacks)["stage2"])


def demo_root(recipe: Recipe = DEMO) -> Path:
    """Where the recipe's runs are cached (the reproduce command's and the E2-vs-CLIP-FT benchmark's)."""
    return cache_root() / f"demo-{recipe.model}-{recipe.finetune_steps}steps"


def recipe_run(kind: str, recipe: Recipe, root: Path, seed: int, **overrides) -> Path:
    """One fine-tuning run of the recipe under ``root`` (shared with benchmarks/e2_vs_clipft.py):
    ``root/pretrain`` is the shared start, ``root/<kind>/seed<seed>`` the run."""
    start = pretrain_clip(recipe, root / "pretrain", root / "synthetic-pretrain", **overrides)
    return finetune(kind, replace(recipe, seed=seed), start, root / kind / f"seed{seed}",
                    default_synthetic_root("small", 0), **overrides)


def generator_vocabulary(tokenizer) -> torch.Tensor:
    """Token ids of every text the synthetic generator writes (any product's global text and entity strings)."""
    names = brand_names()
    strings = set()
    for product in catalog():
        text, entities = build_texts(tags_of(product, names))
        strings.add(text)
        strings.update(entities)
    return tokenizer(sorted(strings)).unique()


def export_compact(checkpoint: Path, out: Path, vocabulary: torch.Tensor, start: Optional[Path] = None) -> Path:
    """A shipped copy of a demo checkpoint: half precision, the token embedding's ``vocabulary`` rows only.
    With ``start`` (the checkpoint training began from), rows outside ``vocabulary`` must not have moved."""
    state = load_checkpoint(checkpoint).state_dict()
    if start is not None:
        moved = (state["token_embedding.weight"] != load_checkpoint(start).state_dict()["token_embedding.weight"]).any(1)
        moved[vocabulary] = False
        if moved.any():
            raise ValueError(f"{checkpoint}: training moved {int(moved.sum())} token embedding row(s) outside the "
                             f"generator's vocabulary (e.g. {moved.nonzero()[:5, 0].tolist()}); they would be lost")
    compact = compact_state_dict(state, {"token_embedding.weight": vocabulary})
    save_tensors(compact, out / WEIGHTS_NAME, {"format": FORMAT})
    shutil.copyfile(Path(checkpoint) / CONFIG_NAME, out / CONFIG_NAME)
    return out


def reproduce(out: Path, recipe: Recipe = DEMO, **overrides) -> Dict[str, Path]:
    """Train the demo encoders with ``recipe`` (cached and resumable under :func:`demo_root`) and write
    their shipped copies to ``out/<kind>``."""
    import open_clip

    root = demo_root(recipe)
    start = pretrain_clip(recipe, root / "pretrain", root / "synthetic-pretrain", **overrides)
    vocabulary = generator_vocabulary(open_clip.get_tokenizer(recipe.model))
    return {kind: export_compact(recipe_run(kind, recipe, root, recipe.seed, **overrides), out / kind, vocabulary,
                                 start) for kind in KINDS}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Reproduce the shipped demo encoders: train them with the demo "
                                     "recipe, write their compact copies, compare digests with the shipped ones.")
    parser.add_argument("--out", type=Path, default=None, help="default: <cache>/demo-weights")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = args.out or cache_root() / "demo-weights"
    for kind, path in reproduce(out, device=args.device, workers=args.workers).items():
        digest = sha256(path / WEIGHTS_NAME)
        same = "identical to" if digest == SHIPPED_SHA256[kind] else "differs from"
        print(f"demo:{kind}: {path} (SHA-256 {digest[:12]}..., {same} the shipped copy)")
    print(f"use them with: e2-plugins run retrieval --encoder {out / 'e2'} --baseline {out / 'clip-ft'}")


if __name__ == "__main__":
    main()
