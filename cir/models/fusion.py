"""Cross-attention fusion of text tokens and image patches, and Set Transformer pooling (PMA).

Each fusion block runs two pre-LayerNorm residual cross-attentions:
  1. text -> image: every text token attends over the image patches. Its weights are the
     concept maps (a distribution over patches per token) that the CC loss constrains and the
     app draws; they are returned for every layer and head.
  2. image -> text (unless the config turns it off): the image tokens (CLS + patches) attend over
     the grounded text tokens (padding masked), so a patch can rewrite itself ("remove the blue
     star", "make it red"). Without it the text reaches the embedding only through pooling over
     the grounded text tokens (`pool_text`), so it must gather from the right patches. The output
     projections and second feed-forward layers start at zero: every block is the identity at
     step 0 (as in the official code).

With an attention prior (config `attention_prior` = g > 0), each block's text -> image logits
are q.k / sqrt(d) + g_h * cos(t, p), where cos(t, p) is the towers' own similarity of text token t
and patch p in their joint space (text projection of the token's final state; visual projection
of the patch) and g_h a learned gain per head starting at g. The query projection starts at zero,
so at step 0 every map is the towers' softmax map: the fusion starts from where the densely
pretrained towers already point and learns from there.

The concept maps (what the CC loss compares and the app draws) are by default the text -> image
weights. With `maps="image_to_text"` they come from the image -> text half instead, as in the
official code: for every text token, how much each patch attends to it, renormalised over the
patches into a distribution like the default's. That is the attention that decides which patches
a phrase rewrites, so constraining it cannot be satisfied by maps the embedding ignores.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    """Multi-head attention of `x` [B, Q, D] over `ctx` [B, K, D]; can return its weights [B, H, Q, K]."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x, ctx, key_padding_mask=None, need_weights: bool = False, bias=None):
        """key_padding_mask: [B, K] bool, True = ignore; bias: [B, H, Q, K] added to the attention logits,
        or None. Returns (out [B, Q, D], weights or None)."""
        B, Q, D = x.shape
        h = self.heads
        q = self.q(x).view(B, Q, h, D // h).transpose(1, 2)
        k, v = self.kv(ctx).view(B, ctx.shape[1], 2, h, D // h).permute(2, 0, 3, 1, 4)
        mask = None
        if key_padding_mask is not None:
            mask = torch.zeros(key_padding_mask.shape, dtype=q.dtype, device=q.device)
            mask = mask.masked_fill(key_padding_mask, float("-inf"))[:, None, None, :]
        if bias is not None:
            mask = bias.to(q.dtype) if mask is None else mask + bias.to(q.dtype)
        if need_weights:
            logits = (q @ k.transpose(-1, -2)) * (D // h) ** -0.5
            if mask is not None:
                logits = logits + mask
            weights = logits.softmax(-1)
            out = weights @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(out.transpose(1, 2).reshape(B, Q, D)), weights


def mlp(width: int, ratio: float) -> nn.Sequential:
    hidden = int(width * ratio)
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))


MAP_SOURCES = ("text_to_image", "image_to_text")


def patch_distribution(weights: torch.Tensor, n_prefix: int) -> torch.Tensor:
    """Image -> text weights [B, H, n_prefix + P, T] -> per text token a distribution over the
    patches [B, H, T, P] (prefix tokens dropped; a token no patch attends to, e.g. padding, gets 0)."""
    cols = weights[:, :, n_prefix:].transpose(-1, -2)
    return cols / cols.sum(-1, keepdim=True).clamp_min(torch.finfo(cols.dtype).tiny)


class FusionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, image_to_text: bool = True,
                 maps: str = "text_to_image", prior_gain: float = 0.0):
        super().__init__()
        if maps not in MAP_SOURCES or (maps == "image_to_text" and not image_to_text):
            raise ValueError(f"concept maps {maps!r} need one of {MAP_SOURCES} and the image -> text half for the second")
        self.maps = maps
        self.ln_text, self.ln_patch = nn.LayerNorm(width), nn.LayerNorm(width)
        self.text_to_image = CrossAttention(width, heads)
        self.ln_text_mlp, self.text_mlp = nn.LayerNorm(width), mlp(width, mlp_ratio)
        zero = [self.text_to_image.out, self.text_mlp[2]]
        self.image_to_text = None
        if image_to_text:
            self.ln_image, self.ln_text_kv = nn.LayerNorm(width), nn.LayerNorm(width)
            self.image_to_text = CrossAttention(width, heads)
            self.ln_image_mlp, self.image_mlp = nn.LayerNorm(width), mlp(width, mlp_ratio)
            zero += [self.image_to_text.out, self.image_mlp[2]]
        self.prior_gain = None
        if prior_gain:  # the text -> image logits start as gain x the towers' token-patch cosine
            self.prior_gain = nn.Parameter(torch.full((heads,), float(prior_gain)))
            zero.append(self.text_to_image.q)
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, text, image, text_pad, n_prefix: int, prior=None):
        """text [B, T, D], image [B, n_prefix + P, D] (CLS first), text_pad [B, T] bool, prior [B, T, P]
        (the towers' token-patch cosine; used when the block has a prior gain).

        Returns (text, image, maps [B, H, T, P]): per text token a distribution over the patches."""
        patches = image[:, n_prefix:]
        bias = None if self.prior_gain is None else self.prior_gain[None, :, None, None] * prior[:, None]
        upd, weights = self.text_to_image(self.ln_text(text), self.ln_patch(patches), need_weights=True, bias=bias)
        text = text + upd
        text = text + self.text_mlp(self.ln_text_mlp(text))
        if self.image_to_text is None:
            return text, image, weights
        from_image = self.maps == "image_to_text"
        upd, w_i2t = self.image_to_text(self.ln_image(image), self.ln_text_kv(text), key_padding_mask=text_pad,
                                        need_weights=from_image)
        if from_image:
            weights = patch_distribution(w_i2t, n_prefix)
        image = image + upd
        image = image + self.image_mlp(self.ln_image_mlp(image))
        return text, image, weights


@dataclass
class FusionOutput:
    image: torch.Tensor  # [B, n_prefix + P, D] fused image tokens
    text: torch.Tensor  # [B, T, D] grounded text tokens
    text_pad: torch.Tensor  # [B, T] bool, True = padding
    attention: torch.Tensor  # [B, L, H, T, P] concept maps: per text token a distribution over patches, every layer and head


class Fusion(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, image_to_text: bool = True,
                 maps: str = "text_to_image", prior_gain: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList(FusionBlock(width, heads, mlp_ratio, image_to_text, maps, prior_gain)
                                    for _ in range(layers))

    def forward(self, text, image, text_pad, n_prefix: int = 1, prior=None) -> FusionOutput:
        """prior [B, T, P]: the towers' token-patch cosine, for blocks with a prior gain (else None)."""
        maps = []
        for block in self.blocks:
            text, image, w = block(text, image, text_pad, n_prefix, prior)
            maps.append(w)
        return FusionOutput(image=image, text=text, text_pad=text_pad, attention=torch.stack(maps, 1))


class PMA(nn.Module):
    """Pooling by multi-head attention (Set Transformer): learned seeds attend over a token set.

    PMA(Z) = MAB(S, rFF(Z)), MAB(X, Y) = LN(H + rFF(H)), H = LN(X + Attention(X, Y))."""

    def __init__(self, width: int, heads: int, seeds: int = 1, mlp_ratio: float = 4.0):
        super().__init__()
        self.seeds = nn.Parameter(torch.randn(seeds, width) * width ** -0.5)
        self.pre = mlp(width, mlp_ratio)
        self.attn = CrossAttention(width, heads)
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.post = mlp(width, mlp_ratio)

    def forward(self, tokens, pad=None):
        """tokens [B, N, D], pad [B, N] bool (True = ignore) or None -> [B, seeds * D]."""
        s = self.seeds.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        h = self.ln1(s + self.attn(s, self.pre(tokens), key_padding_mask=pad)[0])
        return self.ln2(h + self.post(h)).flatten(1)
