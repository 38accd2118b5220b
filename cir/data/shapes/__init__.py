"""CIR-Shapes: the embedded, procedurally rendered benchmark (`docs/cir-shapes.md`), a module per job:
`scene` (objects, scenes, operations and their sampling), `render` (drawing a scene), `captions`
(modification captions with gold noun phrases and grounding boxes), `partials` (partial
fulfilments, the hard negatives), `pretraining_texts` (scene descriptions and cell contents for
pretraining the towers) and `dataset` (splits written to disk, by `python -m cir.data.shapes`)."""
