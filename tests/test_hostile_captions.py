"""Hostile captions (tests/hostile_inputs.HOSTILE_CAPTIONS plus lone surrogates) through the query
encoder, noun-phrase extraction and the app's retrieve and attention callbacks; property-based tests
over random Unicode for the noun-phrase -> token-span mapping."""
import json

import gradio as gr
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cir.data.images import load_rgb
from cir.data.triplets import BadLine, read_triplets
from cir.errors import UserError
from cir.text.phrases import extract_noun_phrases
from cir.text.tokenizer import CaptionTokenizer
from cir.ui import limits, retrieve_tab, review, why_panel
from cir.ui.explorer import phrase_spans
from hostile_inputs import HOSTILE_CAPTIONS, one_line

CAPTIONS = dict(HOSTILE_CAPTIONS, **{"lone-surrogates": "make the \ud800 red circle \udfff blue"})
CONTEXT = 40  # the tiny config's context length
TOKENIZER = CaptionTokenizer(CONTEXT)

# random Unicode, surrogates and unassigned code points included, mixed with pieces that take the
# tokenizer's harder paths: HTML entities, mojibake, ligatures, case expansions, combining marks
PIECES = ["&amp;", "&lt;b&gt;", "&#128308;", "&amp;amp;", "Ã©", "â€™", "\x80ß", "ﬁ", "İ", "ß", "Σ", "\u00a0",
          "  ", "\t", "\n", "red", "circle", "the", "at", "top", "left", "e\u0301", "ｆｕｌｌ", "\x00", "\ud83d", "😀"]
UNICODE = st.text(st.characters(exclude_categories=()), max_size=8)
CAPTION = st.lists(st.one_of(UNICODE, st.sampled_from(PIECES)), max_size=14).map(" ".join)
FOUND = ["&amp;&amp;e\u0301&amp;", "\x80ß &amp; 0", "Ã©0AÀ\x85"]  # cases hypothesis found (now fixed)


@pytest.mark.parametrize("name", list(CAPTIONS))
def test_caption_through_encoder_phrases_and_callbacks(ex, name):
    caption = CAPTIONS[name]
    image = ex.examples[0].reference
    q = ex.model.encode_query(ex.preprocess(load_rgb(image))[None], [caption])
    assert q.shape == (1, ex.model.config.embed_dim) and torch.isfinite(q).all()
    assert abs(float(q.norm()) - 1) < 1e-4

    phrases = ex.noun_phrases(caption)
    assert len(phrases) <= 10
    assert all(0 <= p["start"] < p["end"] <= len(caption) and caption[p["start"]:p["end"]] == p["text"] for p in phrases)

    if len(caption) > limits.MAX_CAPTION_CHARS:  # refused at the app's entry, in one line
        for call in (lambda: retrieve_tab.run_retrieve(ex, image, None, caption, 5),
                     lambda: why_panel.attention(ex, image, caption, [], None, "mean", "mean", 0.005)):
            with pytest.raises(gr.Error, match=f"at most {limits.MAX_CAPTION_CHARS:,}") as e:
                call()
            assert one_line(str(e.value))
        caption = caption[:limits.MAX_CAPTION_CHARS]
        phrases = ex.noun_phrases(caption)
    if not caption.strip():  # an empty modification asks for one instead of searching
        with pytest.raises(gr.Error, match="type a modification") as e:
            retrieve_tab.run_retrieve(ex, image, None, caption, 5)
        assert one_line(str(e.value))
        caption += "."  # still no noun phrase
    _, table, status, paths, _ = retrieve_tab.run_retrieve(ex, image, None, caption, 5)
    assert len(paths) == 5 and len(table) == 5
    rows, owner, maps, cc, info = why_panel.attention(ex, image, caption, [], None, "mean", "mean", 0.005)
    assert owner == caption and len(rows) == len(phrases) and len(cc) == len(phrases)
    assert (maps is None) == (not phrases or all(isinstance(c, str) for _, c in cc))
    truncated = TOKENIZER.truncated(caption)
    assert ("Caption truncated" in status) == truncated and ("Caption truncated" in info) == truncated
    if name == "10k-characters":
        assert truncated and f"of {limits.MAX_CAPTION_CHARS:,} characters are used" in status
    if name == "more-than-10-phrases":
        assert len(phrases) == 10
    if name in ("empty", "whitespace", "no-noun-phrase"):
        assert phrases == [] and maps is None and "0 phrase(s)" in info


def test_surrogates_cannot_reach_files(tmp_path):
    """Lone surrogates are fine in a query (the tokenizer and parser see U+FFFD) but are not text that
    can be written as UTF-8: a review edit refuses them, and a triplet file holding one (as a JSON
    escape) reports that line."""
    with pytest.raises(UserError, match="lone surrogate") as e:
        review.decision("x", "edit", caption="make it \ud800 red")
    assert one_line(str(e.value))
    with pytest.raises(UserError, match="lone surrogate"):
        review.decision("x", "reject", note="\udfff")
    good = tmp_path / "a.png"
    from PIL import Image
    Image.new("RGB", (8, 8)).save(good)
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"id": "1", "reference": "a.png", "caption": "ok", "targets": ["a.png"]}) + "\n"
                    + '{"id": "2", "reference": "a.png", "caption": "bad \\ud800", "targets": ["a.png"]}\n')
    triplets, problems = read_triplets(path, skip_bad=True)
    assert [t.id for t in triplets] == ["1"] and "t.jsonl:2" in problems[0] and "lone surrogate" in problems[0]
    with pytest.raises(BadLine):
        read_triplets(path)


def test_hostile_widget_values(ex):
    """Values no widget sends but the HTTP API can: odd top-k, phrase rows with odd spans."""
    image = ex.examples[0].reference
    for k, n in ((0, 1), (-5, 1), ("7", 7), (7.0, 7), (" 3 ", 3), (10 ** 12, len(ex.index))):
        assert len(retrieve_tab.run_retrieve(ex, image, None, "make it red", k)[3]) == n
    for k in (float("nan"), float("inf"), None, "many", "abc", 2.7, "2.7", True, False, [3]):
        with pytest.raises(gr.Error) as e:
            retrieve_tab.run_retrieve(ex, image, None, "make it red", k)
        assert one_line(e.value.message) and "top k" in e.value.message
    caption = "make the red circle blue"
    rows = [["the red circle", float("inf"), float("nan")], ["blue", 10 ** 30, -1], [None], [], ["", 1, 2]]
    assert phrase_spans(caption, rows) == [{"text": "the red circle", "start": 5, "end": 19},
                                           {"text": "blue", "start": 20, "end": 24}]
    with pytest.raises(gr.Error):
        why_panel.add_phrase(caption, [], "\ud800 not there")


# ---------------------------------------------------------------------------- properties
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
          database=None)
@given(CAPTION, st.data())
@example(FOUND[0], None)
@example(FOUND[1], None)
@example(FOUND[2], None)
def test_token_spans_of_random_unicode(text, data):
    """The ids are open_clip's, every token's character span lies in the text (never empty, in text
    order), the whole text covers every kept token, and any character span maps to sorted, distinct
    positions inside [1, context_length - 2]."""
    ids, offsets = TOKENIZER.encode_with_offsets(text)
    kept = min(len(ids), CONTEXT - 2)
    assert TOKENIZER([text])[0, 1:1 + kept].tolist() == ids[:kept]
    assert all(0 <= s < e <= len(text) for s, e in offsets)
    assert [e for _, e in offsets] == sorted(e for _, e in offsets)
    if text:
        assert TOKENIZER.span_to_token_positions(text, 0, len(text)) == list(range(1, kept + 1))
    if text and data is not None:
        start = data.draw(st.integers(0, len(text) - 1))
        end = data.draw(st.integers(start + 1, len(text)))
        pos = TOKENIZER.span_to_token_positions(text, start, end)
        assert pos == sorted(set(pos)) and all(1 <= p <= CONTEXT - 2 for p in pos)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
          database=None)
@given(CAPTION)
@example(FOUND[1])
def test_spacy_phrase_spans_of_random_unicode(text):
    """spaCy's noun phrases: at most 10, distinct, inside the caption and equal to its text there; each
    maps to token positions inside the context, and to at least one when the phrase has tokens of its
    own and the caption is not truncated."""
    (phrases,) = extract_noun_phrases([text])
    assert len(phrases) <= 10 and len({(p["start"], p["end"]) for p in phrases}) == len(phrases)
    for p in phrases:
        assert 0 <= p["start"] < p["end"] <= len(text) and text[p["start"]:p["end"]] == p["text"]
        pos = TOKENIZER.span_to_token_positions(text, p["start"], p["end"])
        assert pos == sorted(set(pos)) and all(1 <= q <= CONTEXT - 2 for q in pos)
        if not TOKENIZER.truncated(text) and TOKENIZER.encode_with_offsets(p["text"])[0]:
            assert pos, p
