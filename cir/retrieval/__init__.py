"""The gallery index behind `python -m cir.index`: index parameters (params), the index folder on
disk (store), its image paths held compactly (pathlist) and kept inside the gallery root (confine),
embedding images in resumable chunks (embed), ranks under torchrun (shards), building and updating
(build), search (search), the Milvus backend (milvus), and scoring a model's ranking on triplets
(evaluate)."""

TYPES = ("auto", "flat", "ivf", "ivfpq")
FLAT_MAX = 200_000  # auto: exact search below this many images
IVF_MAX = 5_000_000  # auto: IVFFlat below this many, IVF-PQ above
RERANK = 10  # ivfpq: re-rank RERANK * k candidates by default
