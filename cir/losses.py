"""The two training losses: contrastive with the query image as an extra negative, and the
Text Concept-Consistency (CC) loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_loss(query: torch.Tensor, target: torch.Tensor, reference: torch.Tensor | None,
                     logit_scale: torch.Tensor, hard: torch.Tensor | None = None,
                     hard_valid: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE between queries f(I_q, T) [B, E] and targets f(I_t, "") [B, E] (L2-normalised).

    Row i's positive is target i; the other targets are negatives and, when `reference` [B, E]
    = f(I_q, "") is given, its own reference image is one more negative (never a positive).
    `hard` [M, E] (e.g. partial fulfilments, `hard_valid` [M] bool marks real ones) are extra
    negatives for every row. Averaged with the target -> query direction."""
    scale = logit_scale.exp()
    logits = scale * query @ target.T  # [B, B]
    labels = torch.arange(query.shape[0], device=query.device)
    q2t_logits = logits
    if reference is not None:
        own_ref = scale * (query * reference).sum(-1, keepdim=True)  # [B, 1], a negative column
        q2t_logits = torch.cat([logits, own_ref], 1)
    if hard is not None and len(hard):
        hard_logits = scale * query @ hard.T  # [B, M]
        if hard_valid is not None:
            hard_logits = hard_logits.masked_fill(~hard_valid[None], float("-inf"))
        q2t_logits = torch.cat([q2t_logits, hard_logits], 1)
    return (F.cross_entropy(q2t_logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def concept_consistency_loss(in_context: torch.Tensor, isolated: torch.Tensor, eps: float) -> torch.Tensor:
    """CC loss: mean over phrases of sum_p ReLU(|A_ctx - A_iso| - eps).

    in_context, isolated: [N, P] maps of N phrases over P patches (already reduced over layers and
    heads). The isolated map is a fixed target (detached). Phrases with NaN maps (cut by the
    context length) are ignored; no phrase gives 0."""
    keep = ~(in_context.isnan().any(1) | isolated.isnan().any(1))
    if not keep.any():
        return in_context.new_zeros(())
    diff = (in_context[keep] - isolated[keep].detach()).abs()
    return F.relu(diff - eps).sum(1).mean()


def reduce_maps(maps: torch.Tensor, layers: str = "mean", heads: str = "mean") -> torch.Tensor:
    """[N, L, H, P] -> [N, P]: average over layers and heads ("last" takes the last layer only)."""
    maps = maps[:, -1:] if layers == "last" else maps
    return maps.mean(2).mean(1) if heads == "mean" else maps.mean(1).flatten(1, 2)
