"""Fashion datasets behind one reader interface (:class:`ProductDataset`), and E2's collate step."""
from .base import Batch, DataError, E2Collate, ProductDataset, Sample
from .fashiongen import FashionGen

__all__ = ["Batch", "DataError", "E2Collate", "FashionGen", "ProductDataset", "Sample"]
