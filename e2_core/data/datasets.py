"""The one door to every dataset, :func:`open_dataset`: tasks and the trainer open what the
``e2_plugins.datasets`` entry-point group holds (the built-in readers, in ``e2_data``, register there
as a third party's would), by name.

Opening a reader only reads; ``prepare=True`` first runs the reader's explicit step that makes its
data where it is missing (the synthetic products are generated so), or ``e2-plugins data ...`` does.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, List, Optional

from ..registry import DATASET_GROUP, PluginLoadError, discover, get_dataset

log = logging.getLogger(__name__)
#: what a reader gives -> how messages call its datasets
KINDS = {"products": "product", "triplets": "composed-retrieval"}


def open_dataset(name: str, root: Optional[str], split: str, kind: str = "products", prepare: bool = False,
                 **options) -> Any:
    """The installed reader ``name`` on ``root`` (a folder or file).

    ``kind`` is what the caller reads: ``products`` (a :class:`~e2_core.data.ProductDataset`, ``split``
    ``train`` or ``validation``) or ``triplets`` (composed retrieval: a
    :class:`~e2_core.data.fashioniq.FashionIQ`, ``split`` ``train``, ``val`` or ``test``, one ``category``).
    ``prepare`` first makes the reader's data where it is missing (when the reader can). ``options`` go
    to the reader (``train``, ``transform``, ``seed``, ``strict``, ``category``, ...). An unknown name, or
    one of another kind, lists the installed readers of this kind.

    Example:
        >>> data = open_dataset("fashiongen", "data/fashiongen", "validation", transform=preprocess)  # doctest: +SKIP
    """
    installed = f"installed {KINDS.get(kind, kind)} datasets: {', '.join(list_datasets(kind)) or 'none'}"
    try:
        reader = get_dataset(name)
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; {installed}") from None
    if reader.kind != kind:
        raise ValueError(f"dataset {name!r} holds {reader.kind}, not {kind}; {installed}")
    if prepare and reader.prepare is not None:
        message = reader.prepare(root)
        if message:
            log.info(message)
    return reader.open(root, split, **options)


def list_datasets(kind: Optional[str] = None) -> List[str]:
    """The installed datasets' names (of one ``kind``, ``products`` or ``triplets``, when given)."""
    names = []
    for plugin in discover(DATASET_GROUP):
        try:
            if kind is None or plugin.load().kind == kind:
                names.append(plugin.name)
        except PluginLoadError:
            continue
    return names


def default_synthetic_root(size: str = "small", seed: int = 0) -> Path:
    cache = Path(os.environ.get("E2_PLUGINS_CACHE", Path.home() / ".cache" / "e2-plugins"))
    return cache / f"synthetic-{size}-seed{seed}"


