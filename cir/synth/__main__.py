"""Generate rich multi-condition CIR triplets from image pairs (the good4cir pipeline).

    python -m cir.synth --pairs PAIRS.jsonl --backend {openai,scene} --out triplets.jsonl [options]
    python -m cir.synth pairs-from-shapes --data DIR --split train --out pairs.jsonl
    python -m cir.synth report --triplets OUT.jsonl [--checkpoint CKPT --gallery G] [--json REPORT.json]

Steps: (1) the reference image's objects with descriptors, (2) the target's objects, unchanged ones
with the exact same descriptors, (3) one caption per difference (addition, removal, modification),
(4) joins of several difference captions into multi-condition captions (deterministic code).
Steps 1-3 are LLM calls with prompts from cir/synth/prompts/; answers are schema-checked, retried
when malformed and cached, so a rerun costs nothing and an interrupted run resumes where it stopped.
Backends: `openai` (any OpenAI-compatible chat-completions server: OpenAI, vLLM, Ollama) and
`scene` (offline: answers from the CIR-Shapes scenes in the pairs' meta).
Use `python -m cir.synth pairs-from-shapes --help` and `python -m cir.synth report --help` for the others.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cir.atomic import write_json
from cir.errors import UserError

COMMANDS = ("pairs-from-shapes", "report")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # a one-line error like every other user mistake
        raise UserError(f"{self.prog}: {message} (see --help)")


def parsers() -> dict[str, argparse.ArgumentParser]:
    from cir.synth.report import __doc__ as report_doc
    from cir.synth.stages import PROMPTS

    fmt = argparse.RawDescriptionHelpFormatter
    g = _Parser(allow_abbrev=False, prog="python -m cir.synth", description=__doc__, formatter_class=fmt)
    g.add_argument("--pairs", required=True,
                   help='pairs file: one JSON object per line {"id", "reference", "target", ["meta"]}, image paths '
                        "relative to the file")
    g.add_argument("--backend", required=True, choices=["openai", "scene"],
                   help="openai: an OpenAI-compatible chat-completions server; scene: offline, from the CIR-Shapes "
                        "scenes in each pair's meta")
    g.add_argument("--out", required=True,
                   help="output triplet JSONL; each finished pair is appended at once, and a rerun skips the pairs "
                        "already in it (it must have been written with the same settings)")
    g.add_argument("--cache", default=None,
                   help="folder of cached LLM answers, one JSON file per (step, model, prompt, image hashes) "
                        "(default: the output path with suffix .cache)")
    g.add_argument("--prompts", default=str(PROMPTS),
                   help="folder with step1_objects.txt, step2_target_objects.txt, step3_differences.txt "
                        "(default: the packaged prompts)")
    g.add_argument("--captions-per-pair", type=int, default=2,
                   help="captions written per pair (default 2); fewer when a pair has too few differences, as a "
                        "single-condition caption never repeats one")
    g.add_argument("--max-conditions", type=int, default=3,
                   help="most differences joined in one multi-condition caption (default 3)")
    g.add_argument("--multi-fraction", type=float, default=0.5,
                   help="share of output captions that join 2 or more differences, as far as the pairs have that many "
                        "(default 0.5)")
    g.add_argument("--seed", type=int, default=0, help="seed of step 4's choices and join phrasing (default 0)")
    g.add_argument("--max-attempts", type=int, default=4,
                   help="attempts per LLM call, both for malformed answers and for HTTP 429/5xx/timeouts (default 4); "
                        "a pair still failing is reported and left for a rerun")
    g.add_argument("--concurrency", type=int, default=4, help="pairs described at once, one thread each (default 4)")
    g.add_argument("--base-url", default="https://api.openai.com/v1",
                   help="openai backend: API base URL, e.g. http://localhost:8000/v1 (vLLM), http://localhost:11434/v1 "
                        "(Ollama) (default: OpenAI's)")
    g.add_argument("--model", default="gpt-4o", help="openai backend: model name sent with each request (default gpt-4o)")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="openai backend: environment variable holding the API key; when it is unset or empty no "
                        "Authorization header is sent (local servers) (default OPENAI_API_KEY)")
    g.add_argument("--timeout", type=float, default=120.0,
                   help="openai backend: seconds to wait for one response before retrying (default 120)")
    g.add_argument("--json-mode", action="store_true",
                   help='openai backend: also ask for response_format {"type": "json_object"} (OpenAI, vLLM and '
                        "Ollama support it)")

    s = _Parser(allow_abbrev=False, prog="python -m cir.synth pairs-from-shapes",
                description="Make a pairs file from a CIR-Shapes split: each triplet's reference and target, with "
                            "the reference and target scenes and the operations in meta.")
    s.add_argument("--data", required=True, help="CIR-Shapes folder (written by python -m cir.data.shapes)")
    s.add_argument("--split", default="train", help="split whose {split}.jsonl is read (default train)")
    s.add_argument("--out", required=True, help="pairs JSONL to write (image paths relative to it)")

    r = _Parser(allow_abbrev=False, prog="python -m cir.synth report", description=report_doc, formatter_class=fmt)
    r.add_argument("--triplets", required=True, help="triplet JSONL written by python -m cir.synth")
    r.add_argument("--checkpoint", default=None, help="also rank the true targets with this model checkpoint (.safetensors)")
    r.add_argument("--gallery", default=None,
                   help="with --checkpoint: gallery folder or text file of paths, the true targets added "
                        "(default: every reference and target of the triplets)")
    r.add_argument("--json", default=None, help="also write the per-triplet results and the summary to this JSON file")
    r.add_argument("--device", default="cpu", help="torch device for --checkpoint (default cpu)")
    return {"generate": g, "pairs-from-shapes": s, "report": r}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in COMMANDS else "generate"
    a = parsers()[command].parse_args(argv[1:] if command in COMMANDS else argv)
    if command == "pairs-from-shapes":
        from cir.synth.pipeline import pairs_from_shapes
        print(f"wrote {pairs_from_shapes(a.data, a.split, a.out)} pairs to {a.out}")
        return 0
    if command == "report":
        from cir.data.triplets import read_triplets
        from cir.synth.report import format_summary, report
        if a.gallery and not a.checkpoint:
            raise UserError("--gallery needs --checkpoint")
        triplets, _ = read_triplets(a.triplets, check_images=bool(a.checkpoint))
        result = report(triplets, a.checkpoint, a.gallery, a.device)
        print(format_summary(result["summary"]))
        if a.json:
            write_json(a.json, result)
        return 0
    return _generate(a)


def _generate(a: argparse.Namespace) -> int:
    from cir.synth.backends import OpenAIBackend, SceneBackend
    from cir.synth.pipeline import generate, read_pairs
    from cir.synth.stages import Composition, Prompts

    composition = Composition(a.captions_per_pair, a.max_conditions, a.multi_fraction, a.seed)
    prompts = Prompts(a.prompts)
    if a.timeout <= 0:
        raise UserError("--timeout must be positive")
    pairs = read_pairs(a.pairs)
    if not pairs:
        raise UserError(f"{a.pairs} holds no pairs")
    if a.backend == "scene":
        backend = SceneBackend.from_pairs(pairs)
    else:
        backend = OpenAIBackend(a.base_url, a.model, os.environ.get(a.api_key_env) or None, a.timeout, a.max_attempts,
                                a.json_mode)
    c = generate(pairs, backend, a.out, a.cache or Path(a.out).with_suffix(".cache"), composition, prompts,
                 a.concurrency, a.max_attempts)
    print(f"wrote {c['triplets']} triplets of {c['done']} pairs to {a.out} ({c['skipped']} pairs were already there, "
          f"{len(c['failed'])} failed); LLM calls {c['calls']}, cached answers {c['cached']}, malformed answers {c['malformed']}")
    if c["failed"]:
        print(f"{len(c['failed'])} pair(s) failed (see above); rerun the same command to retry them", file=sys.stderr)
    return 1 if c["failed"] else 0


if __name__ == "__main__":
    from cir.cli import run_cli
    run_cli(main)
