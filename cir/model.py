"""ConText-CIR: CLIP encoders (built through open_clip) + cross-attention fusion + PMA pooling.

    model, preprocess = build_model("context-cir-shapes")           # a config in cir/configs/
    q = model.encode_query(images, ["make the red circle blue"])     # [B, E], L2-normalised
    g = model.encode_gallery(images)                                 # f(image, ""), [B, E]
    maps = model.phrase_attention(image, caption, [(5, 19)])         # in-context vs isolated maps

A config's "method" key picks the model: absent (or "context-cir") gives ConTextCIR, "tmcir"
gives cir.tmcir.TMCIR (adaptive token fusion) with the same interface (`ComposedRetrieval`).
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from cir.errors import UserError
from cir.fusion import MAP_SOURCES, PMA, Fusion, FusionOutput
from cir.tokenizer import CaptionTokenizer

CONFIG_DIR = Path(__file__).parent / "configs"
open_clip.add_model_config(CONFIG_DIR / "clip")
open_clip.add_model_config(CONFIG_DIR / "ablations" / "clip")  # towers of the superseded designs
EOT_ID = 49407


@dataclass
class ModelConfig:
    clip_model: str  # an open_clip model name (built in, or one of cir/configs/clip/*.json)
    pretrained: str | None = None  # open_clip pretrained tag or a local weights file; None = random init
    context_length: int = 77
    fusion_width: int = 512
    fusion_layers: int = 4
    fusion_heads: int = 8
    mlp_ratio: float = 4.0
    pool_seeds: int = 1
    fusion_image_to_text: bool = True  # image tokens also attend over the text in each fusion block
    pool_text: bool = False  # PMA pools over [fused image tokens; fused text tokens], not the image tokens alone
    concept_maps: str = "text_to_image"  # which attention the CC loss and the app use (cir/fusion.py)
    attention_prior: float = 0.0  # > 0: text -> image logits start from this gain x the towers' token-patch cosine
    frozen_prior: bool = False  # the prior's text side from a frozen copy of the text tower (kept in the model)
    embed_dim: int = 512
    init_temperature: float = 0.07

    def __post_init__(self):
        if not self.fusion_image_to_text and not self.pool_text:
            raise UserError("fusion_image_to_text false needs pool_text true: otherwise the text never reaches the embedding")
        if self.concept_maps not in MAP_SOURCES:
            raise UserError(f"concept_maps {self.concept_maps!r}: expected one of {', '.join(MAP_SOURCES)}")
        if self.concept_maps == "image_to_text" and not self.fusion_image_to_text:
            raise UserError("concept_maps image_to_text needs fusion_image_to_text true")
        if self.frozen_prior and not self.attention_prior:
            raise UserError("frozen_prior needs attention_prior > 0")

    @staticmethod
    def load(name_or_path: str):
        """A config by name (cir/configs/<name>.json; superseded designs as ablations/<name>) or a JSON path:
        a ModelConfig, or the config of the method its "method" key names (see `from_dict`)."""
        path = Path(name_or_path)
        if not path.is_file():
            path = CONFIG_DIR / f"{name_or_path}.json"
        if not path.is_file():
            names = sorted(str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in
                           [*CONFIG_DIR.glob("*.json"), *CONFIG_DIR.glob("ablations/*.json")])
            raise UserError(f"unknown model config {name_or_path!r}; known: {', '.join(names)} (or a .json path)")
        return ModelConfig.from_dict(json.loads(path.read_text()))

    @staticmethod
    def from_dict(d: dict):
        """The config of the method d["method"] names: a ModelConfig (no method, or "context-cir")
        or a cir.tmcir.TMCIRConfig ("tmcir")."""
        from cir.tmcir import TMCIRConfig

        classes = {"context-cir": ModelConfig, "tmcir": TMCIRConfig}
        method = d.get("method", "context-cir")
        if method not in classes:
            raise UserError(f"unknown method {method!r}: expected one of {', '.join(classes)}")
        config_class = classes[method]
        d = {k: v for k, v in d.items() if k != "method"}
        unknown = set(d) - {f.name for f in fields(config_class)}
        if unknown:
            raise UserError(f"unknown model config keys: {sorted(unknown)}")
        return config_class(**d)

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


class ConTextCIR(ComposedRetrieval):
    def __init__(self, config: ModelConfig, clip: nn.Module):
        super().__init__()
        self.config = config
        self.clip = clip
        clip.visual.output_tokens = True
        d = config.fusion_width
        self.tokenizer = CaptionTokenizer(config.context_length)
        vis_width = clip.visual.transformer.width
        self.grid = clip.visual.grid_size[0]
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


def _check_weights_file(pretrained: str | None) -> None:
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


def build_model(config, device: str | torch.device = "cpu"):
    """Build the model a config describes (a name, a path, a ModelConfig or a cir.tmcir.TMCIRConfig)
    and its image preprocessing: ConTextCIR, or TMCIR for a TMCIR config.

    The CLIP towers come from `open_clip.create_model_and_transforms(clip_model, pretrained=...)`
    where `pretrained` is an open_clip tag or a local weights file."""
    if isinstance(config, (str, os.PathLike)):
        config = ModelConfig.load(config)
    if config.clip_model not in open_clip.list_models():
        raise UserError(f"unknown open_clip model {config.clip_model!r}")
    _check_weights_file(config.pretrained)
    # device "meta" builds the architecture without allocating weights (checks of large configs)
    with torch.device("meta") if str(device) == "meta" else contextlib.nullcontext():
        try:
            clip, _, preprocess = create_towers(config.clip_model, config.pretrained, device)
        except UserError:
            raise
        except Exception as e:  # RuntimeError (shapes), UnpicklingError, OSError, ... from loading the weights
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"cannot build CLIP model {config.clip_model!r} with pretrained={config.pretrained!r}: "
                            f"{first}") from None
        tower_ctx = getattr(clip, "context_length", config.context_length)
        if tower_ctx < config.context_length:
            raise UserError(f"context_length {config.context_length} exceeds the text tower's {tower_ctx}")
        return model_class(config)(config, clip).to(device), preprocess


def model_class(config) -> type[ComposedRetrieval]:
    """The model of a config: ConTextCIR for a ModelConfig, TMCIR for a TMCIRConfig."""
    if isinstance(config, ModelConfig):
        return ConTextCIR
    from cir.tmcir import TMCIR
    return TMCIR
