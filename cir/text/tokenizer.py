"""CLIP BPE tokenization with exact character offsets into the original caption.

open_clip's `SimpleTokenizer` cleans a caption (ftfy fix, HTML-unescape twice, whitespace
collapse, lowercase), splits it into regex words and BPE-encodes each word's UTF-8 bytes; it gives
ids but no offsets. `CaptionTokenizer` produces the same ids (its `__call__` *is* open_clip's) and,
for each BPE token, the span of ORIGINAL characters it came from, so that a noun phrase's
character span can be turned into the token positions it occupies inside the whole caption.

How offsets are mapped back (every cleaned character carries the [start, end) span of original
characters it came from):
1. Exact: the cleaning is replayed step by step while carrying spans: ftfy (identity when ftfy
   leaves the text alone, otherwise ftfy applied character by character, which covers curly
   quotes, ligatures, full-width forms and control characters), ftfy's own HTML unescape (tried
   with and without), `html.unescape` twice, whitespace collapse and per-character lowercasing.
   An entity such as "&amp;" maps to its whole source span. The replay is accepted only if it
   yields exactly open_clip's cleaned text.
2. Fallback (text ftfy changes in a way that is not character-local: mojibake, Unicode NFC
   composition): each regex word of the cleaned text is searched case-insensitively in the
   original from a cursor; a word not found (or found only after skipping implausibly much text)
   gets the whole gap between its found neighbours (conservative: too wide, never missing), and
   original text no word came from (the rest of an entity) joins the word before it.
A BPE token that splits a multi-byte character shares that character's span with its neighbour.
"""
from __future__ import annotations

import bisect
import html
import itertools
import threading
from functools import lru_cache

import ftfy
import regex
import torch
from cachetools import LRUCache, cached
from ftfy.chardata import HTML_ENTITY_RE
from ftfy.fixes import unescape_html
from open_clip.tokenizer import SimpleTokenizer

Span = tuple[int, int]

# the pattern html.unescape substitutes (CPython's html._charref)
_HTML_CHARREF = regex.compile(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)")


def _sub_mapped(pattern, repl, text: str, spans: list[Span]) -> tuple[str, list[Span]]:
    """`pattern.sub(repl, text)` that also carries per-character source spans.

    Every character of a replacement gets the span covering the whole match."""
    out, out_spans, pos = [], [], 0
    for m in pattern.finditer(text):
        out.append(text[pos:m.start()])
        out_spans.extend(spans[pos:m.start()])
        rep = repl(m)
        out.append(rep)
        out_spans.extend([(spans[m.start()][0], spans[m.end() - 1][1])] * len(rep))
        pos = m.end()
    out.append(text[pos:])
    out_spans.extend(spans[pos:])
    return "".join(out), out_spans


@lru_cache(maxsize=65536)
def _ftfy_char(c: str) -> str:
    return ftfy.fix_text(c, unescape_html=False)


def _ftfy_per_char(text: str, spans: list[Span]) -> tuple[str, list[Span]]:
    out, out_spans = [], []
    for c, span in zip(text, spans):
        fixed = _ftfy_char(c)
        out.append(fixed)
        out_spans.extend([span] * len(fixed))
    return "".join(out), out_spans


def _ftfy_unescape(text: str, spans: list[Span]) -> tuple[str, list[Span]]:
    """ftfy's HTML unescape, applied until nothing changes (as ftfy's fix loop does)."""
    while True:
        new, spans = _sub_mapped(HTML_ENTITY_RE, lambda m: unescape_html(m.group()), text, spans)
        if new == text:
            return text, spans
        text = new


def _html_unescape(text: str, spans: list[Span]) -> tuple[str, list[Span]]:
    return _sub_mapped(_HTML_CHARREF, lambda m: html.unescape(m.group()), text, spans)


def _collapse_whitespace(text: str, spans: list[Span]) -> tuple[str, list[Span]]:
    """`" ".join(text.split())`; a collapsed space maps to the whole whitespace run."""
    out, out_spans, pos = [], [], 0
    for space, run in itertools.groupby(text, str.isspace):
        n = len(list(run))
        if not space:
            out.append(text[pos:pos + n])
            out_spans.extend(spans[pos:pos + n])
        elif 0 < pos and pos + n < len(text):
            out.append(" ")
            out_spans.append((spans[pos][0], spans[pos + n - 1][1]))
        pos += n
    return "".join(out), out_spans


def _lower(text: str, spans: list[Span]) -> tuple[str, list[Span]]:
    """`text.lower()` (context-dependent: final sigma); spans follow per-character lengths ("İ" -> 2)."""
    return text.lower(), [span for c, span in zip(text, spans) for _ in c.lower()]


def _exact_spans(text: str, cleaned: str) -> list[Span] | None:
    """Per-character source spans of `cleaned`, or None if the replay does not reproduce it."""
    spans = [(i, i + 1) for i in range(len(text))]
    if ftfy.fix_text(text, unescape_html=False) != text:
        text, spans = _ftfy_per_char(text, spans)
    for ftfy_unescape in (False, True):
        t, s = _ftfy_unescape(text, spans) if ftfy_unescape else (text, spans)
        t, s = _html_unescape(*_html_unescape(t, s))
        t, s = _lower(*_collapse_whitespace(t, s))
        if t == cleaned and len(s) == len(cleaned):
            return s
    return None


SEARCH_WINDOW = 1024  # characters past the cursor (plus 4 per word character) a word is looked for in
LONG_WORD = 64  # longer words are matched exactly instead of case-insensitively


def _find_word(text: str, word: str, cursor: int) -> tuple[int, int] | None:
    """[start, end) of the first occurrence of cleaned `word` in `text` at or after `cursor`, within
    a window of SEARCH_WINDOW + 4 x len(word) characters: case-insensitively (full case folding)
    for words of up to LONG_WORD characters, exactly (`str.find`) for longer ones. Each call costs
    O(window), so the fallback is linear in the caption (a case-folding search of a long word over
    the whole text is not: a letter with 4,000 combining marks took 30 s)."""
    end = min(len(text), cursor + SEARCH_WINDOW + 4 * len(word))
    if len(word) > LONG_WORD:
        i = text.find(word, cursor, end)
        return None if i < 0 else (i, i + len(word))
    m = regex.compile(regex.escape(word), regex.IGNORECASE | regex.FULLCASE).search(text, cursor, end)
    return None if m is None else m.span()


def _fallback_spans(text: str, cleaned: str, pat) -> list[Span]:
    """Per-character source spans of `cleaned` found by searching its regex words in `text`."""
    spans: list[Span] = [(0, 0)] * len(cleaned)
    cursor, pending = 0, []  # pending: cleaned-word matches not found yet
    last_start = 0  # where the last word found starts

    def fill_gap(gap_end: int) -> None:
        gap = text[cursor:gap_end]
        lo = cursor + len(gap) - len(gap.lstrip())
        hi = max(lo, cursor + len(gap.rstrip()))
        if lo == hi:  # no text left for them: share the last found word's (too wide, never empty)
            lo = min(last_start, lo)
            hi = max(hi, min(len(text), lo + 1))
        for w in pending:
            spans[w.start():w.end()] = [(lo, hi)] * (w.end() - w.start())
        pending.clear()
        nonlocal pending_chars
        pending_chars = 0

    pending_chars = 0
    for w in pat.finditer(cleaned):
        budget = 8 + 4 * pending_chars
        found = _find_word(text, w.group(), cursor)
        skipped = len("".join(text[cursor:found[0]].split())) if found is not None else 0
        # not found, found only after implausibly much text, or found so early that the words still
        # pending would come from no text at all (a spurious earlier occurrence): decide later
        if found is None or skipped > budget or (pending and skipped == 0):
            pending.append(w)
            pending_chars += w.end() - w.start()
            continue
        start, end = found
        fill_gap(start)
        last_start = start
        if text[start:end].lower() == w.group():
            spans[w.start():w.end()] = [(i, i + 1) for i in range(start, end)]
        else:
            spans[w.start():w.end()] = [(start, end)] * (w.end() - w.start())
        cursor = end
    fill_gap(len(text))
    return _cover_leftovers(text, spans)


def _cover_leftovers(text: str, spans: list[Span]) -> list[Span]:
    """Give each run of non-space original characters that no cleaned character came from (the
    "amp;" of "&amp;" found as "&") to the cleaned character ending last before it (else the first
    one after it), so that every original character lies in some token's span."""
    cover = [0] * (len(text) + 1)
    for s, e in spans:
        cover[s] += 1
        cover[e] -= 1
    runs, depth, start = [], 0, None
    for i, c in enumerate(text):
        depth += cover[i]
        if depth == 0 and not c.isspace():
            start = i if start is None else start
        elif start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(text)))
    chars = [i for i, (s, e) in enumerate(spans) if e > s]  # those of words (spaces between them have none)
    if not chars:
        return spans
    ends = [spans[i][1] for i in chars]  # non-decreasing: words are found left to right
    for a, b in runs:
        j = bisect.bisect_right(ends, a) - 1
        i = chars[max(j, 0)]
        spans[i] = (min(spans[i][0], a), max(spans[i][1], b))
    return spans


CACHE_BYTES = 32 * 2 ** 20  # the tokenizer's memo of encoded captions keeps at most about this much


def encoding_size(value: tuple) -> int:
    """Estimated bytes of a memo entry (ids, offsets): a Python int is 28 bytes, a tuple slot 8, about
    130 bytes per token with its offsets."""
    return 100 + 130 * len(value[0])


class CaptionTokenizer:
    """open_clip's CLIP tokenizer (`SimpleTokenizer`, 'lower' cleaning) plus character offsets.

    Sequence layout (length `context_length`): [SOT, text tokens..., EOT, 0...]; a too-long caption
    keeps its first `context_length - 2` text tokens and puts EOT in the last slot."""

    def __init__(self, context_length: int = 77):
        if context_length < 3:
            raise ValueError(f"context_length must be >= 3, got {context_length}")
        self.context_length = context_length
        self._tok = SimpleTokenizer(context_length=context_length)
        self._memo = LRUCache(CACHE_BYTES, getsizeof=encoding_size)  # an entry over the budget is not kept
        self._encode = cached(self._memo, lock=threading.Lock())(self._encode_uncached)

    def __call__(self, texts: list[str]) -> torch.LongTensor:
        """Token ids, [B, context_length] int64, identical to open_clip's tokenizer."""
        return self._tok(texts, context_length=self.context_length)

    def _encode_uncached(self, text: str) -> tuple[tuple[int, ...], tuple[Span, ...]]:
        tok = self._tok
        cleaned = tok.clean_fn(text)
        char_spans = _exact_spans(text, cleaned) or _fallback_spans(text, cleaned, tok.pat)
        ids, offsets = [], []
        for m in tok.pat.finditer(cleaned):
            byte_char = [i for i, c in enumerate(m.group()) for _ in c.encode("utf-8")]
            byte_pos = 0
            for piece in tok.bpe("".join(tok.byte_encoder[b] for b in m.group().encode("utf-8"))).split(" "):
                n_bytes = len(piece.removesuffix("</w>"))
                first = m.start() + byte_char[byte_pos]
                last = m.start() + byte_char[byte_pos + n_bytes - 1]
                ids.append(tok.encoder[piece])
                offsets.append((char_spans[first][0], char_spans[last][1]))
                byte_pos += n_bytes
        return tuple(ids), tuple(offsets)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[Span]]:
        """BPE ids of `text` (no SOT/EOT, no truncation) and, per id, its [start, end) span of
        characters in `text` (spans can be wider than the token after lossy cleaning)."""
        ids, offsets = self._encode(text)
        return list(ids), list(offsets)

    def truncated(self, text: str) -> bool:
        """Whether `text` loses tokens to the context length."""
        return len(self._encode(text)[0]) > self.context_length - 2

    def span_to_token_positions(self, text: str, start: int, end: int) -> list[int]:
        """Sorted positions in the padded sequence (SOT = 0, first text token = 1) of the tokens
        whose character span overlaps [start, end); positions lost to truncation are dropped, so
        all lie in [1, context_length - 2]."""
        _, offsets = self._encode(text)
        return [i + 1 for i, (s, e) in enumerate(offsets[:self.context_length - 2]) if s < end and e > start]
