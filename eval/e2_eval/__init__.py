"""E2 evaluation metrics: cross-modal Recall@K under the full and the sample-100 retrieval protocols,
exact top-k search over galleries of any size, and an optional faiss index for approximate search."""
from .retrieval import RetrievalRecall, cross_modal_retrieval, recall_at_k, sample_negatives, sampled_retrieval
from .search import FaissIndex, neighbour_recall
from .topk import topk_indices

__all__ = ["FaissIndex", "RetrievalRecall", "cross_modal_retrieval", "neighbour_recall", "recall_at_k",
           "sample_negatives", "sampled_retrieval", "topk_indices"]
