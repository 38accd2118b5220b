"""The training objective of ConText-CIR and TMCIR's stage 2: InfoNCE with the query image as an
extra negative and the partial fulfilments as hard negatives, plus lambda x the CC loss, as one
module call (`TrainingObjective`, what DDP wraps) and its step on a collated batch (`train_step`)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from cir.losses import concept_consistency_loss, contrastive_loss, reduce_maps
from cir.models.base import ComposedRetrieval, isolated_maps, span_maps


def gather(x: torch.Tensor) -> torch.Tensor:
    """All-gather with gradient (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return x
    import torch.distributed.nn.functional as dnn
    return torch.cat(dnn.all_gather(x))


@dataclass(frozen=True)
class LossConfig:
    """The training loss: contrastive, with the query image as an extra negative when
    `query_negative` and `partial_negatives` CIR-Shapes partial fulfilments per query as hard
    negatives (0: none), plus `lambda_cc` x the CC loss (slack `eps` per patch, on maps of all
    fusion layers averaged, `cc_maps` "mean", or of the last one, "last")."""

    lambda_cc: float
    eps: float
    cc_maps: str
    partial_negatives: int
    query_negative: bool

    @staticmethod
    def from_args(a: argparse.Namespace) -> "LossConfig":
        """The loss of the `parse_args` flags --lambda-cc, --eps, --cc-maps, --partial-negatives, --no-query-negative."""
        return LossConfig(a.lambda_cc, a.eps, a.cc_maps, a.partial_negatives or 0, not a.no_query_negative)


class TrainingObjective(nn.Module):
    """Both losses of a training batch as one module call: what DDP wraps (its gradient sync needs
    every parameter used inside the forward it wraps)."""

    def __init__(self, model: ComposedRetrieval, loss: LossConfig):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, images, tokens, hard_rows, phrase_rows, phrase_positions, phrase_texts, cc_targets=None):
        """images [B + B + M, 3, S, S], or their cached tower outputs [B + B + M, F]: references,
        targets, then M hard negatives (of rows hard_rows [M], ascending); tokens [B, C];
        phrase_rows [N], phrase_positions (N lists of token positions) and phrase_texts (N strings)
        for the CC loss, whose targets are `cc_targets` [N, P] when given, else the model's own
        isolated maps. Returns (total, contrastive, cc), scalars."""
        m, c, B = self.model, self.loss, tokens.shape[0]
        img = m.cached_image_tokens(images) if images.ndim == 2 else m.image_tokens(images)
        fused_q = m.fuse(img[:B], m.text_tokens(tokens))
        query = m.embed(fused_q)
        gal = m.embed(m.fuse(img, m.empty_text(img.shape[0])))  # every image as f(image, "")
        reference, target = gal[:B], gal[B:2 * B]
        hard = hard_valid = None
        if c.partial_negatives:  # K slots per row (fixed shape for the all-gather), filled where a row has negatives
            K = c.partial_negatives
            slots = hard_rows * K + torch.arange(len(hard_rows), device=gal.device) - torch.searchsorted(hard_rows, hard_rows)
            hard = gather(gal.new_zeros(B * K, gal.shape[1]).index_copy(0, slots, gal[2 * B:]))
            hard_valid = gather(torch.zeros(B * K, device=gal.device).index_fill(0, slots, 1.0)) > 0.5
        cont = contrastive_loss(gather(query), gather(target), gather(reference) if c.query_negative else None,
                                m.logit_scale, hard, hard_valid)
        cc = torch.zeros((), device=gal.device)
        if c.lambda_cc > 0 and len(phrase_texts):
            ctx = reduce_maps(span_maps(fused_q.attention, phrase_rows, phrase_positions), layers=c.cc_maps)
            if cc_targets is not None:
                iso = cc_targets
            else:
                with torch.no_grad():
                    iso = reduce_maps(isolated_maps(m, img[:B].detach(), phrase_rows, phrase_texts), layers=c.cc_maps)
            cc = concept_consistency_loss(ctx.float(), iso.float(), c.eps)
        return cont + c.lambda_cc * cc, cont, cc


def train_step(objective, batch, device, autocast) -> tuple[torch.Tensor, dict]:
    """`objective` (a TrainingObjective, maybe wrapped by DDP) on one collated batch.
    Returns (total loss, {"contrastive", "cc"})."""
    images = torch.cat([batch["reference"], batch["target"], batch["hard"]]).to(device, non_blocking=True)
    with autocast():
        loss, cont, cc = objective(images, batch["tokens"].to(device), batch["hard_rows"].to(device),
                                   batch["phrase_rows"].to(device), batch["phrase_positions"], batch["phrase_texts"],
                                   batch["cc_targets"].to(device) if "cc_targets" in batch else None)
    return loss, {"contrastive": cont.item(), "cc": cc.item()}
