"""Fashion datasets behind one reader interface (:class:`ProductDataset`), opened by name through the
``e2_plugins.datasets`` registry (:func:`open_dataset`), and E2's collate step. Builders that make
or download data live apart, in ``e2_core.data.builders``."""
from .base import Batch, DataError, E2Collate, ProductDataset, Sample
from .datasets import default_synthetic_root, list_datasets, open_dataset
from .fashiongen import FashionGen

__all__ = ["Batch", "DataError", "E2Collate", "FashionGen", "ProductDataset", "Sample", "default_synthetic_root",
           "list_datasets", "open_dataset"]
