"""Text handling: CLIP BPE tokenizing with character offsets (tokenizer) and noun-phrase spans (phrases)."""
