"""The explorer app: retrieval, per-phrase attention, and the annotators' review of triplet files."""
