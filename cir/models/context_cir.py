"""ConText-CIR: CLIP encoders (built through open_clip) + cross-attention fusion + PMA pooling.

    model, preprocess = build_model("context-cir-shapes")           # cir.models.factory; a config in cir/models/configs/
    q = model.encode_query(images, ["make the red circle blue"])     # [B, E], L2-normalised
    g = model.encode_gallery(images)                                 # f(image, ""), [B, E]
    maps = model.phrase_attention(image, caption, [(5, 19)])         # in-context vs isolated maps
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cir.errors import UserError
from cir.models.base import (EOT_ID, ComposedRetrieval, FrozenTextTower, TowersConfig, text_tower_projection,
                             text_tower_states)
from cir.models.fusion import MAP_SOURCES, PMA, Fusion, FusionOutput


@dataclass
class ConTextCIRConfig(TowersConfig):
    """ConText-CIR's fusion (cir/models/fusion.py) on top of the shared towers and pooling fields."""

    fusion_width: int = 512
    fusion_layers: int = 4
    fusion_heads: int = 8  # also the pooling's heads
    fusion_image_to_text: bool = True  # image tokens also attend over the text in each fusion block
    pool_text: bool = False  # PMA pools over [fused image tokens; fused text tokens], not the image tokens alone
    concept_maps: str = "text_to_image"  # which attention the CC loss and the app use (cir/models/fusion.py)
    attention_prior: float = 0.0  # > 0: text -> image logits start from this gain x the towers' token-patch cosine
    frozen_prior: bool = False  # the prior's text side from a frozen copy of the text tower (kept in the model)

    def __post_init__(self):
        if not self.fusion_image_to_text and not self.pool_text:
            raise UserError("fusion_image_to_text false needs pool_text true: otherwise the text never reaches the embedding")
        if self.concept_maps not in MAP_SOURCES:
            raise UserError(f"concept_maps {self.concept_maps!r}: expected one of {', '.join(MAP_SOURCES)}")
        if self.concept_maps == "image_to_text" and not self.fusion_image_to_text:
            raise UserError("concept_maps image_to_text needs fusion_image_to_text true")
        if self.frozen_prior and not self.attention_prior:
            raise UserError("frozen_prior needs attention_prior > 0")


class ConTextCIR(ComposedRetrieval):
    def __init__(self, config: ConTextCIRConfig, clip: nn.Module):
        super().__init__(config, clip)
        d = config.fusion_width
        vis_width = clip.visual.transformer.width
        self.patch_proj = nn.Linear(vis_width, d)
        self.cls_proj = nn.Linear(clip.visual.output_dim, d)
        self.text_proj = nn.Linear(self._text_width(), d)
        self.prior_text = FrozenTextTower(clip) if config.frozen_prior else None
        self.fusion = Fusion(d, config.fusion_layers, config.fusion_heads, config.mlp_ratio, config.fusion_image_to_text,
                             config.concept_maps, config.attention_prior)
        self.pool = PMA(d, config.fusion_heads, config.pool_seeds, config.mlp_ratio)
        self.head = nn.Linear(d * config.pool_seeds, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(1.0 / config.init_temperature).log())
        # SOT, EOT; a fresh [1, 2] tensor: the slice's strides (40, 1) make DDP's broadcast refuse it
        self.register_buffer("empty_tokens", self.tokenizer([""])[:, :2].clone(memory_format=torch.contiguous_format),
                             persistent=False)

    # ------------------------------------------------------------------ encoders
    def _text_width(self) -> int:
        return self.clip.text.transformer.width if hasattr(self.clip, "text") else self.clip.transformer.width

    def tokens_from_tower(self, pooled: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """The image tower's pooled [B, E] and patch [B, P, W] outputs -> [B, 1 + P, D]: projected
        CLS, then patches row-major.

        With an attention prior, E more channels follow: each patch's unit embedding in the towers'
        joint space (zeros for CLS), [B, 1 + P, D + E]; `fuse` splits them off."""
        tokens = torch.cat([self.cls_proj(pooled)[:, None], self.patch_proj(patches)], 1)
        if not self.config.attention_prior:
            return tokens
        joint = F.normalize(patches @ self.clip.visual.proj, dim=-1)
        return torch.cat([tokens, F.pad(joint, (0, 0, 1, 0))], -1)

    def text_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, C] (CLIP BPE ids) -> (states [B, T, D], padding mask [B, T] True = padding).

        Sequences are cut after the longest EOT in the batch; the causal text encoder makes this exact.
        With an attention prior, states carry E more channels: each token's unit embedding in the
        towers' joint space, [B, T, D + E], from the trained text tower or, with `frozen_prior`, from
        its frozen copy."""
        eot = (tokens == EOT_ID).int().argmax(1)
        T = int(eot.max()) + 1
        x = text_tower_states(self.clip, tokens[:, :T])
        pad = torch.arange(T, device=tokens.device)[None] > eot[:, None]
        states = self.text_proj(x)
        if self.config.attention_prior:
            if self.prior_text is None:
                joint = text_tower_projection(self.clip, x)
            else:
                with torch.no_grad():
                    joint = text_tower_projection(self.prior_text, text_tower_states(self.prior_text, tokens[:, :T]))
            states = torch.cat([states, F.normalize(joint, dim=-1)], -1)
        return states, pad

    def empty_text(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        states, pad = self.text_tokens(self.empty_tokens)
        return states.expand(batch, -1, -1), pad.expand(batch, -1)

    # ------------------------------------------------------------------ fusion and pooling
    def fuse(self, image_tok: torch.Tensor, text: tuple[torch.Tensor, torch.Tensor]) -> FusionOutput:
        """image_tok from `image_tokens`, text from `text_tokens` or `empty_text`."""
        states, pad = text
        if not self.config.attention_prior:
            return self.fusion(states, image_tok, pad, n_prefix=1)
        d = self.config.fusion_width
        prior = states[..., d:] @ image_tok[:, 1:, d:].transpose(1, 2)  # [B, T, P] cosine in the joint space
        return self.fusion(states[..., :d], image_tok[..., :d], pad, n_prefix=1, prior=prior)

    def embed(self, fused: FusionOutput) -> torch.Tensor:
        """Pool the fused image tokens (and, with `pool_text`, the unpadded fused text tokens) into the
        retrieval space: [B, E], L2-normalised."""
        if not self.config.pool_text:
            return F.normalize(self.head(self.pool(fused.image)), dim=-1)
        tokens = torch.cat([fused.image, fused.text], 1)
        image_pad = torch.zeros(fused.image.shape[:2], dtype=torch.bool, device=tokens.device)
        pad = torch.cat([image_pad, fused.text_pad], 1)
        return F.normalize(self.head(self.pool(tokens, pad)), dim=-1)


