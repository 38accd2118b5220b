"""ConText-CIR Explorer: composed image retrieval with text concept consistency."""

__version__ = "0.1.0"
