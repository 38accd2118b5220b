"""Every resource limit the app puts on what a visitor sends, in one place.

The model reads at most its context length (40 or 77 tokens), so longer captions only cost work;
the caption path is linear in any case (cir.text.tokenizer). Limits that Gradio enforces are passed to
it at launch (`MAX_FILE_SIZE`, `MAX_SESSIONS`; `MAX_BODY_BYTES` by cir.ui.edge), to `gr.Blocks` (`DELETE_CACHE`) or through its environment, unless
already set there (`GRADIO_ANALYTICS`)."""
from __future__ import annotations

from cir.errors import UserError

MAX_CAPTION_CHARS = 2000  # a modification text (the model keeps about 150 characters of it)
MAX_PHRASE_ROWS = 20  # phrase rows drawn at once (each costs a model pass and a figure)
MAX_NOTE_CHARS = 4000  # a reviewer's note
MAX_NAME_CHARS = 80  # an annotator's name
MAX_FILE_MB = 25  # largest upload the server accepts, and largest data: URL image inside a request
# (images are also refused above cir.data.images.MAX_IMAGE_PIXELS)
MAX_FILE_SIZE = f"{MAX_FILE_MB}mb"  # as Gradio's launch(max_file_size=) takes it
# any request body (cir.ui.edge): an upload, or a JSON body with a data: URL image of MAX_FILE_MB (base64: 4/3)
MAX_BODY_BYTES = (MAX_FILE_MB * 4 // 3 + 2) * 2 ** 20
MAX_SESSIONS = 1000  # visitors' sessions Gradio keeps (inputs, states); the least recently used are dropped
DELETE_CACHE = (3600, 3600)  # every hour, delete uploaded and cached files older than an hour
# the app's own files for visitors (review uploads, exports, thumbnails; cir.ui.cleanup): every ten minutes,
# delete those unused for an hour, then the least recently used until they hold at most 1 GB
CLEANUP_AGE_S, CLEANUP_EVERY_S, CLEANUP_MAX_BYTES = 3600, 600, 2 ** 30
# a triplet file the Review tab opens: CIR-Shapes lines are under 4,000 characters
MAX_REVIEW_MB = 20  # bytes of the file, in MB (5,000 CIR-Shapes lines are at most 20 MB)
MAX_REVIEW_LINES = 5000  # lines of the file
MAX_LINE_CHARS = 16 * 1024  # characters of one line (a longer one is skipped unread)
MAX_TARGETS = 16  # targets of one triplet (those naming one file are then merged)
MAX_SCENE_OBJECTS = 32  # objects per scene the "flagged" check compares (CIR-Shapes: at most 4; matching is cubic)
MAX_REQUEST_PIXELS = 24_000_000  # decoded pixels per request: one 24 MP photo (72 MB as RGB, about 1 s to decode)
# Gradio's queue keeps this many event records and summarises them every this many events
GRADIO_ANALYTICS = {"GRADIO_ANALYTICS_MAX_EVENTS": 1000, "GRADIO_ANALYTICS_CACHE_FREQUENCY": 1000}
DECODED_CACHE_PIXELS = 2 * MAX_REQUEST_PIXELS  # decoded images kept for a request's other calls (cir.ui.decoded)


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


def data_url(url: str | None) -> None:
    """UserError when `url` is a data: URL whose content exceeds MAX_FILE_MB (base64: 3 bytes per 4 characters)."""
    if isinstance(url, str) and url[:5].lower() == "data:":
        size = (len(url) - url.find(",") - 1) * 3 // 4
        if size > MAX_FILE_MB * 1024 * 1024:
            raise UserError(f"the image sent inside the request has {size / 2**20:,.0f} MB; at most {MAX_FILE_MB} MB "
                            "are accepted")


def request_pixels(pixels: int, name: str) -> None:
    """UserError when an image of `pixels` pixels (read from its header) exceeds MAX_REQUEST_PIXELS."""
    if pixels > MAX_REQUEST_PIXELS:
        raise UserError(f"cannot read image {name}: {pixels:,} pixels is over this app's limit of "
                        f"{MAX_REQUEST_PIXELS:,} per request")


def review_bytes(size: int, name: str) -> None:
    """UserError when a triplet file of `size` bytes exceeds MAX_REVIEW_MB."""
    if size > MAX_REVIEW_MB * 2 ** 20:
        raise UserError(f"{name} has {size / 2 ** 20:,.1f} MB; the Review tab opens triplet files of at most "
                        f"{MAX_REVIEW_MB} MB")


def annotator(name: str | None) -> str:
    """An annotator's name, stripped ('' for none), if within MAX_NAME_CHARS, else UserError."""
    name = (name or "").strip()
    if len(name) > MAX_NAME_CHARS:
        raise UserError(f"the annotator name has {len(name):,} characters; at most {MAX_NAME_CHARS} are kept")
    return name
