"""TMCIR (arXiv 2504.10995): adaptive token fusion of CLIP's output tokens, behind the same
interface as ConText-CIR (`cir.models.base.ComposedRetrieval`), so training, evaluation, the index and
the app take it unchanged.

    model, preprocess = build_model("tmcir-shapes-grid7")        # cir.models.factory; a config with "method": "tmcir"
    q = model.encode_query(images, ["make the red circle blue"])  # [B, E], L2-normalised
    g = model.encode_gallery(images)                              # nothing merged, [B, E]

The method (stage 2; stage 1, the towers' alignment on pseudo-targets, is `cir.align`):
  1. Both towers' output tokens in their joint space, unit-normalised: the CLS embedding c and
     the patches v_i (visual projection of the last layer's patch states), the text tokens t_j
     (text projection of the final states).
  2. Token-wise similarity S_ij = cos(v_i, t_j) over the patches i and the merged text tokens j
     (every unpadded token but the start token).
  3. Each text token joins its most similar patch, i*(j) = argmax_i S_ij, weighted by its
     similarity: v'_i = (v_i + sum_{j: i*(j) = i} w_j t_j) / (1 + sum_{j: i*(j) = i} w_j), with
     w_j = max(S_i*(j) j, 0). A merged token keeps its patch's position; a patch no text token
     joins stays v_i; the CLS token c is kept as it is.
  4. [c; v'] is pooled by PMA (the pooling of ConText-CIR, cir/models/fusion.py) and a linear head into
     the retrieval space. A gallery image is the same with nothing merged.
  5. Stage 2 fine-tunes everything with cir.train's InfoNCE (composed query against the target).

The paper leaves open, and this implementation chooses:
  - which tokens merge: the start token is left out (the causal text tower gives it the same
    state for every caption); padding never merges;
  - the weight of a text token: its cosine, clamped at 0 (a negative weight could make the
    denominator vanish); the patch itself counts 1, as a token of size 1 in ToMe;
  - tokens are merged as unit vectors, so the similarity alone sets each modality's share;
  - the pooling of the merged tokens and the target side: PMA + head over [CLS; patches], the
    same function of the image alone for the gallery, so the two methods differ only in fusion;
  - the maps drawn (the "attention"): for every text token the softmax over the patches of
    S_ij times the towers' own CLIP temperature (clip.logit_scale, learned in stage 1), as one
    layer and one head, [B, 1, 1, T, P].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cir.models.base import EOT_ID, ComposedRetrieval, TowersConfig, text_tower_projection, text_tower_states
from cir.models.fusion import PMA, FusionOutput


@dataclass
class TMCIRConfig(TowersConfig):
    """TMCIR's fields on top of the shared towers and pooling fields (read through
    cir.models.factory.load_config / config_from_dict: the "method" key picks this class)."""

    method: str = "tmcir"  # the key cir.models.factory.config_from_dict picks the config class by
    pool_heads: int = 8

    # the maps are one layer and one head (what the app's layer and head selectors read)
    fusion_layers = 1
    fusion_heads = 1


class TokenMerge(nn.Module):
    """Similarity-weighted merging of text tokens into the patches they are most similar to."""

    def forward(self, patches: torch.Tensor, text: torch.Tensor, merged: torch.Tensor,
                map_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """patches [B, P, E] and text [B, T, E], unit vectors; merged [B, T] bool (the text tokens
        that merge); map_scale: the softmax scale of the maps.

        Returns (merged patches [B, P, E], maps [B, T, P]: per text token a distribution over the
        patches, softmax(map_scale * S))."""
        sim = text @ patches.transpose(1, 2)  # [B, T, P]: S transposed
        best = sim.argmax(-1)  # [B, T]: i*(j)
        weight = sim.gather(-1, best[..., None])[..., 0].clamp_min(0) * merged  # [B, T]: w_j
        assign = F.one_hot(best, patches.shape[1]).to(text.dtype) * weight[..., None]  # [B, T, P]
        total = patches + assign.transpose(1, 2) @ text  # [B, P, E]: v_i + sum_j w_j t_j
        out = total / (1 + assign.sum(1))[..., None]
        return out, (map_scale * sim).softmax(-1)


class TMCIR(ComposedRetrieval):
    def __init__(self, config: TMCIRConfig, clip: nn.Module):
        super().__init__(config, clip)
        width = clip.visual.output_dim  # the towers' joint space
        self.fusion = TokenMerge()
        self.pool = PMA(width, config.pool_heads, config.pool_seeds, config.mlp_ratio)
        self.head = nn.Linear(width * config.pool_seeds, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(1.0 / config.init_temperature).log())

    def tokens_from_tower(self, pooled: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """The image tower's pooled [B, E] and patch [B, P, W] outputs -> [B, 1 + P, E] unit vectors
        in the joint space: the CLS embedding, then the patches row-major."""
        return F.normalize(torch.cat([pooled[:, None], patches @ self.clip.visual.proj], 1), dim=-1)

    def text_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, C] (CLIP BPE ids) -> (unit states in the joint space [B, T, E], padding mask
        [B, T] True = padding), cut after the longest EOT of the batch (exact: the tower is causal)."""
        eot = (tokens == EOT_ID).int().argmax(1)
        T = int(eot.max()) + 1
        states = text_tower_projection(self.clip, text_tower_states(self.clip, tokens[:, :T]))
        pad = torch.arange(T, device=tokens.device)[None] > eot[:, None]
        return F.normalize(states, dim=-1), pad

    def empty_text(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """No text tokens: [B, 0, E] states and [B, 0] mask (a gallery image merges nothing)."""
        dev = self.logit_scale.device
        return (torch.zeros(batch, 0, self.clip.visual.output_dim, device=dev),
                torch.zeros(batch, 0, dtype=torch.bool, device=dev))

    def fuse(self, image_tok: torch.Tensor, text: tuple[torch.Tensor, torch.Tensor]) -> FusionOutput:
        """image_tok from `image_tokens`, text from `text_tokens` or `empty_text`."""
        states, pad = text
        merged = ~pad
        merged[:, :1] = False  # the start token never merges
        patches, maps = self.fusion(image_tok[:, 1:], states.to(image_tok.dtype), merged,
                                    self.clip.logit_scale.exp())
        image = torch.cat([image_tok[:, :1], patches], 1)
        return FusionOutput(image=image, text=states, text_pad=pad, attention=maps[:, None, None])

    def embed(self, fused: FusionOutput) -> torch.Tensor:
        """Pool [CLS; merged patches] into the retrieval space: [B, E], L2-normalised."""
        return F.normalize(self.head(self.pool(fused.image)), dim=-1)
