"""Contrastive loss over hard negatives (InfoNCE), as a pure function.

Layout: B queries and B groups of n = 1 + k passages, group b = [positive_b, neg_b1, ..., neg_bk].
"""

import torch
import torch.nn.functional as F


def contrastive_loss(
    q: torch.Tensor,
    p: torch.Tensor,
    temperature: float = 0.02,
    in_batch_negatives: bool = False,
    doc_ids: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of each query over its own positive and k hard negatives.

    q: (B, D) and p: (B * n, D), both L2-normalised, so q @ p = cosine; logits = cos / temperature,
    target = the query's positive. With `in_batch_negatives`, every passage of the micro-batch is a
    candidate, except other groups' copies of the query's own positive (same `doc_ids` entry),
    which are masked out. reduction: "mean" or "sum" over queries.
    """
    B, D = q.shape
    if p.shape[0] % B:
        raise ValueError(f"{p.shape[0]} passages for {B} queries: expected B * (1 + k)")
    n = p.shape[0] // B
    if not in_batch_negatives:
        logits = torch.einsum("bd,bnd->bn", q, p.view(B, n, D)) / temperature  # (B, n)
        target = torch.zeros(B, dtype=torch.long, device=q.device)
    else:
        logits = (q @ p.T) / temperature  # (B, B * n)
        target = torch.arange(B, device=q.device) * n
        if doc_ids is not None:
            own_positive = doc_ids[target]  # (B,)
            same_doc = doc_ids.unsqueeze(0) == own_positive.unsqueeze(1)  # (B, B * n)
            same_doc[torch.arange(B), target] = False  # keep the positive itself
            logits = logits.masked_fill(same_doc, float("-inf"))
    return F.cross_entropy(logits, target, reduction=reduction)
