"""What every composed-retrieval model of the project shares: the open_clip towers and their
config fields, the interface training, evaluation, the index and the app use (`ComposedRetrieval`),
and the phrase maps in context and isolated.

Each method subclasses `ComposedRetrieval` (ConText-CIR in `context_cir.py`, TMCIR in `tmcir.py`);
`factory.py` reads configs and builds them.
"""
from __future__ import annotations

import copy
import logging
import os
from dataclasses import asdict, dataclass

import open_clip
import torch
from torch import nn

from cir.errors import UserError
from cir.models.fusion import FusionOutput
from cir.text.tokenizer import CaptionTokenizer

EOT_ID = 49407


@dataclass
class TowersConfig:
    """The fields every method's config shares: the towers, the text length, the pooling (PMA) and
    the retrieval space."""

    clip_model: str  # an open_clip model name (built in, or one of cir/models/configs/clip/*.json)
    pretrained: str | None = None  # open_clip pretrained tag or a local weights file; None = random init
    context_length: int = 77
    mlp_ratio: float = 4.0
    pool_seeds: int = 1
    embed_dim: int = 512
    init_temperature: float = 0.07

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PhraseMaps:
    """Cross-attention of one noun phrase over the image patches, [L, H, g, g] (layers, heads, grid)."""

    text: str
    start: int
    end: int
    token_positions: list[int]
    in_context: torch.Tensor
    isolated: torch.Tensor


class ComposedRetrieval(nn.Module):
    """The interface training, evaluation, the index and the app use, shared by the methods.

    A subclass provides `clip` (the towers), `tokenizer`, `grid` (patches per side), `logit_scale`, and
    `tokens_from_tower(pooled, patches)`, `text_tokens(tokens)` -> (states, pad), `empty_text(batch)`,
    `fuse(image_tok, text)` -> FusionOutput (its `attention` [B, L, H, T, P]: per text token a
    distribution over the patches, drawn by the app) and `embed(fused)` -> [B, E]."""

    def __init__(self, config, clip: nn.Module):
        """The parts every method shares: `config`, the towers `clip` (registered first, so parameter
        and optimizer-state order is the towers', then the method's modules), the caption tokenizer and
        the patch grid."""
        super().__init__()
        self.config = config
        self.clip = clip
        clip.visual.output_tokens = True
        self.tokenizer = CaptionTokenizer(config.context_length)
        self.grid = clip.visual.grid_size[0]

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] (preprocessed) -> the fusion's image tokens [B, 1 + P, ...]."""
        return self.tokens_from_tower(*self.clip.visual(images))

    def cached_image_tokens(self, tower: torch.Tensor) -> torch.Tensor:
        """The image tower's outputs flattened as cir.image_cache stores them, [B, E + P * W] (pooled
        [E], then the patches [P, W] row-major) -> the same tokens as `image_tokens` of those images."""
        visual = self.clip.visual
        E, P = visual.output_dim, self.grid * self.grid
        tower = tower.float()
        return self.tokens_from_tower(tower[:, :E], tower[:, E:].view(len(tower), P, -1))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, FusionOutput]:
        fused = self.fuse(self.image_tokens(images), self.text_tokens(tokens))
        return self.embed(fused), fused

    @torch.no_grad()
    def encode_query(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """f(image, text): images [B, 3, S, S] preprocessed, len(texts) == B -> [B, E]."""
        return self(images, self.tokenizer(texts).to(images.device))[0]

    @torch.no_grad()
    def encode_gallery(self, images: torch.Tensor) -> torch.Tensor:
        """f(image, ""): images [B, 3, S, S] -> [B, E]."""
        return self.embed(self.fuse(self.image_tokens(images), self.empty_text(images.shape[0])))

    @torch.no_grad()
    def phrase_attention(self, image: torch.Tensor, text: str, spans: list[tuple[int, int]]) -> list[PhraseMaps]:
        """Maps of each character span of `text` over `image` [3, S, S]: in context and isolated.

        A span whose tokens were cut by the context length gets NaN maps."""
        dev = image.device
        img = self.image_tokens(image[None])
        fused = self.fuse(img, self.text_tokens(self.tokenizer([text]).to(dev)))
        positions = [self.tokenizer.span_to_token_positions(text, s, e) for s, e in spans]
        ctx = span_maps(fused.attention, torch.zeros(len(spans), dtype=torch.long, device=dev), positions)
        phrase_texts = [text[s:e] for s, e in spans]
        iso = isolated_maps(self, img, torch.zeros(len(spans), dtype=torch.long, device=dev), phrase_texts)
        g = self.grid
        return [PhraseMaps(t, s, e, pos, c.reshape(*c.shape[:2], g, g).float().cpu(), i.reshape(*i.shape[:2], g, g).float().cpu())
                for t, (s, e), pos, c, i in zip(phrase_texts, spans, positions, ctx, iso)]


class FrozenTextTower(nn.Module):
    """A frozen copy of a CLIP model's text tower (the modules `text_tower_states` and
    `text_tower_projection` read), for the attention prior's text side: the fusion's maps start
    from, and keep, the pretrained towers' token-patch similarity while the text tower trains."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        if hasattr(clip, "text"):  # open_clip CustomTextCLIP
            self.text = copy.deepcopy(clip.text)
        else:
            for name in ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection"):
                setattr(self, name, copy.deepcopy(getattr(clip, name)))
            self.register_buffer("attn_mask", clip.attn_mask.clone(), persistent=False)
        self.requires_grad_(False)

    def copy_from(self, clip: nn.Module) -> None:
        """Set the frozen weights to `clip`'s text tower's current ones."""
        source = clip.state_dict()
        self.load_state_dict({k: source[k] for k in self.state_dict()})

    def train(self, mode: bool = True) -> "FrozenTextTower":
        return super().train(False)  # frozen: never in training mode


def text_tower_states(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The text tower's final (ln_final) state of every token: tokens [B, T] -> [B, T, W] (causal, so
    a prefix of a sequence gives the same states as the whole)."""
    if hasattr(clip, "text"):  # open_clip CustomTextCLIP
        clip.text.output_tokens = True
        return clip.text(tokens)[1]
    T = tokens.shape[1]
    cast = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens).to(cast) + clip.positional_embedding[:T].to(cast)
    return clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask[:T, :T]))


def text_tower_projection(clip: nn.Module, states: torch.Tensor) -> torch.Tensor:
    """Token states [..., W] into the towers' joint space through the text projection: [..., E]."""
    proj = clip.text.text_projection if hasattr(clip, "text") else clip.text_projection
    return proj(states) if isinstance(proj, nn.Linear) else states @ proj


def span_maps(attention: torch.Tensor, rows: torch.Tensor, positions: list[list[int]]) -> torch.Tensor:
    """Average the attention of each span's tokens.

    attention [B, L, H, T, P]; rows [N] (which batch item each span belongs to); positions: N lists
    of token positions -> [N, L, H, P]. An empty position list gives NaN."""
    N, T = len(positions), attention.shape[3]
    w = torch.zeros(N, T, dtype=attention.dtype, device=attention.device)
    for n, pos in enumerate(positions):
        pos = [p for p in pos if p < T]
        if pos:
            w[n, pos] = 1.0 / len(pos)
        else:
            w[n] = float("nan")
    return torch.einsum("nt,nlhtp->nlhp", w, attention[rows])


def isolated_maps(model: ComposedRetrieval, image_tok: torch.Tensor, rows: torch.Tensor, phrases: list[str]) -> torch.Tensor:
    """Maps of each phrase encoded alone, f(image, phrase), over image_tok[rows]: [N, L, H, P]."""
    tokens = model.tokenizer(phrases).to(image_tok.device)
    eot = (tokens == EOT_ID).int().argmax(1).tolist()
    fused = model.fuse(image_tok[rows], model.text_tokens(tokens))
    return span_maps(fused.attention, torch.arange(len(phrases), device=image_tok.device),
                     [list(range(1, e)) for e in eot])


def check_weights_file(pretrained: str | None) -> None:
    """Refuse a local pickle-based weights file (.pt, .pth, .bin) that `torch.load(weights_only=True)`
    cannot read. open_clip loads such files with weights_only=True too, but retries a TypeError with
    torch's default, which the environment (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD) can turn into a full
    unpickle, i.e. code execution: a file refused here never gets there. Safetensors and numpy
    (.npz/.npy, read without pickle) files go straight to open_clip."""
    if not pretrained or not os.path.isfile(pretrained) or pretrained.endswith((".safetensors", ".npz", ".npy")):
        return
    try:
        torch.load(pretrained, map_location="cpu", weights_only=True, mmap=False)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"refusing pretrained weights {pretrained}: not readable as plain tensors "
                        f"(torch.load weights_only=True: {type(e).__name__}: {first})") from None


def create_towers(name: str, pretrained: str | None = None, device: str | torch.device = "cpu"):
    """`open_clip.create_model_and_transforms(name, pretrained)` -> (clip, train preprocess, eval preprocess),
    without open_clip's "No pretrained weights loaded ... initialized randomly" warning: here random
    towers are intended (a checkpoint's weights are loaded into them next, or training starts from scratch)."""
    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()  # open_clip warns through the root logger
    root.addFilter(keep)
    try:
        return open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    finally:
        root.removeFilter(keep)


