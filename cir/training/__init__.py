"""Training: the one loop (`loop.py`) every stage runs."""
