"""Checked reading of annotation JSON files (CIRR, CIRCO): each mistake is one UserError naming the
file and the entry."""
from __future__ import annotations

import json
from pathlib import Path

from cir.errors import UserError


def load_json(path: Path, kind: type[list] | type[dict]):
    """The JSON value in `path`, which must be a `kind` (list or dict); a UserError otherwise."""
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, kind):
        raise UserError(f"{path}: expected a JSON {'list' if kind is list else 'object'}, got {type(data).__name__}")
    return data


def require(entry: dict, key: str, kind: type, where: str, item: type | None = None, default=None):
    """entry[key], checked to be a `kind` (a list of `item` when given); a UserError naming `where` otherwise.

    A missing key gives `default` when one is given."""
    if key not in entry:
        if default is not None:
            return default
        raise UserError(f"{where}: missing field '{key}'")
    value = entry[key]
    if not isinstance(value, kind) or (item is not None and not all(isinstance(x, item) for x in value)):
        wanted = f"a list of {item.__name__}" if item is not None else kind.__name__
        raise UserError(f"{where}: field '{key}' must be {wanted}, got {repr(value)[:80]}")
    return value
