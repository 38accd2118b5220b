"""The data-generation pipeline (good4cir): image pairs -> rich multi-condition CIR triplets.

`stages` (the four steps, schemas, cache, retries), `backends` (OpenAI-compatible HTTP and the
offline CIR-Shapes `scene` backend), `pipeline` (pairs files, resumable runs), `report` (quality
report); `python -m cir.synth --help` for the command line.
"""
