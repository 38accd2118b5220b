"""Dataset readers and generators: the triplet format, CIR-Shapes, CIRR and CIRCO."""
