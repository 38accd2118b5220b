"""The model: identity fusion at init, attention maps, exact text trimming, phrase maps, the
open_clip factory for named models and local weight files, and checkpoints."""
from __future__ import annotations

import logging

import pytest
import torch

from cir.checkpoint import load_checkpoint, read_manifest, save_checkpoint
from cir.errors import UserError
from cir.models.context_cir import ConTextCIRConfig
from cir.models.factory import build_model, config_from_dict, load_config

CAPTION = "remove the blue star and make the red circle green"


def test_fusion_is_identity_at_init(tiny_model):
    model, _ = tiny_model
    x = torch.randn(3, 3, 63, 63)
    q = model.encode_query(x, [CAPTION, "", "add a small green square at the top left"])
    assert torch.allclose(q, model.encode_gallery(x), atol=1e-6)
    assert torch.allclose(q.norm(dim=-1), torch.ones(3))


def test_attention_maps_are_distributions_over_patches(tiny_model):
    model, _ = tiny_model
    emb, fused = model(torch.randn(2, 3, 63, 63), model.tokenizer([CAPTION, "make it red"]))
    B, L, H, T, P = fused.attention.shape
    assert (B, L, H, P) == (2, model.config.fusion_layers, model.config.fusion_heads, model.grid ** 2) and model.grid == 9
    assert torch.allclose(fused.attention.sum(-1), torch.ones(B, L, H, T), atol=1e-5)


def test_image_to_text_concept_maps_are_the_patches_attention_to_each_token():
    """concept_maps "image_to_text": for every text token, how much each patch attends to it
    (recomputed here from the block's own projections), renormalised over the patches."""
    torch.manual_seed(0)
    cfg = dict(load_config("context-cir-tiny").to_dict(), concept_maps="image_to_text")
    model, _ = build_model(config_from_dict(cfg))
    seen = {}
    attn = model.fusion.blocks[0].image_to_text
    attn.register_forward_hook(lambda mod, args, kwargs, out: seen.update(x=args[0], ctx=args[1], pad=kwargs["key_padding_mask"]),
                               with_kwargs=True)
    _, fused = model(torch.randn(2, 3, 63, 63), model.tokenizer([CAPTION, "make it red"]))
    x, ctx, pad = seen["x"], seen["ctx"], seen["pad"]
    B, Q, D = x.shape
    h = attn.heads
    q = attn.q(x).view(B, Q, h, -1).transpose(1, 2)
    k = attn.kv(ctx)[..., :D].view(B, ctx.shape[1], h, -1).transpose(1, 2)
    w = ((q @ k.transpose(-1, -2)) / (D // h) ** 0.5).masked_fill(pad[:, None, None], float("-inf")).softmax(-1)
    cols = w[:, :, 1:].transpose(-1, -2)  # [B, H, T, P]: CLS dropped
    expect = cols / cols.sum(-1, keepdim=True)
    got = fused.attention[:, 0]
    assert torch.allclose(got[0], expect[0], atol=1e-5)
    n = int((~pad[1]).sum())  # "make it red": its real tokens are distributions, padding gets zeros
    assert torch.allclose(got[1, :, :n], expect[1, :, :n], atol=1e-5) and (got[1, :, n:] == 0).all()
    with pytest.raises(UserError, match="needs fusion_image_to_text"):
        config_from_dict(dict(cfg, fusion_image_to_text=False, pool_text=True))


def test_text_trimming_is_exact(tiny_model):
    model, _ = tiny_model
    short, long = "make it red", CAPTION + " and move the black square to the top left"
    alone, pad_alone = model.text_tokens(model.tokenizer([short]))
    both, pad_both = model.text_tokens(model.tokenizer([short, long]))
    n = alone.shape[1]
    assert n == 5 and both.shape[1] > n  # SOT make it red EOT
    assert torch.allclose(alone[0], both[0, :n], atol=1e-5)
    assert pad_both[0, n:].all() and not pad_both[0, :n].any() and not pad_alone.any()


@pytest.mark.parametrize("image_to_text", [True, False])
def test_pooling_over_text_tokens_ignores_padding(image_to_text):
    torch.manual_seed(0)
    cfg = dict(load_config("context-cir-tiny").to_dict(), pool_text=True, fusion_image_to_text=image_to_text)
    model, _ = build_model(config_from_dict(cfg))
    assert (model.fusion.blocks[0].image_to_text is not None) == image_to_text
    model.eval()
    x = torch.randn(2, 3, 63, 63)
    short, long = "make it red", CAPTION + " and move the black square to the top left"
    alone = model.encode_query(x[:1], [short])
    both = model.encode_query(x, [short, long])
    assert torch.allclose(alone[0], both[0], atol=1e-5)
    # the text tokens are pooled directly, so the caption moves the embedding even with identity fusion
    assert (both[0] - model.encode_gallery(x[:1])[0]).norm() > 1e-3  # 0 without pool_text (test above)


def test_phrase_attention_in_context_and_isolated(tiny_model):
    model, _ = tiny_model
    image = torch.randn(3, 63, 63)
    spans = [(7, 20), (30, 44)]
    maps = model.phrase_attention(image, CAPTION, spans)
    assert [m.text for m in maps] == ["the blue star", "the red circle"]
    _, fused = model(image[None], model.tokenizer([CAPTION]))
    for m in maps:
        assert m.in_context.shape == (model.config.fusion_layers, model.config.fusion_heads, 9, 9)
        expect = fused.attention[0, :, :, m.token_positions].mean(2).reshape(m.in_context.shape)
        assert torch.allclose(m.in_context, expect, atol=1e-6)
        _, alone = model(image[None], model.tokenizer([m.text]))
        n = len(model.tokenizer.encode_with_offsets(m.text)[0])
        assert torch.allclose(m.isolated, alone.attention[0, :, :, 1:n + 1].mean(2).reshape(m.isolated.shape), atol=1e-6)
    assert not torch.allclose(maps[0].in_context, maps[0].isolated)


def test_named_models_build_through_open_clip():
    cfg = load_config("context-vit-b-32")
    assert cfg.pretrained == "openai"
    model, preprocess = build_model(config_from_dict(dict(cfg.to_dict(), pretrained=None)))
    assert model.grid == 7 and sum(p.numel() for p in model.clip.parameters()) > 150e6
    q = model.encode_query(torch.randn(1, 3, 224, 224), ["a red car"])
    assert q.shape == (1, 512)
    for name, grid, dim in (("context-vit-l-14", 16, 768), ("context-vit-h-14", 16, 1024)):
        cfg = config_from_dict(dict(load_config(name).to_dict(), pretrained=None))
        model, _ = build_model(cfg, device="meta")
        assert model.grid == grid and model.head.out_features == dim


def test_random_towers_build_without_open_clips_warning(caplog):
    """Random towers are intended (a checkpoint is loaded into them next): open_clip's "initialized
    randomly" warning is dropped during the build, and the filter is gone afterwards."""
    with caplog.at_level(logging.WARNING):
        build_model("context-cir-tiny")
        logging.warning("No pretrained weights loaded for model 'x' (logged after the build)")
    assert [r.getMessage() for r in caplog.records] == ["No pretrained weights loaded for model 'x' (logged after the build)"]


def test_local_weights_file_as_pretrained(tmp_path, tiny_model):
    model, _ = tiny_model
    weights = tmp_path / "clip.pt"
    torch.save(model.clip.state_dict(), weights)
    cfg = config_from_dict(dict(model.config.to_dict(), pretrained=str(weights)))
    torch.manual_seed(123)
    other, _ = build_model(cfg)
    for (n, a), (_, b) in zip(model.clip.state_dict().items(), other.clip.state_dict().items()):
        assert torch.equal(a, b), n


def test_config_errors():
    with pytest.raises(UserError, match="unknown model config"):
        load_config("no-such-config")
    with pytest.raises(UserError, match="unknown open_clip model"):
        build_model(ConTextCIRConfig(clip_model="ViT-Q-99"))
    with pytest.raises(UserError, match="unknown model config keys"):
        config_from_dict({"clip_model": "cir-tiny", "colour": 1})
    with pytest.raises(UserError, match="needs pool_text"):
        config_from_dict({"clip_model": "cir-tiny", "fusion_image_to_text": False})


def test_checkpoint_roundtrip_export_and_errors(tmp_path, tiny_model):
    model, _ = tiny_model
    x = torch.randn(2, 3, 63, 63)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, {"config": model.config.to_dict(), "step": 7})
    loaded, _, manifest = load_checkpoint(path)
    assert manifest["step"] == 7 and read_manifest(path)["config"] == model.config.to_dict()
    assert (tmp_path / "m.json").is_file()
    assert torch.equal(loaded.encode_query(x, [CAPTION] * 2), model.encode_query(x, [CAPTION] * 2))
    # export: fp16, only the token rows the caption uses
    ids = model.tokenizer([CAPTION])[0]
    rows = sorted(set(ids.tolist()))
    small = tmp_path / "small.safetensors"
    ref = model.encode_query(x, [CAPTION] * 2)
    for dtype, shrink, tol in (("fp16", 3, 2e-2), ("int8", 5, 5e-2)):
        save_checkpoint(small, model, {"config": model.config.to_dict()}, dtype=dtype, token_rows=rows)
        assert small.stat().st_size < path.stat().st_size / shrink
        exported, _, manifest = load_checkpoint(small)
        assert manifest["dtype"] == dtype
        assert torch.allclose(exported.encode_query(x, [CAPTION] * 2), ref, atol=tol)
        emb = exported.clip.token_embedding.weight
        assert emb[rows].abs().sum() > 0 and emb[1000].abs().sum() == 0  # unseen rows load as zero
    # truncated file and wrong architecture are explained
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated or corrupt|not a complete safetensors"):
        load_checkpoint(tmp_path / "cut.safetensors")
    other, _ = build_model(config_from_dict(dict(model.config.to_dict(), fusion_layers=1)))
    wrong = tmp_path / "wrong.safetensors"
    save_checkpoint(wrong, other, {"config": model.config.to_dict()})
    with pytest.raises(UserError, match="does not fit the architecture.*unexpected|does not fit the architecture.*missing"):
        load_checkpoint(wrong)
