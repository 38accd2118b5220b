"""Losses on hand-made tensors: values, the query image as a negative (never a positive), and
where the CC gradient flows."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cir.losses import concept_consistency_loss, contrastive_loss, reduce_maps
from cir.models.base import isolated_maps, span_maps
from cir.models.factory import build_model


def test_contrastive_value_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    r = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    scale = torch.tensor(math.log(10.0))  # logit scale 10
    # q->t rows with the own reference as an extra column: row 0 logits [10, 6, 0], row 1 [0, 8, 10]
    row0 = -10 + math.log(math.exp(10) + math.exp(6) + math.exp(0))
    row1 = -8 + math.log(math.exp(0) + math.exp(8) + math.exp(10))
    # t->q columns: target 0 sees [10, 0], target 1 sees [6, 8]
    col0 = -10 + math.log(math.exp(10) + math.exp(0))
    col1 = -8 + math.log(math.exp(6) + math.exp(8))
    expected = ((row0 + row1) / 2 + (col0 + col1) / 2) / 2
    assert torch.isclose(contrastive_loss(q, t, r, scale), torch.tensor(expected), atol=1e-5)
    without = ((-10 + math.log(math.exp(10) + math.exp(6)) - 8 + math.log(1 + math.exp(8))) / 2 + (col0 + col1) / 2) / 2
    assert torch.isclose(contrastive_loss(q, t, None, scale), torch.tensor(without), atol=1e-5)


def test_hard_negatives_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    hard = torch.tensor([[0.8, 0.6], [0.0, -1.0]])
    scale = torch.tensor(math.log(10.0))
    # q->t rows get both hard columns: row 0 [10, 6 | 8, 0], row 1 [0, 8 | 6, -10]; t->q unchanged
    row0 = -10 + math.log(math.exp(10) + math.exp(6) + math.exp(8) + math.exp(0))
    row1 = -8 + math.log(math.exp(0) + math.exp(8) + math.exp(6) + math.exp(-10))
    cols = (-10 + math.log(math.exp(10) + math.exp(0)) - 8 + math.log(math.exp(6) + math.exp(8))) / 2
    assert torch.isclose(contrastive_loss(q, t, None, scale, hard), torch.tensor(((row0 + row1) / 2 + cols) / 2), atol=1e-5)
    # a slot marked invalid is no negative at all: only the first hard column counts
    valid = torch.tensor([True, False])
    row0 = -10 + math.log(math.exp(10) + math.exp(6) + math.exp(8))
    row1 = -8 + math.log(math.exp(0) + math.exp(8) + math.exp(6))
    assert torch.isclose(contrastive_loss(q, t, None, scale, hard, valid), torch.tensor(((row0 + row1) / 2 + cols) / 2),
                         atol=1e-5)


def test_query_image_is_a_negative_not_a_positive():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(4, 8), dim=-1).requires_grad_()
    t = F.normalize(torch.randn(4, 8), dim=-1)
    ref = F.normalize(torch.randn(4, 8), dim=-1)
    scale = torch.tensor(math.log(10.0))
    base = contrastive_loss(q, t, None, scale)
    # moving the reference onto the query must make the loss worse (a positive would make it better)
    assert contrastive_loss(q, t, q.detach(), scale) > contrastive_loss(q, t, -q.detach(), scale) > base
    ref.requires_grad_()
    contrastive_loss(q, t, ref, scale).backward()
    # each row's loss grows as its reference moves toward its query: d loss / d ref_i is along +q_i
    assert (ref.grad * q.detach()).sum(-1).gt(0).all()


def test_cc_value_and_gradient_by_hand():
    ctx = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], requires_grad=True)
    iso = torch.tensor([[0.2, 0.3, 0.5], [0.1, 0.12, 0.78]], requires_grad=True)
    loss = concept_consistency_loss(ctx, iso, eps=0.1)
    # phrase 0: |d| = [.3, 0, .3] -> relu(|d| - .1) = [.2, 0, .2] -> .4; phrase 1: all within eps -> 0; mean .2
    assert torch.isclose(loss, torch.tensor(0.2))
    loss.backward()
    assert torch.allclose(ctx.grad, torch.tensor([[0.5, 0.0, -0.5], [0.0, 0.0, 0.0]]))
    assert iso.grad is None or torch.count_nonzero(iso.grad) == 0  # the isolated map is a fixed target


def test_cc_ignores_nan_phrases_and_reduce_maps():
    ctx = torch.tensor([[0.5, 0.5], [float("nan"), 0.0]])
    iso = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert torch.isclose(concept_consistency_loss(ctx, iso, 0.0), torch.tensor(1.0))
    assert concept_consistency_loss(ctx[1:], iso[1:], 0.0) == 0
    maps = torch.arange(2 * 3 * 2 * 4, dtype=torch.float).reshape(2, 3, 2, 4)  # [N, L, H, P]
    assert torch.allclose(reduce_maps(maps)[0], maps[0].mean((0, 1)))
    assert torch.allclose(reduce_maps(maps, layers="last")[1], maps[1, -1].mean(0))


def _cc_grads(model, eps):
    model.zero_grad()
    caption = "remove the blue star and make the red circle green"
    images = torch.randn(1, 3, 63, 63)
    img = model.image_tokens(images)
    fused = model.fuse(img, model.text_tokens(model.tokenizer([caption])))
    spans = [(7, 20), (30, 44)]
    pos = [model.tokenizer.span_to_token_positions(caption, s, e) for s, e in spans]
    rows = torch.zeros(2, dtype=torch.long)
    ctx = reduce_maps(span_maps(fused.attention, rows, pos))
    with torch.no_grad():
        iso = reduce_maps(isolated_maps(model, img, rows, [caption[s:e] for s, e in spans]))
    concept_consistency_loss(ctx, iso, eps).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return (ctx - iso).abs().max().item(), grads


def test_cc_gradient_reaches_text_and_fusion_only_beyond_eps():
    torch.manual_seed(1)
    model, _ = build_model("context-cir-tiny")
    for p in model.parameters():  # sharpen the random attention so maps differ clearly
        if p.ndim == 2:
            p.data.mul_(3)
    diff, grads = _cc_grads(model, eps=0.0)
    assert diff > 1e-3
    nonzero = lambda prefix: any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(prefix))
    assert nonzero("clip.transformer.") and nonzero("clip.token_embedding") and nonzero("fusion.blocks.0.text_to_image")
    assert not nonzero("head.") and not nonzero("pool.")  # the CC loss does not touch pooling
    _, grads = _cc_grads(model, eps=diff + 1e-3)  # every patch within the slack: no gradient anywhere
    assert all(g is None or g.abs().sum() == 0 for g in grads.values())
