"""The demo encoders every task uses when given none: a small CLIP-FT and a small E2, trained by this
package's trainer on synthetic products (``python -m e2_train.demo`` reproduces them). They ship with the
package (``demo_weights/``), are checked against their SHA-256 when loaded, and are the encoder sources
``demo:clip-ft`` and ``demo:e2`` (entry-point group ``e2_plugins.encoders``), labelled CLIP-FT and E2 in
result tables."""
from __future__ import annotations

import hashlib
from pathlib import Path

from .checkpoint import CONFIG_NAME, WEIGHTS_NAME
from .errors import CheckpointError

SHIPPED = Path(__file__).with_name("demo_weights")
#: demo encoder -> its label in result tables
KINDS = {"clip-ft": "CLIP-FT", "e2": "E2"}
# SHA-256 of each shipped checkpoint's model.safetensors: the files the README's demo numbers come from
SHIPPED_SHA256 = {
    "clip-ft": "98e2f589e468ef958df49bd2c11978861aabb1b54166d41aad4cffcf12a946c3",
    "e2": "f3ea49de16b4b83ab2e9fc6d41b69d492f5aa35fea8978e67b416170f1e90a51",
}
REPRODUCE = "python -m e2_train.demo"


def demo_encoder(name: str):
    """The shipped demo encoder ``name`` (``e2`` or ``clip-ft``) as an :class:`~e2_core.Encoder`."""
    from .factory import load_encoder

    encoder = load_encoder(demo_checkpoint(name))
    encoder.label = KINDS[name]
    return encoder


def demo_checkpoint(name: str) -> Path:
    """The checkpoint directory of the shipped demo encoder ``name``, checked against its digest."""
    if name not in KINDS:
        raise ValueError(f"unknown demo encoder {name!r}; the demo encoders are " + ", ".join(f"demo:{k}" for k in KINDS))
    path = SHIPPED / name
    weights = path / WEIGHTS_NAME
    how = (f"reinstall e2-plugins, or reproduce the demo encoders with `{REPRODUCE}` (about 80 min on 2 CPU "
           "cores) and pass the checkpoints it prints as the encoder and the baseline")
    if not weights.is_file() or not (path / CONFIG_NAME).is_file():
        raise CheckpointError(f"the shipped demo encoder demo:{name} is missing ({path} lacks {CONFIG_NAME} or "
                              f"{WEIGHTS_NAME}): {how}")
    if sha256(weights) != SHIPPED_SHA256[name]:
        raise CheckpointError(f"the shipped demo encoder demo:{name} is corrupt ({weights} does not match its "
                              f"SHA-256 {SHIPPED_SHA256[name][:12]}...): {how}")
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
