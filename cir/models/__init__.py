"""The models: the shared base, ConText-CIR, TMCIR, the fusion, and the factory that builds them."""
