"""The built-in commands besides tasks: ``train`` and ``data``. Each is a plain function whose
keyword parameters the command line turns into options, like a task's."""
from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Dict, List, Literal, Optional

from e2_core.registry import TRAINING_METHOD_GROUP, Registry, Task


def train(**options) -> Dict:
    """Train E2 (new parts, then everything) or the CLIP-FT baseline, keeping the best by validation SumR."""
    from e2_eval.harness import validation_sumr
    from e2_train import TrainConfig, train as run_training

    config = TrainConfig(**options)
    return run_training(config, evaluate=validation_sumr())


def _options_of_train_config() -> None:
    from e2_train import TrainConfig

    train.__signature__ = inspect.signature(TrainConfig)
    train.__annotations__ = typing.get_type_hints(TrainConfig)
    train.__doc__ = train.__doc__ + "\n\n" + TrainConfig.__doc__.split("\n\n", 1)[1]


_options_of_train_config()


def synthetic(out: Path = Path("data/synthetic"), size: Literal["tiny", "small"] = "small", seed: int = 0,
              fashioniq_triplets: int = 100) -> Dict:
    """Generate synthetic fashion products in FashionGen's h5 layout, FashionIQ-layout triplets and caption references.

    Args:
        out: output folder
        size: tiny (tests) or small (demo)
        seed: the seed everything is drawn from
        fashioniq_triplets: composed-retrieval triplets per FashionIQ category (0: none)
    """
    from e2_data.synthetic import write_fashiongen, write_fashioniq
    from e2_core.errors import check_at_least

    check_at_least(0, fashioniq_triplets=fashioniq_triplets)
    written = {split: str(path) for split, path in write_fashiongen(out, size, seed=seed, progress=True).items()}
    if fashioniq_triplets:
        written["fashioniq"] = write_fashioniq(out / "fashioniq", fashioniq_triplets, seed=seed)
    return written


def amazon_fashion(metadata: List[Path], out: Path = Path("data/amazon-fashion"), images_dir: Optional[Path] = None,
                   download: bool = False, test_fraction: float = 0.1, seed: int = 0, workers: int = 8) -> Dict:
    """Build AmazonFashion (meta-fashion.json, split.json, images) from Amazon Reviews product-metadata dumps.

    Args:
        metadata: metadata dump files (2018 or 2023 layout; json/jsonl, gzipped or not)
        out: output folder
        images_dir: local images, one sub-folder per ASIN
        download: download the image URLs of the metadata (resumable, retried)
        test_fraction: share of products in the test split
        seed: seed of the split
        workers: concurrent downloads
    """
    from e2_data.amazon import build_amazon_fashion

    return build_amazon_fashion([str(p) for p in metadata], out, images_dir=images_dir, download=download,
                                test_fraction=test_fraction, seed=seed, workers=workers)


COMMANDS = {"train": Task("train", train, choices={"method": lambda: list(Registry(TRAINING_METHOD_GROUP))})}
DATA_BUILDERS = {"synthetic": Task("data synthetic", synthetic),
                 "amazon-fashion": Task("data amazon-fashion", amazon_fashion)}
