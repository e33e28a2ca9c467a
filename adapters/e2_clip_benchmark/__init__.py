"""CLIP_benchmark with E2: registers the model type ``e2`` in CLIP_benchmark's model table, then runs its
command line unchanged.

    e2-clip-benchmark eval --model_type e2 --model demo:e2 --dataset mscoco_captions \\
        --dataset_root data/coco --annotation_file data/coco/captions.json --split test

With ``--model_type e2``, ``--model`` is any :func:`e2_core.load_encoder` source (a checkpoint directory,
``demo:e2``, ``ViT-B-32:openai``); ``--pretrained`` is used only when it is a checkpoint directory or a
weights file (then ``--model`` names its open_clip architecture), so CLIP_benchmark's default tag is ignored.
From Python: ``e2_clip_benchmark.register()`` before calling ``clip_benchmark``'s own functions.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from e2_core import load_encoder
from e2_core.checkpoint import is_checkpoint

MODEL_TYPE = "e2"
INSTALL = "pip install 'e2-plugins[clip-benchmark]'"


def load_e2(model_name: str, pretrained: Optional[str] = None, cache_dir: Optional[str] = None, device="cpu"):
    """CLIP_benchmark's loader signature: ``(model, transform, tokenizer)`` for an encoder source."""
    from e2_open_clip import to_open_clip

    if pretrained and is_checkpoint(pretrained):
        source = pretrained
    elif pretrained and os.path.isfile(pretrained):
        source = f"{model_name}:{pretrained}"
    else:
        source = model_name
    encoder = load_encoder(source, device=device).eval()
    return to_open_clip(encoder), encoder.preprocess, encoder.tokenizer


def register() -> None:
    """Add the ``e2`` model type to CLIP_benchmark (idempotent)."""
    try:
        from clip_benchmark import models
    except ImportError as err:
        raise ImportError(f"CLIP_benchmark is not installed: {INSTALL}") from err
    models.TYPE2FUNC[MODEL_TYPE] = load_e2
    if MODEL_TYPE not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(MODEL_TYPE)  # the list its command line offers as choices


def main(argv: Optional[List[str]] = None) -> int:
    """``clip_benchmark``'s command line with the ``e2`` model type registered. With ``--model_type e2`` and no
    ``--pretrained``, the result files record the source that was loaded (not CLIP_benchmark's default tag)."""
    register()
    from clip_benchmark import cli

    args = list(sys.argv[1:] if argv is None else argv)
    given, _ = _given(args)
    if given.model_type == MODEL_TYPE and given.model and given.pretrained is None:
        args += ["--pretrained", given.model]
    sys.argv = ["e2-clip-benchmark", *args]
    cli.main()
    return 0


def _given(args: List[str]):
    """The model options among CLIP_benchmark's arguments (the rest are its own)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for name in ("--model_type", "--model", "--pretrained"):
        parser.add_argument(name, default=None)
    return parser.parse_known_args(args)


__all__ = ["INSTALL", "MODEL_TYPE", "load_e2", "main", "register"]
