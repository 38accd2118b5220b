"""CaptionTokenizer: open_clip-identical ids and exact character offsets / token positions."""
import open_clip
import pytest
import torch
from hypothesis import given, settings, strategies as st

from cir.text.tokenizer import CaptionTokenizer

CAPTIONS = [
    "the red circle and the red square",
    "Make the RED Circle blue, then add a small green square at the top-left!!!",
    "remove the blue star; move the orange circle to the bottom right.",
    "It's a dog's toy (isn't it?) -- 3 cats & 12 dogs, 4.5 m",
    "café crème brûlée naïve Straße",
    "add a 🐶 and a 😀😀 next to the 🌲",
    "把红色的圆变成蓝色 猫が好き",
    "أضف قطة حمراء to the left مرحبا",
    "double  spaces\tand\nnewlines   everywhere ",
    "salt &amp; pepper &lt;b&gt; &#39;quoted&#39; &amp;amp; &nbsp;x",
    "“curly quotes” and ﬁne ligatures don’t isn't",
    "İSTANBUL ΟΔΟΣ ΣΟΦΟΣ",
    "",
    "   ",
    "a " * 100,
]


@pytest.fixture(scope="module")
def tok():
    return CaptionTokenizer(77)


@pytest.fixture(scope="module")
def ref():
    return open_clip.get_tokenizer("ViT-B-32")


def test_ids_equal_open_clip(tok, ref):
    got = tok(CAPTIONS)
    assert got.dtype == torch.long and got.shape == (len(CAPTIONS), 77)
    assert torch.equal(got, ref(CAPTIONS))
    for text in CAPTIONS:
        assert tok.encode_with_offsets(text)[0] == ref.encode(text), text


def test_ids_equal_open_clip_short_context(ref):
    short = CaptionTokenizer(16)
    assert torch.equal(short(CAPTIONS), ref(CAPTIONS, context_length=16))


def pieces(tok, text):
    ids, offsets = tok.encode_with_offsets(text)
    return [text[s:e] for s, e in offsets]


def test_offsets_plain_and_casing(tok):
    text = "Make  the RED circle, please!!"
    assert pieces(tok, text) == ["Make", "the", "RED", "circle", ",", "please", "!!"]


def test_repeated_words_map_to_their_own_positions(tok):
    text = "the red circle and the red square"
    first, second = text.index("red"), text.rindex("red")
    assert tok.span_to_token_positions(text, first, first + 3) == [2]
    assert tok.span_to_token_positions(text, second, second + 3) == [6]
    assert tok.span_to_token_positions(text, second - 4, len(text)) == [5, 6, 7]  # "the red square"
    assert tok.span_to_token_positions(text, 0, 14) == [1, 2, 3]  # "the red circle"


def test_multi_token_words_and_partial_overlap(tok):
    text = "a photograph of an aardvark"
    assert pieces(tok, text) == ["a", "photograph", "of", "an", "aard", "var", "k"]  # BPE sub-word spans
    start = text.index("aardvark")
    assert tok.span_to_token_positions(text, start, start + 8) == [5, 6, 7]
    assert tok.span_to_token_positions(text, start + 1, start + 5) == [5, 6]
    assert tok.span_to_token_positions(text, start, start) == []


def test_unicode_offsets(tok):
    text = "café 😀 猫 مرحبا"
    # a CJK character is split into byte-level BPE pieces, each mapping to the whole character
    assert pieces(tok, text) == ["café", "😀", "猫", "猫", "猫", "م", "ر", "ح", "ب", "ا"]
    cat = text.index("猫")
    assert tok.span_to_token_positions(text, cat, cat + 1) == [3, 4, 5]
    assert tok.span_to_token_positions(text, text.index("مرحبا"), len(text)) == [6, 7, 8, 9, 10]
    assert tok.span_to_token_positions(text, text.index("ح"), text.index("ح") + 1) == [8]


def test_html_entities_and_whitespace(tok):
    text = "salt &amp; pepper  &lt;b&gt;\tx &nbsp; y"
    assert pieces(tok, text) == ["salt", "&amp;", "pepper", "&lt;", "b", "&gt;", "x", "y"]
    amp = text.index("&amp;")
    assert tok.span_to_token_positions(text, amp, amp + 5) == [2]
    assert tok.span_to_token_positions(text, amp + 1, amp + 2) == [2]  # inside the entity
    assert tok.span_to_token_positions(text, text.index("&nbsp;"), len(text)) == [8]  # nbsp is whitespace
    assert pieces(tok, "&amp;amp;amp;amp; a") == ["&amp;amp;amp;amp;", "a"]  # ftfy unescapes repeatedly


def test_ftfy_character_fixes(tok):
    text = "“curly” ﬁne don’t ＡＢＣ İSTANBUL ΟΔΟΣ"
    assert pieces(tok, text) == ["“", "curly", "”", "ﬁne", "don", "’t", "ＡＢＣ", "İ", "İ", "STANBUL"] + ["Ο"] * 2 + [
        "Δ"] * 2 + ["Ο"] * 2 + ["Σ"] * 2


def test_fallback_for_mojibake(tok, ref):
    # ftfy repairs the mojibake "Ã©" -> "é": not character-local, so words are searched in the original
    text = "cafÃ© with the red circle"
    assert tok.encode_with_offsets(text)[0] == ref.encode(text)
    got = pieces(tok, text)
    assert got[0] == "cafÃ©" and got[-3:] == ["the", "red", "circle"]
    red = text.index("red circle")
    assert tok.span_to_token_positions(text, red, red + 10) == [len(got) - 1, len(got)]


def test_truncation():
    tok = CaptionTokenizer(8)
    text = "one two three four five six seven eight"
    assert tok.truncated(text) and not tok.truncated("one two three four five six")
    ids = tok([text])[0].tolist()
    assert ids[-1] == 49407 and len(ids) == 8  # EOT keeps the last slot
    assert tok.span_to_token_positions(text, 0, 3) == [1]
    six = text.index("six")
    assert tok.span_to_token_positions(text, six, six + 3) == [6]
    assert tok.span_to_token_positions(text, text.index("seven"), len(text)) == []
    assert tok.span_to_token_positions(text, six, len(text)) == [6]


_TOKS = {n: CaptionTokenizer(n) for n in (4, 12, 77)}
_REF = open_clip.get_tokenizer("ViT-B-32")


@settings(max_examples=300, deadline=None)
@given(
    text=st.lists(st.one_of(st.characters(), st.sampled_from(["&amp;", "&#39;", "  ", "’", "Ã©", "red"])), max_size=40)
    .map("".join),
    a=st.integers(-5, 200),
    b=st.integers(-5, 200),
    context_length=st.sampled_from([4, 12, 77]),
)
def test_property_positions_valid(text, a, b, context_length):
    tok = _TOKS[context_length]
    ids, offsets = tok.encode_with_offsets(text)
    assert ids == _REF.encode(text) and len(ids) == len(offsets)
    assert all(0 <= s <= e <= len(text) for s, e in offsets)
    pos = tok.span_to_token_positions(text, min(a, b), max(a, b))
    assert pos == sorted(set(pos))
    assert all(1 <= p <= context_length - 2 for p in pos)

