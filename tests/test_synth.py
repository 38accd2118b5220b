"""The good4cir data-generation pipeline (cir.synth) on CIR-Shapes pairs: captions checked against the
true scene operations, step-4 proportions, caching and resuming, the HTTP backend against a local
fake server (malformed answers, 429, timeouts, 5xx), the quality report and the command line."""
from __future__ import annotations

import base64
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from cir.cli import run_cli
from cir.data.shapes.dataset import generate as generate_shapes
from cir.data.shapes.scene import CELLS, Operation
from cir.data.triplets import read_triplets
from cir.errors import UserError
from cir.synth.__main__ import main, parsers
from cir.synth.backends import OpenAIBackend, PairFailed, SceneBackend
from cir.synth.pipeline import generate, read_pairs
from cir.synth.stages import Asker, Cache, Composition, check_target_objects, join_differences
from fake_llm_server import FakeLLM

NUM_PAIRS = 12


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_shapes(root / "shapes", {"train": NUM_PAIRS}, seed=7, workers=1, progress=False)
    assert main(["pairs-from-shapes", "--data", str(root / "shapes"), "--split", "train",
                 "--out", str(root / "pairs.jsonl")]) == 0
    return root / "pairs.jsonl"


@pytest.fixture(scope="module")
def scene_out(pairs_file):
    """The scene backend's triplets for every pair: 3 captions each, half multi-condition."""
    out = pairs_file.parent / "scene" / "triplets.jsonl"
    assert main(["--pairs", str(pairs_file), "--backend", "scene", "--out", str(out), "--captions-per-pair", "3",
                 "--concurrency", "2"]) == 0
    return out


def lines(path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def entry_key(e: dict) -> tuple:
    return e["name"], tuple(e["descriptors"]), e["location"]


def truth_key(o) -> tuple:
    return o.shape, (o.color, o.size), CELLS[o.cell]


def true_changes(operations: list[dict]) -> set[tuple]:
    """(before, after) of each true operation, as object-list keys (None for a missing side)."""
    out = set()
    for op in map(Operation.from_json, operations):
        if op.type == "background":
            continue  # its old color is not in the operation; checked against the scenes below
        out.add((truth_key(op.obj) if op.obj else None, truth_key(op.after) if op.after else None))
    return out


def test_scene_captions_match_the_true_scene_difference(scene_out):
    triplets, problems = read_triplets(scene_out)  # the triplet format, images and noun-phrase spans checked
    assert not problems and len({t.meta["pair_id"] for t in triplets}) == NUM_PAIRS
    for t in triplets:
        stages, pair = t.meta["stages"], t.meta["pair_meta"]
        ref, tgt = stages["reference_objects"], stages["target_objects"]
        for o in tgt:  # step 2 reuses the exact descriptors of unchanged objects
            if o["status"] == "unchanged":
                assert entry_key(o)[:2] == entry_key(ref[o["reference_index"]])[:2]
        # each single-difference caption is one real difference, and every real difference has one
        claimed = set()
        for d in stages["differences"]:
            before = entry_key(ref[d["reference_index"]]) if d["reference_index"] is not None else None
            after = entry_key(tgt[d["target_index"]]) if d["target_index"] is not None else None
            if (before or after)[0] == "background":
                assert before[1] == (pair["reference_scene"]["background"],) and after[1] == (pair["target_scene"]["background"],)
                assert "background" in d["caption"]
                continue
            claimed.add((before, after))
            assert d["type"] == ("removal" if after is None else "addition" if before is None else "modification")
            named = before or after
            assert f"{named[1][0]} {named[0]}" in d["caption"]  # "the red circle", "a small green square"
        assert claimed == true_changes(pair["operations"])
        assert len(stages["differences"]) == len(pair["operations"])
        # a multi-condition caption holds exactly the difference captions it claims
        assert t.meta["num_modifications"] == len(t.meta["conditions"]) <= 3
        for i in t.meta["conditions"]:
            assert stages["differences"][i]["caption"].rstrip(".")[1:] in t.caption
        assert t.noun_phrases and all(t.caption[p["start"]:p["end"]] == p["text"] for p in t.noun_phrases)
    assert any(t.meta["num_modifications"] > 1 for t in triplets) and t.meta["generator"]["backend"] == "scene"


@pytest.mark.parametrize("fraction,per_pair", [(0.5, 2), (1.0, 2), (0.0, 3)])
def test_multi_condition_proportion(pairs_file, tmp_path, fraction, per_pair):
    pairs = read_pairs(pairs_file)
    out = tmp_path / "t.jsonl"
    generate(pairs, SceneBackend.from_pairs(pairs), out, pairs_file.parent / "shared.cache",
             Composition(per_pair, max_conditions=2, multi_fraction=fraction), progress=False)
    by_pair: dict[str, list[int]] = {}
    for t in lines(out):
        by_pair.setdefault(t["meta"]["pair_id"], []).append(t["meta"]["num_modifications"])
    diffs = {p.id: len(p.meta["operations"]) for p in pairs}
    multi = [k for pid, ks in by_pair.items() if diffs[pid] >= 2 for k in ks]
    assert len(by_pair) == NUM_PAIRS and multi and set(multi) <= {1, 2}
    assert sum(k == 2 for k in multi) == fraction * len(multi)  # exactly, on the pairs that have 2+ differences
    for pid, ks in by_pair.items():
        if diffs[pid] == 1:
            assert ks == [1]  # one difference: one single-condition caption, never repeated


class Interrupting:
    """A backend that is killed (KeyboardInterrupt) on its call number `at`."""

    def __init__(self, inner, at: int):
        self.inner, self.at, self.calls = inner, at, 0
        self.name, self.model = inner.name, inner.model

    def complete(self, request):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.inner.complete(request)


def test_cache_rerun_and_interrupted_resume(pairs_file, tmp_path):
    pairs = read_pairs(pairs_file)
    backend, calls = SceneBackend.from_pairs(pairs), 3 * NUM_PAIRS
    first = generate(pairs, backend, tmp_path / "a.jsonl", tmp_path / "a.cache", progress=False)
    assert (first["calls"], first["done"], first["failed"]) == (calls, NUM_PAIRS, [])
    again = generate(pairs, backend, tmp_path / "a.jsonl", tmp_path / "a.cache", progress=False)
    assert (again["calls"], again["skipped"], again["triplets"]) == (0, NUM_PAIRS, 0)
    fresh_out = generate(pairs, backend, tmp_path / "b.jsonl", tmp_path / "a.cache", progress=False)
    assert (fresh_out["calls"], fresh_out["cached"]) == (0, calls)
    assert sorted(lines(tmp_path / "b.jsonl"), key=str) == sorted(lines(tmp_path / "a.jsonl"), key=str)

    # killed on call 17 of 36: the pairs finished before stay, a line cut in half is dropped on resume
    out, cache = tmp_path / "c.jsonl", tmp_path / "c.cache"
    with pytest.raises(KeyboardInterrupt):
        generate(pairs, Interrupting(backend, 17), out, cache, concurrency=1, progress=False)
    finished = {t["meta"]["pair_id"] for t in lines(out)}
    assert 1 <= len(finished) <= 5  # 16 answers: 5 whole pairs (written unless the kill came first) and a step
    with open(out, "a") as f:
        f.write('{"id": "train-0000')
    answered = len(list(cache.rglob("*.json")))  # 16, or more: the worker may start the next pair meanwhile
    resumed = generate(pairs, backend, out, cache, progress=False)
    assert answered >= 16 and (resumed["skipped"], resumed["calls"]) == (len(finished), calls - answered)
    assert sorted(lines(out), key=str) == sorted(lines(tmp_path / "a.jsonl"), key=str)

    with pytest.raises(UserError, match="other settings .*seed"):
        generate(pairs, backend, out, cache, Composition(seed=1), progress=False)


def test_http_backend_retries_malformed_429_timeouts_and_5xx(pairs_file, tmp_path):
    pairs = read_pairs(pairs_file)[:4]
    scenes = SceneBackend.from_pairs(pairs)
    with FakeLLM(scenes, faults=["malformed", "429", "slow", "500"], retry_after=1.0, slow=1.5) as server:
        backend = OpenAIBackend(server.url, "fake-model", api_key="sk-test", timeout=0.5, max_attempts=4, backoff=0.05)
        counts = generate(pairs, backend, tmp_path / "http.jsonl", tmp_path / "http.cache", concurrency=1, progress=False)
    assert counts["failed"] == [] and counts["done"] == 4 and counts["malformed"] == 1
    assert len(server.requests) == 3 * 4 + 4  # one extra request per fault
    times = [r[0] for r in server.requests]
    kinds = [r[2] for r in server.requests]
    assert times[kinds.index("429") + 1] - times[kinds.index("429")] >= 0.99  # Retry-After honoured
    waited = times[kinds.index("slow") + 1] - times[kinds.index("slow")]
    assert 0.5 <= waited < 1.5  # gave up at the client's timeout and retried
    images = {base64.b64encode(Path(p).read_bytes()).decode() for pair in pairs for p in (pair.reference, pair.target)}
    for _, body, _ in server.requests:
        assert body["model"] == "fake-model"
        for part in body["messages"][0]["content"]:
            if part["type"] == "image_url":
                head, data = part["image_url"]["url"].split(",", 1)
                assert head == "data:image/png;base64" and data in images
    assert sum(p["type"] == "image_url" for _, b, _ in server.requests for p in b["messages"][0]["content"]) >= 8
    # the same stage code: the HTTP run's stage outputs and captions are the scene backend's
    generate(pairs, scenes, tmp_path / "scene.jsonl", tmp_path / "scene.cache", progress=False)
    view = lambda path: sorted((t["id"], t["caption"], json.dumps(t["meta"]["stages"])) for t in lines(path))
    assert view(tmp_path / "http.jsonl") == view(tmp_path / "scene.jsonl")


def test_http_server_down_loses_no_completed_item(pairs_file, tmp_path):
    pairs = read_pairs(pairs_file)[:5]
    out, cache = tmp_path / "t.jsonl", tmp_path / "t.cache"
    with FakeLLM(SceneBackend.from_pairs(pairs), faults=[None] * 7 + ["500"] * 200) as server:
        backend = OpenAIBackend(server.url, "m", timeout=5, max_attempts=2, backoff=0.01)
        down = generate(pairs, backend, out, cache, concurrency=2, progress=False)
        assert down["failed"] and down["done"] + len(down["failed"]) == 5 and down["done"] >= 1
        assert {t["meta"]["pair_id"] for t in lines(out)} == {p.id for p in pairs} - {f.split(":")[0] for f in down["failed"]}
        server.faults.clear()
        before = len(server.requests)
        up = generate(pairs, backend, out, cache, concurrency=2, progress=False)
        assert up["failed"] == [] and up["skipped"] == down["done"]
        assert len(server.requests) - before == 3 * 5 - 7  # the 7 answers of the first run came from the cache
    assert sorted(t["meta"]["pair_id"] for t in lines(out) if t["id"].endswith("-c0")) == sorted(p.id for p in pairs)


def test_malformed_answers_are_retried_with_the_reason_then_fail(tmp_path):
    class Scripted:
        name = model = "scripted"

        def __init__(self, answers):
            self.answers, self.prompts = list(answers), []

        def complete(self, request):
            self.prompts.append(request.prompt)
            return self.answers.pop(0)

    good = '```json\n{"objects": [{"name": "dog", "descriptors": ["brown"], "location": "left"}]}\n```'
    backend = Scripted(["not json", '{"objects": []}', good])
    asker = Asker(backend, Cache(tmp_path), max_attempts=3)
    assert asker.ask("step1", "P", [], {})["objects"][0]["name"] == "dog"
    assert backend.prompts[0] == "P" and "not JSON" in backend.prompts[1] and "schema violation" in backend.prompts[2]
    with pytest.raises(PairFailed, match="2 attempt"):
        Asker(Scripted(["{}", "[]"]), Cache(tmp_path), max_attempts=2).ask("step1", "Q", [], {})
    ref = [{"name": "dog", "descriptors": ["brown"], "location": "left"}]
    with pytest.raises(Exception, match="copy name and descriptors"):
        check_target_objects(ref, [{"status": "unchanged", "reference_index": 0, "name": "dog",
                                    "descriptors": ["brown", "big"], "location": "left"}])


def test_join_keeps_mention_spans_and_falls_back_to_the_parser():
    diffs = [{"caption": "Remove the blue star.", "mentions": ["the blue star"]},
             {"caption": "make the red circle larger", "mentions": ["the red circle"]},
             {"caption": "use a pink background"}]
    text, phrases = join_differences(diffs, [0, 1], random.Random(0))
    assert text.startswith("Remove the blue star") and "ake the red circle larger" in text and ".." not in text
    assert [p["text"] for p in phrases] == ["the blue star", "the red circle"]
    assert all(text[p["start"]:p["end"]] == p["text"] for p in phrases)
    text, phrases = join_differences(diffs, [2], random.Random(0))
    assert text == "use a pink background" and [p["text"] for p in phrases] == ["a pink background"]


def test_report_mentions_and_ranks(scene_out, pairs_file, tiny_checkpoint, tmp_path, capsys):
    report_json = tmp_path / "report.json"
    assert main(["report", "--triplets", str(scene_out), "--json", str(report_json),
                 "--checkpoint", str(tiny_checkpoint)]) == 0
    result = json.loads(report_json.read_text())
    rows = {r["id"]: r for r in result["triplets"]}
    triplets = lines(scene_out)
    gallery = result["summary"]["rank"]["gallery"]
    assert gallery == 2 * NUM_PAIRS and result["summary"]["sources"]["scene"] == len(triplets)
    for t in triplets:  # complete exactly when the caption joins all of its pair's differences
        row = rows[t["id"]]
        assert row["complete"] == (len(t["meta"]["conditions"]) == len(t["meta"]["stages"]["differences"]))
        assert 1 <= row["rank"] <= gallery
    assert "mentions every changed object" in capsys.readouterr().out
    # the original CIR-Shapes captions name every change
    main(["report", "--triplets", str(pairs_file.parent / "shapes" / "train.jsonl"), "--json", str(report_json)])
    assert json.loads(report_json.read_text())["summary"]["complete_pct"] == 100.0


def test_help_explains_every_flag():
    for parser in parsers().values():
        assert all(action.help for action in parser._actions)
    r = subprocess.run([sys.executable, "-m", "cir.synth", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "pairs-from-shapes" in r.stdout and "--multi-fraction" in r.stdout


def one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        run_cli(main, argv)
    err = capsys.readouterr().err.rstrip("\n").split("\n")[-1]  # (after a progress bar, if any)
    assert e.value.code == 2 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_user_mistakes_are_one_line_errors(pairs_file, tmp_path, capsys):
    out = str(tmp_path / "t.jsonl")
    base = ["--pairs", str(pairs_file), "--backend", "scene", "--out", out]
    assert "pairs file not found" in one_line_error(capsys, ["--pairs", "nope.jsonl", "--backend", "scene", "--out", out])
    assert "--multi-fraction" in one_line_error(capsys, base + ["--multi-fraction", "1.5"])
    assert "--max-conditions" in one_line_error(capsys, base + ["--max-conditions", "1"])
    assert "unrecognized" in one_line_error(capsys, base + ["--bogus"])
    assert "--backend" in one_line_error(capsys, ["--pairs", str(pairs_file), "--out", out])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "reference": "x.png"}\n')
    assert "bad.jsonl:1" in one_line_error(capsys, ["--pairs", str(bad), "--backend", "scene", "--out", out])
    plain = pairs_file.parent / "plain.jsonl"  # beside the images' folder: the same relative paths
    plain.write_text("".join(json.dumps({k: v for k, v in p.items() if k != "meta"}) + "\n" for p in lines(pairs_file)))
    assert "needs CIR-Shapes scenes" in one_line_error(capsys, ["--pairs", str(plain), "--backend", "scene", "--out", out])
    with FakeLLM(SceneBackend.from_pairs(read_pairs(pairs_file)), faults=["401"]) as server:
        assert "HTTP 401" in one_line_error(capsys, ["--pairs", str(pairs_file), "--backend", "openai", "--out", out,
                                                     "--base-url", server.url, "--concurrency", "1"])
    assert "cannot reach" in one_line_error(capsys, ["--pairs", str(pairs_file), "--backend", "openai", "--out", out,
                                                     "--base-url", "http://127.0.0.1:9/v1"])
