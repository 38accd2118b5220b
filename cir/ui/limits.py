"""Every resource limit the app puts on what a visitor sends, in one place.

The model reads at most its context length (40 or 77 tokens), so longer captions only cost work;
the caption path is linear in any case (cir.tokenizer). Limits that Gradio enforces are passed to
it at launch (`MAX_FILE_SIZE`) or to `gr.Blocks` (`DELETE_CACHE`)."""
from __future__ import annotations

from cir.errors import UserError

MAX_CAPTION_CHARS = 2000  # a modification text (the model keeps about 150 characters of it)
MAX_PHRASE_ROWS = 20  # phrase rows drawn at once (each costs a model pass and a figure)
MAX_NOTE_CHARS = 4000  # a reviewer's note
MAX_FILE_SIZE = "25mb"  # largest upload the server accepts (images are also refused above
# cir.data.images.MAX_IMAGE_PIXELS)
DELETE_CACHE = (3600, 3600)  # every hour, delete uploaded and cached files older than an hour


def caption(text: str | None, what: str = "the modification") -> str:
    """`text` ('' for None) if within MAX_CAPTION_CHARS, else UserError."""
    text = text or ""
    if len(text) > MAX_CAPTION_CHARS:
        raise UserError(f"{what} has {len(text):,} characters; at most {MAX_CAPTION_CHARS:,} are accepted")
    return text


def phrase_rows(rows: list) -> list:
    if len(rows or []) > MAX_PHRASE_ROWS:
        raise UserError(f"{len(rows)} phrase rows; at most {MAX_PHRASE_ROWS} are drawn at once")
    return list(rows or [])


def note(text: str | None) -> str:
    text = text or ""
    if len(text) > MAX_NOTE_CHARS:
        raise UserError(f"the note has {len(text):,} characters; at most {MAX_NOTE_CHARS:,} are kept")
    return text
