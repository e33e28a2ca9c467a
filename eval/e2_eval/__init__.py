"""E2 evaluation metrics: cross-modal Recall@K under the full and the sample-100 retrieval protocols."""
from .retrieval import (RetrievalRecall, cross_modal_retrieval, recall_at_k, sample_negatives, sampled_retrieval,
                        topk_indices)

__all__ = ["RetrievalRecall", "cross_modal_retrieval", "recall_at_k", "sample_negatives", "sampled_retrieval",
           "topk_indices"]
