"""The four good4cir stages over one image pair, and the checked, cached, retried LLM call behind them.

1. `step1`: the reference image's objects, each `{"name", "descriptors", "location"}`;
2. `step2`: the target's objects, each also with `"status"` (unchanged / modified / new) and
   `"reference_index"`; an unchanged object copies its step-1 name and descriptors exactly;
3. `step3`: one difference caption per change, `{"type": addition|removal|modification,
   "caption", "reference_index", "target_index", "mentions"}` (mentions: noun phrases copied from
   the caption);
4. deterministic code, not an LLM call: `Composition.plan` picks which differences each caption
   joins, `join_differences` joins them with varied phrasing, keeping the mentions as spans.

Steps 1-3 read their prompt from `prompts/step{1,2,3}_*.txt`; every answer must parse as JSON,
match the step's JSON schema and agree with the earlier steps, or the call is retried (with the
reason appended to the prompt) up to `max_attempts` times. Valid answers are cached in one JSON
file per (step, model, prompt text, image content hashes).
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Callable

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from cir.atomic import write_json
from cir.errors import UserError
from cir.synth.backends import BadAnswer, PairFailed, Request, image_hash

PROMPTS = Path(__file__).resolve().parent / "prompts"
PROMPT_FILES = {"step1": "step1_objects.txt", "step2": "step2_target_objects.txt", "step3": "step3_differences.txt"}
PROMPT_INPUTS = {"step1": set(), "step2": {"reference_objects"}, "step3": {"reference_objects", "target_objects"}}
RETRY_NOTE = "Your previous answer was rejected: {}. Answer again with JSON only, in the form asked for."
MAX_PHRASES = 10  # noun phrases kept per caption (the paper's cap, as in cir.text.phrases)

_OBJECT = {"type": "object", "required": ["name", "descriptors", "location"],
           "properties": {"name": {"type": "string", "minLength": 1},
                          "descriptors": {"type": "array", "items": {"type": "string"}},
                          "location": {"type": "string"}}}
_TARGET_OBJECT = {"allOf": [_OBJECT, {"type": "object", "required": ["status", "reference_index"],
                                      "properties": {"status": {"enum": ["unchanged", "modified", "new"]},
                                                     "reference_index": {"type": ["integer", "null"], "minimum": 0}}}]}
_DIFFERENCE = {"type": "object", "required": ["type", "caption", "reference_index", "target_index"],
               "properties": {"type": {"enum": ["addition", "removal", "modification"]},
                              "caption": {"type": "string", "pattern": "\\w"},
                              "reference_index": {"type": ["integer", "null"], "minimum": 0},
                              "target_index": {"type": ["integer", "null"], "minimum": 0},
                              "mentions": {"type": "array", "items": {"type": "string", "minLength": 1}}}}
SCHEMAS = {
    "step1": {"type": "object", "required": ["objects"],
              "properties": {"objects": {"type": "array", "minItems": 1, "items": _OBJECT}}},
    "step2": {"type": "object", "required": ["objects"],
              "properties": {"objects": {"type": "array", "items": _TARGET_OBJECT}}},
    "step3": {"type": "object", "required": ["differences"],
              "properties": {"differences": {"type": "array", "items": _DIFFERENCE}}},
}
_VALIDATORS = {step: Draft202012Validator(schema) for step, schema in SCHEMAS.items()}
# Step 4 joins: (separator, whether the next clause starts a new sentence).
JOINS = ((" and ", False), (", then ", False), ("; ", False), (", and also ", False), (". ", True),
         (" and then ", False), (", plus ", False))


# ----------------------------------------------------------------------------- prompts

class Prompts:
    """The three prompt templates of a folder (`$reference_objects`, `$target_objects` slots)."""

    def __init__(self, folder: str | Path = PROMPTS):
        self.templates, self.hashes = {}, {}
        for step, name in PROMPT_FILES.items():
            path = Path(folder) / name
            if not path.is_file():
                raise UserError(f"prompt file not found: {path}")
            text = path.read_text(encoding="utf-8")
            template = Template(text)
            if not template.is_valid() or set(template.get_identifiers()) != PROMPT_INPUTS[step]:
                need = ", ".join(f"${k}" for k in sorted(PROMPT_INPUTS[step])) or "none"
                raise UserError(f"{path}: the prompt's $-slots must be exactly: {need} (write $$ for a literal $)")
            self.templates[step] = template
            self.hashes[name] = hashlib.sha256(text.encode()).hexdigest()

    def render(self, step: str, **inputs: list[dict]) -> str:
        return self.templates[step].substitute({k: json.dumps({"objects": v}, ensure_ascii=False) for k, v in inputs.items()})


# ----------------------------------------------------------------------------- checked, cached calls

def parse_answer(text: str, step: str) -> dict:
    """The JSON object of an answer (a ```json fence around it is tolerated), schema-checked."""
    s = text.strip()
    if s.startswith("```"):
        s = s.partition("\n")[2].rpartition("```")[0]
    try:
        obj = json.loads(s)
    except json.JSONDecodeError as e:
        raise BadAnswer(f"not JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if (err := best_match(_VALIDATORS[step].iter_errors(obj))) is not None:
        raise BadAnswer(f"schema violation at {err.json_path}: {err.message}")
    return obj


class Cache:
    """Valid answers, one JSON file per key: `folder/<step>/<key[:2]>/<key>.json` holding the key's
    parts (step, model, prompt, image hashes) and the answer. Written atomically."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def _path(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return self.folder / key["step"] / digest[:2] / f"{digest}.json"

    def get(self, key: dict) -> dict | None:
        try:
            record = json.loads(self._path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return record["answer"] if record.get("key") == key else None

    def put(self, key: dict, answer: dict) -> None:
        write_json(self._path(key), {"key": key, "answer": answer})


class Asker:
    """Asks a backend one step, through the cache, retrying malformed answers. Thread-safe.

    `stats` counts backend `calls`, `cached` answers and `malformed` answers."""

    def __init__(self, backend, cache: Cache, max_attempts: int = 4):
        self.backend, self.cache, self.max_attempts = backend, cache, max_attempts
        self.stats: Counter = Counter()
        self._lock = threading.Lock()

    def _count(self, what: str) -> None:
        with self._lock:
            self.stats[what] += 1

    def ask(self, step: str, prompt: str, images: list[str], inputs: dict,
            check: Callable[[dict], None] = lambda answer: None) -> dict:
        key = {"step": step, "model": self.backend.model, "prompt": prompt, "images": [image_hash(p) for p in images]}
        if (answer := self.cache.get(key)) is not None:
            self._count("cached")
            return answer
        error = None
        for _ in range(self.max_attempts):
            text = prompt if error is None else f"{prompt}\n\n{RETRY_NOTE.format(error)}"
            self._count("calls")
            try:
                answer = parse_answer(self.backend.complete(Request(step, text, tuple(images), inputs)), step)
                check(answer)
            except BadAnswer as e:
                error = str(e)
                self._count("malformed")
                continue
            self.cache.put(key, answer)
            return answer
        raise PairFailed(f"{step}: no valid answer in {self.max_attempts} attempt(s); last: {error}")


# ----------------------------------------------------------------------------- steps 1-3

def check_target_objects(reference: list[dict], target: list[dict]) -> None:
    """Step 2 must relate each target object to at most one reference object, copy unchanged ones and
    describe modified ones differently."""
    used = set()
    for j, o in enumerate(target):
        i = o["reference_index"]
        if (o["status"] == "new") != (i is None):
            raise BadAnswer(f"objects[{j}]: reference_index must be null exactly for a 'new' object")
        if i is None:
            continue
        if i >= len(reference) or i in used:
            raise BadAnswer(f"objects[{j}]: reference_index {i} is not a first-list object (0..{len(reference) - 1}) "
                            "or is used twice")
        used.add(i)
        same = [o[k] == reference[i][k] for k in ("name", "descriptors", "location")]
        if o["status"] == "unchanged" and not all(same[:2]):
            raise BadAnswer(f"objects[{j}]: an unchanged object must copy name and descriptors of first-list object {i} exactly")
        if o["status"] == "modified" and all(same):
            raise BadAnswer(f"objects[{j}]: a modified object must differ from first-list object {i} in name, "
                            "descriptors or location")


def _changes(reference: list[dict], target: list[dict]) -> set[tuple]:
    """(type, reference_index, target_index) of every change that steps 1-2 imply."""
    referenced = {o["reference_index"] for o in target}
    out = {("removal", i, None) for i in range(len(reference)) if i not in referenced}
    return out | {("addition" if o["status"] == "new" else "modification", o["reference_index"], j)
                  for j, o in enumerate(target) if o["status"] != "unchanged"}


def check_differences(reference: list[dict], target: list[dict], differences: list[dict]) -> None:
    """Step 3 must give exactly one caption per change, its mentions copied from the caption."""
    got = [(d["type"], d["reference_index"], d["target_index"]) for d in differences]
    expected = _changes(reference, target)
    if len(set(got)) != len(got) or set(got) != expected:
        show = lambda items: ", ".join(sorted(f"({t}, {i}, {j})" for t, i, j in items)) or "none"
        raise BadAnswer(f"need exactly one difference per change, as (type, reference_index, target_index): "
                        f"{show(expected)}; got {show(got)}")
    for k, d in enumerate(differences):
        for m in d.get("mentions", []):
            if m not in d["caption"]:
                raise BadAnswer(f"differences[{k}]: mention {m!r} is not copied verbatim from its caption")


def describe_pair(asker: Asker, prompts: Prompts, reference: str, target: str) -> dict:
    """Steps 1-3 for one image pair: {"reference_objects", "target_objects", "differences"}."""
    ref = asker.ask("step1", prompts.render("step1"), [reference], {})["objects"]
    inputs = {"reference_objects": ref}
    tgt = asker.ask("step2", prompts.render("step2", **inputs), [target], inputs,
                    lambda a: check_target_objects(ref, a["objects"]))["objects"]
    inputs = {"reference_objects": ref, "target_objects": tgt}
    diffs = asker.ask("step3", prompts.render("step3", **inputs), [], inputs,
                      lambda a: check_differences(ref, tgt, a["differences"]))["differences"]
    return {"reference_objects": ref, "target_objects": tgt, "differences": diffs}


# ----------------------------------------------------------------------------- step 4

@dataclass(frozen=True)
class Composition:
    """Step 4 settings: captions per pair, conditions per multi-condition caption, their share."""

    captions_per_pair: int = 2
    max_conditions: int = 3
    multi_fraction: float = 0.5
    seed: int = 0

    def __post_init__(self):
        if self.captions_per_pair < 1:
            raise UserError("--captions-per-pair must be at least 1")
        if not 0 <= self.multi_fraction <= 1:
            raise UserError("--multi-fraction must be between 0 and 1")
        if self.max_conditions < (2 if self.multi_fraction > 0 else 1):
            raise UserError("--max-conditions must be at least 2 for multi-condition captions (or --multi-fraction 0)")

    def plan(self, num_differences: int, pair_index: int, rng: random.Random) -> list[list[int]]:
        """Which differences each caption of a pair joins, in order.

        Output number g = pair_index * captions_per_pair + j is multi-condition when
        floor((g + 1) * f) > floor(g * f): exactly the fraction f of any run of outputs, as far as
        the pairs allow (a pair with one difference only gives single-condition captions).
        Single-condition captions take the pair's differences in turn, each at most once (so a pair
        with few differences may give fewer captions)."""
        f, out, singles = self.multi_fraction, [], list(range(num_differences))
        rng.shuffle(singles)
        for j in range(self.captions_per_pair):
            g = pair_index * self.captions_per_pair + j
            if num_differences >= 2 and math.floor((g + 1) * f) > math.floor(g * f):
                out.append(rng.sample(range(num_differences), rng.randint(2, min(self.max_conditions, num_differences))))
            elif singles:
                out.append([singles.pop()])
        return out


def _mention_spans(text: str, mentions: list[str]) -> list[tuple[int, int]] | None:
    """Character spans of the mentions in `text` (searched in order), or None when unknown."""
    spans, cursor = [], 0
    for m in mentions:
        i = text.find(m, cursor)
        if i < 0:
            i = text.find(m)
        if i < 0:
            return None
        spans.append((i, i + len(m)))
        cursor = i
    return spans or None


def _lead(clause: str, upper: bool) -> str:
    """Recase the first letter of a joined clause (an all-caps first word or "I" is kept)."""
    word = clause.split(maxsplit=1)[0]
    if not upper and (word == "I" or (len(word) > 1 and word.isupper())):
        return clause
    return (clause[0].upper() if upper else clause[0].lower()) + clause[1:]


def join_differences(differences: list[dict], order: list[int], rng: random.Random) -> tuple[str, list[dict]]:
    """One caption from the differences `order` names, and its noun phrases as character spans:
    the step-3 mentions, or the spaCy noun phrases of cir.text.phrases when some mention is unknown."""
    text, spans, known = "", [], True
    for n, i in enumerate(order):
        clause = differences[i]["caption"].strip()
        if len(order) > 1:
            clause = clause.rstrip(" .!;,")
        if n:
            sep, upper = rng.choice(JOINS)
            text, clause = text + sep, _lead(clause, upper)
        found = _mention_spans(clause, differences[i].get("mentions", []))
        known = known and found is not None
        spans += [(len(text) + s, len(text) + e) for s, e in found or []]
        text += clause
    if not known:
        from cir.text.phrases import extract_noun_phrases  # loads spaCy only when needed
        return text, extract_noun_phrases([text], max_phrases=MAX_PHRASES)[0]
    return text, [{"text": text[s:e], "start": s, "end": e} for s, e in dict.fromkeys(spans)][:MAX_PHRASES]
