"""Checkpoints: safetensors weights with the manifest embedded in the file's metadata, plus the
same manifest as a JSON file beside it for people and tools. Never pickle.

    python -m cir.checkpoint export --checkpoint runs/x/last.safetensors --out assets/model.safetensors --dtype int8
    python -m cir.checkpoint show --checkpoint assets/context-cir-shapes.safetensors    # print its manifest

A training checkpoint also carries the optimizer state and RNG state so `--resume` continues
exactly. An exported checkpoint keeps the model only, in fp32, fp16 or int8 (weight matrices
quantised per output row with an fp32 scale, everything else fp16), and stores only the
token-embedding rows that training ever used (others load as zero vectors: unseen words).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from cir.cli import parse_first, run_cli

DTYPES = ("fp32", "fp16", "int8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m cir.checkpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", allow_abbrev=False, help="write a model-only checkpoint (for shipping)")
    e.add_argument("--checkpoint", required=True, help="training checkpoint (.safetensors) to export")
    e.add_argument("--out", required=True, help="output .safetensors path (a .json manifest is written beside it)")
    e.add_argument("--dtype", choices=DTYPES, default="fp16",
                   help="weight storage: fp32, fp16 (default; half the size) or int8 (per-row quantised matrices, a quarter)")
    s = sub.add_parser("show", allow_abbrev=False, help="print a checkpoint's manifest")
    s.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint")
    return p.parse_args(argv)


parse_first(__name__, parse_args)  # `python -m cir.checkpoint`: --help and argument errors before torch loads

import open_clip
import safetensors
import torch
from safetensors.torch import save_file

import cir
from cir.atomic import atomic_path, sha256_file, write_json
from cir.errors import UserError

FORMAT = "context-cir-checkpoint/1"
TOKEN_EMBEDDING_SUFFIX = "token_embedding.weight"  # every text tower's (the model's, and a frozen prior copy's)
TRAINING_STATE = ("optimizer.", "rng.")  # prefixes of the tensors a --resume reads beside the weights
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "assets" / "context-cir-shapes.safetensors"
DEFAULT_TWIN = DEFAULT_CHECKPOINT.with_name("context-cir-shapes-lambda0.safetensors")  # its lambda = 0 twin
DEFAULT_TMCIR = DEFAULT_CHECKPOINT.with_name("tmcir-shapes.safetensors")  # TMCIR on the same data


def versions() -> dict:
    return {"cir": cir.__version__, "torch": torch.__version__, "open_clip": open_clip.__version__}


INT8_MIN_ELEMENTS = 4096  # smaller tensors (norms, biases, small matrices) stay fp16 under int8


def _quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: w [R, C] -> (q [R, C] int8, scale [R, 1] fp32), w ~ q * scale."""
    scale = (w.abs().amax(1, keepdim=True) / 127).clamp(min=1e-12).float()
    return torch.round(w.float() / scale).clamp(-127, 127).to(torch.int8), scale


def _encode(tensors: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in tensors.items():
        if not v.is_floating_point() or dtype == "fp32":
            out[k] = v
        elif dtype == "int8" and v.ndim == 2 and v.numel() >= INT8_MIN_ELEMENTS:
            out[k + ".int8"], out[k + ".scale"] = _quantize_int8(v)
        else:
            out[k] = v.half()
    return out


def _decode(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in tensors.items():
        if k.endswith(".int8"):
            out[k[:-5]] = v.float() * tensors[k[:-5] + ".scale"]
        elif not k.endswith(".scale") or k[:-6] + ".int8" not in tensors:
            out[k] = v.float() if v.is_floating_point() else v
    return out


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, manifest: dict,
                    optimizer: torch.optim.Optimizer | None = None, dtype: str = "fp32",
                    token_rows: list[int] | None = None) -> dict:
    """Write `path` (.safetensors) and `path` with .json atomically; returns the manifest written.

    `manifest` must hold "config" (the model config's to_dict()); versions and format are added.
    `dtype`: storage of floating-point weights ("fp32", "fp16", "int8"); `token_rows`: keep only
    these token-embedding rows."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    manifest = dict(manifest, format=FORMAT, versions=versions(), dtype=dtype)
    if token_rows is not None:
        rows = torch.tensor(sorted(set(token_rows)), dtype=torch.long)
        for key in [k for k in tensors if k.endswith(TOKEN_EMBEDDING_SUFFIX)]:  # the text tower's, and its frozen copy's
            full = tensors.pop(key)
            tensors[key + ".rows"] = rows.clone()
            tensors[key + ".compact"] = full[rows].clone()
        manifest["token_embedding"] = {"rows": len(rows), "vocab": full.shape[0], "unseen_rows": "zero"}
    tensors = _encode(tensors, dtype)
    if optimizer is not None:
        _add_training_state(tensors, manifest, optimizer)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"manifest": json.dumps(manifest)})
    write_json(path.with_suffix(".json"), dict(manifest, sha256=sha256_file(path)))
    return manifest


def _add_training_state(tensors: dict, manifest: dict, optimizer: torch.optim.Optimizer) -> None:
    """Add what a --resume needs beside the weights: the optimizer's state (`optimizer.{index}.{name}`
    tensors, its param groups in the manifest) and torch's RNG state (`rng.torch`)."""
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        for name, value in state.items():
            tensors[f"optimizer.{idx}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    manifest["optimizer_param_groups"] = opt["param_groups"]
    tensors["rng.torch"] = torch.get_rng_state()


def _metadata(path: Path) -> dict[str, str]:
    """The safetensors metadata of the checkpoint file `path`."""
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path}: not a complete safetensors file ({e})") from None


def _parsed(path: Path, text: str):
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise UserError(f"{path}: the embedded manifest is not valid JSON ({type(e).__name__}: {e})") from None


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest embedded in a checkpoint file (validated)."""
    path = Path(path)
    meta = _metadata(path)
    if "manifest" not in meta:
        raise UserError(f"{path} is a safetensors file without a ConText-CIR manifest")
    manifest = _parsed(path, meta["manifest"])
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: the embedded manifest is not a JSON object")
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path}: unsupported checkpoint format {manifest.get('format')!r} (expected {FORMAT})")
    if not isinstance(manifest.get("config"), dict):
        raise UserError(f"{path}: the manifest has no model config")
    return manifest


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path}: truncated or corrupt ({e})") from None


def load_weights(model: torch.nn.Module, path: str | os.PathLike, tensors: dict | None = None,
                 allow_missing: bool = True) -> list[str]:
    """Load a checkpoint's weights into `model` (whose config may add modules the checkpoint lacks:
    e.g. image -> text fusion halves, which start as the identity). Returns the model's keys the
    checkpoint does not hold (they keep their initialisation); a checkpoint key the model lacks, one
    of another shape, or one holding NaN or inf, is refused with a message naming it."""
    state, missing = checked_state(model, path, tensors, allow_missing)
    model.load_state_dict(state, strict=False)
    return missing


def checked_state(model: torch.nn.Module, path: str | os.PathLike, tensors: dict | None = None,
                  allow_missing: bool = True) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the checkpoint's weights decoded as `model`'s state dict, the model's keys it lacks), refused
    as `load_weights` says. `model` may live on the "meta" device: only its keys and shapes are read,
    so a manifest's config is checked against the tensors before the real model is built."""
    tensors = read_tensors(path) if tensors is None else tensors
    state = _decode({k: v for k, v in tensors.items() if not k.startswith(TRAINING_STATE)})
    expected = {k: v.shape for k, v in model.state_dict().items()}
    for key in [k[:-len(".rows")] for k in state if k.endswith(TOKEN_EMBEDDING_SUFFIX + ".rows")]:
        rows, compact = state.pop(key + ".rows"), state.pop(key + ".compact")
        if key not in expected or compact.ndim != 2 or compact.shape[1:] != expected[key][1:] \
                or len(rows) != len(compact) or (len(rows) and not 0 <= int(rows.min()) <= int(rows.max()) < expected[key][0]):
            raise UserError(f"checkpoint {path} does not fit the architecture (token rows of {key})")
        full = torch.zeros(expected[key], dtype=compact.dtype)
        full[rows] = compact
        state[key] = full
    broken = sorted(k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if broken:
        raise UserError(f"checkpoint {path} holds non-finite weights (NaN or inf) in {len(broken)} tensor(s): "
                        f"{', '.join(broken[:3])}{' ...' if len(broken) > 3 else ''}")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k] != state[k].shape)
    refused = (("missing", [] if allow_missing else missing), ("unexpected", unexpected), ("wrong shape", wrong))
    if any(keys for _, keys in refused):
        detail = "; ".join(f"{name}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for name, keys in refused if keys)
        target = "the architecture asked for" if allow_missing else "the architecture its manifest names"
        raise UserError(f"checkpoint {path} does not fit {target} ({detail})")
    return state, missing


def save_module(path: str | os.PathLike, module: torch.nn.Module, manifest: dict, fmt: str,
                optimizer: torch.optim.Optimizer | None = None) -> None:
    """Write one module's weights with `manifest` (+ format, versions) embedded and as JSON beside them
    (+ sha256), atomically: the checkpoints of the towers (cir.towers) and the Combiner (cir.baselines).
    With `optimizer`, also the training state a --resume needs (`load_module` skips it)."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    manifest = dict(manifest, format=fmt, versions=versions())
    if optimizer is not None:
        _add_training_state(tensors, manifest, optimizer)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"manifest": json.dumps(manifest)})
    write_json(path.with_suffix(".json"), dict(manifest, sha256=sha256_file(path)))


def embedded_manifest(path: str | os.PathLike) -> dict:
    """The manifest embedded in any checkpoint the project writes, not validated ({} when it has none)."""
    path = Path(path)
    return _parsed(path, _metadata(path).get("manifest", "{}"))


def load_module(path: str | os.PathLike, fmt: str, build) -> tuple[torch.nn.Module, dict]:
    """A `save_module` checkpoint: check the format, build the module from the manifest (`build(manifest)`) and load its weights."""
    manifest = embedded_manifest(path)
    if manifest.get("format") != fmt:
        raise UserError(f"{path} is not a {fmt} checkpoint (its format: {manifest.get('format')!r})")
    module = build(manifest)
    weights = {k: v for k, v in read_tensors(path).items() if not k.startswith(TRAINING_STATE)}
    try:
        module.load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(f"checkpoint {path} does not fit the architecture its manifest names: {str(e)[:300]}") from None
    return module.eval(), manifest


def load_checkpoint(path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                    with_training_state: bool = False):
    """Build the model a checkpoint describes and load its weights (no pretrained download).

    Returns (model, preprocess, manifest[, tensors]). A checkpoint whose weights do not fit its
    architecture is refused with a message naming the mismatching keys."""
    from cir.models.factory import build_model, config_from_dict

    path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    manifest = read_manifest(path)
    tensors = read_tensors(path)
    try:
        config = config_from_dict(dict(manifest["config"], pretrained=None))
    except UserError as e:
        raise UserError(f"checkpoint {path}: {e}") from None
    try:
        skeleton, _ = build_model(config, device="meta")  # shapes only: nothing allocated
        state, _ = checked_state(skeleton, path, tensors, allow_missing=False)
        model, preprocess = build_model(config, device="cpu")
    except UserError:
        raise
    except Exception as e:  # nonsense values in the manifest's config
        raise UserError(f"checkpoint {path}: its manifest's model config cannot be built "
                        f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    model.load_state_dict(state, strict=False)
    model.to(device).eval()
    return (model, preprocess, manifest, tensors) if with_training_state else (model, preprocess, manifest)


def model_hash(path: str | os.PathLike) -> str:
    """Content hash identifying a checkpoint (used by indexes to detect a model mismatch)."""
    return sha256_file(path)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.cmd == "show":
        print(json.dumps(read_manifest(a.checkpoint), indent=2))
        return 0
    model, _, manifest = load_checkpoint(a.checkpoint)
    keep = {k: v for k, v in manifest.items() if k not in ("optimizer_param_groups", "format", "versions", "dtype", "token_embedding")}
    keep["exported_from"] = {"path": str(a.checkpoint), "sha256": sha256_file(a.checkpoint)}
    save_checkpoint(a.out, model, keep, dtype=a.dtype, token_rows=manifest.get("token_ids_seen"))
    print(f"wrote {a.out} ({Path(a.out).stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    run_cli(main)
